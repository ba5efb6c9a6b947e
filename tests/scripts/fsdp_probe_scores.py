"""Scores probes through a model wrapped in FSDP (full sharding, gloo, CPU) on this rank.

Run once per rank with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; rank 0 writes
the scores, the forward passes, and the columns each pass took in and projected onto
the vocabulary to the JSON file given as the only argument. The model is the same seeded tiny GPT-2 the test
scores without FSDP (tests/measure/test_fsdp_monitoring.py).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as td
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

from multirun.measure.live_model import LiveModel
from tests.measure.test_fsdp_monitoring import PROBES, probe_model, score_all


def main(out_path: str) -> None:
    td.init_process_group("gloo")
    model = probe_model()
    widths: list[int] = []  # columns each pass takes in, and how many it projects onto the vocabulary
    projected: list[int] = []
    model.register_forward_pre_hook(
        lambda _m, _args, kwargs: widths.append(int(kwargs["input_ids"].shape[1])), with_kwargs=True
    )
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: projected.append(int(args[0].shape[1])))
    wrapped = FullyShardedDataParallel(
        model, device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.FULL_SHARD
    )
    live = LiveModel(
        wrapped, pad_token_id=PROBES.pad_token_id, max_length=PROBES.max_length, batch_size=PROBES.batch_size
    )
    scores = score_all(live)
    if td.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(
                {
                    "scores": scores,
                    "forward_passes": live.forward_passes,
                    "widths": widths,
                    "projected": projected,
                    "world_size": td.get_world_size(),
                },
                f,
            )
    td.barrier()  # both ranks done with gloo before either tears it down
    td.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
    # Leave without interpreter teardown: torch 2.7's atexit hooks (dynamo's compile-time
    # report) were seen to hang a rank after gloo was torn down, and the test then waits
    # out its timeout although both ranks finished and rank 0 wrote its scores.
    sys.stdout.flush()
    os._exit(0)
