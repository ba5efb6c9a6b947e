"""Prepare the data of the llm-foundry example: text, a tokenizer, MDS shards, a Llama config.

    python experiments/foundry/prepare.py OUT_DIR [--max-bytes N] [--heldout-bytes N]

Writes under ``OUT_DIR`` (the ``data_root`` of ``mpt.yaml`` and ``llama.yaml``):

- ``text/train/*.txt``, ``text/heldout/*.txt``: the Python standard library's source
  (multirun's demo corpus), training files from the front of the sorted list and
  held-out files from its back, so the two never share a file;
- ``tokenizer/``: a byte-level BPE trained here on the training text with the
  ``tokenizers`` library, saved as a Hugging Face tokenizer (``<eos>`` and ``<pad>``);
- ``mds/train``, ``mds/heldout``: both text folders converted to MDS by llm-foundry's
  own converter (``llmfoundry data_prep convert_text_to_mds``), EOS between files;
- ``llama/config.json``: a tiny ``LlamaConfig`` for ``llama.yaml`` (``pretrained: false``);
- ``multirun.yaml``: a copy of ``experiments/foundry/multirun.yaml``, whose relative
  paths (``tokenizer``, ``mds/heldout``) resolve against ``OUT_DIR``.

Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SPECIAL_TOKENS = ["<unk>", "<eos>", "<pad>"]


def write_text_split(sources: list[Path], out: Path, *, max_bytes: int) -> list[Path]:
    """Copy ``sources`` in order into ``out`` as ``.txt`` files until ``max_bytes`` are written.

    llm-foundry's converter reads ``*.txt`` only and fails on text that is not UTF-8, so
    files that do not decode are skipped. Names keep the order and the source's path.
    """
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used = 0
    for index, source in enumerate(sources):
        if used >= max_bytes:
            break
        try:
            text = source.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue
        target = out / f"{index:05d}-{source.stem}.txt"
        target.write_text(text, encoding="utf-8")
        written.append(target)
        used += len(text.encode("utf-8"))
    return written


def train_tokenizer(files: list[Path], out: Path, *, vocab_size: int) -> int:
    """Train a byte-level BPE on ``files`` and save it as a Hugging Face tokenizer; return its size.

    Byte-level: every text encodes, nothing maps to ``<unk>``. No post-processor, so
    llm-foundry's converter adds no special tokens of its own inside documents.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # type: ignore[import-untyped]
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train([str(f) for f in files], trainer)
    hf: Any = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    hf.save_pretrained(out)
    return len(hf)


def convert_with_llmfoundry(text_dir: Path, out: Path, *, tokenizer_dir: Path, concat_tokens: int) -> None:
    """llm-foundry's ``convert_text_to_mds``: concatenated rows of ``concat_tokens``, EOS between files."""
    from llmfoundry.command_utils import convert_text_to_mds_from_args

    convert_text_to_mds_from_args(
        output_folder=str(out),
        input_folder=str(text_dir),
        compression="zstd",
        concat_tokens=concat_tokens,
        tokenizer_name=str(tokenizer_dir),
        bos_text=None,
        eos_text=None,
        use_tokenizer_eos=True,
        no_wrap=False,
        processes=1,  # one process: the example runs on small machines, and the order is fixed
        reprocess=False,
        trust_remote_code=False,
        logging_level="WARNING",
    )


def write_llama_config(out: Path, *, vocab_size: int, tokenizer_dir: Path, max_positions: int) -> None:
    """A tiny Llama's ``config.json``: ``llama.yaml`` builds the model from it with random weights."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    config.save_pretrained(out)


def count_rows(mds_dir: Path) -> int:
    """Samples in an MDS folder, from its ``index.json``."""
    return sum(int(shard["samples"]) for shard in json.loads((mds_dir / "index.json").read_text())["shards"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="where to write; becomes the YAMLs' data_root")
    parser.add_argument("--max-bytes", type=int, default=2_000_000, help="bytes of training text (default 2 MB)")
    parser.add_argument("--heldout-bytes", type=int, default=200_000, help="bytes of held-out text")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary (the YAMLs' vocab_size)")
    parser.add_argument("--concat-tokens", type=int, default=128, help="tokens per row (the YAMLs' max_seq_len)")
    args = parser.parse_args(argv)

    from multirun.data.mds import demo_corpus_sources

    out: Path = args.out_dir.expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} exists and is not empty")
    started = time.perf_counter()
    sources = demo_corpus_sources()
    train = write_text_split(sources, out / "text" / "train", max_bytes=args.max_bytes)
    # Held-out files come from the other end of the sorted list: never a training file.
    last_train = int(train[-1].name.split("-", 1)[0])  # the files' names start with their source's index
    unused = list(reversed(sources[last_train + 1 :]))
    heldout = write_text_split(unused, out / "text" / "heldout", max_bytes=args.heldout_bytes)
    if not heldout:
        parser.error("no held-out text left; lower --max-bytes")

    tokenizer_dir = out / "tokenizer"
    size = train_tokenizer(train, tokenizer_dir, vocab_size=args.vocab_size)
    if size > args.vocab_size:
        parser.error(f"the tokenizer has {size} tokens, more than --vocab-size {args.vocab_size}")
    for split in ("train", "heldout"):
        convert_with_llmfoundry(
            out / "text" / split, out / "mds" / split, tokenizer_dir=tokenizer_dir, concat_tokens=args.concat_tokens
        )
    write_llama_config(
        out / "llama", vocab_size=args.vocab_size, tokenizer_dir=tokenizer_dir, max_positions=args.concat_tokens
    )
    shutil.copyfile(HERE / "multirun.yaml", out / "multirun.yaml")

    seconds = time.perf_counter() - started
    print(f"prepared {out} in {seconds:.1f} s")
    print(f"  text/train      {len(train)} files, {sum(p.stat().st_size for p in train):,} bytes")
    print(f"  text/heldout    {len(heldout)} files, {sum(p.stat().st_size for p in heldout):,} bytes")
    print(f"  tokenizer/      byte-level BPE, {size} tokens (<eos>, <pad>)")
    print(f"  mds/train       {count_rows(out / 'mds' / 'train')} rows of {args.concat_tokens} tokens (llm-foundry)")
    print(f"  mds/heldout     {count_rows(out / 'mds' / 'heldout')} rows of {args.concat_tokens} tokens (llm-foundry)")
    print("  llama/config.json, multirun.yaml")
    print(f"train with: llmfoundry train {HERE / 'mpt.yaml'} variables.data_root={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
