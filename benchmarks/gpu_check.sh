#!/usr/bin/env bash
# GPU figures in one session on a CUDA machine: a GPU training run's ledger and report,
# injection and monitor cost shares at the demo's scale and at GPT-2-small scale, and
# probe scoring at GPT-2-small shape.
#
#   bash benchmarks/gpu_check.sh [WHEEL_DIR]
#
# WHEEL_DIR (optional): wheels installed with --no-index first, for a machine that has
# torch but not the Composer stack. Prints figures; exits non-zero on any failure.
set -euo pipefail
export PYTHONUNBUFFERED=1
if [[ $# -ge 1 ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$1"/*.whl
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .
    export PYTHONPATH=/tmp/site
fi
python3 - <<'PY'
import torch, composer, streaming, transformers, multirun
print(f"torch {torch.__version__} cuda {torch.cuda.is_available()} {torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}; "
      f"composer {composer.__version__}; streaming {streaming.__version__}; transformers {transformers.__version__}")
assert torch.cuda.is_available(), "no CUDA device"
PY
GPT2_SMALL=(--set model.n_layer=12 --set model.n_head=12 --set model.n_embd=768 --set data.sequence_length=512
            --set train.global_batch_size=64 --set train.precision=amp_bf16)
echo "== demo on GPU: training, ledger integrity, report"
run_dir=$(mktemp -d)/demo
python3 -m multirun train --no-progress --set run_dir="$run_dir" --set train.save_interval=null > /tmp/gpu_demo.log 2>&1 \
    || { tail -50 /tmp/gpu_demo.log; exit 1; }
python3 - "$run_dir" <<'PY'
import json, sys
from multirun.ledger import Ledger
run = sys.argv[1]
ledger = Ledger.open(run)
ledger.check_integrity()
summary = json.load(open(f"{run}/summary.json"))
print(f"spans {len(ledger)}; fit {summary['fit_seconds']:.1f} s; monitor share "
      f"{100 * summary['monitor_seconds'] / summary['fit_seconds']:.2f} %; held-out loss {summary['heldout_loss']:.4f}")
for r in summary["effects"]:
    if r.get("primary"):
        print(f"  {r['experiment']:<18} {r['metric']:<16} effect {r['effect']:+.4f}  Holm p {r['p_holm']:.2g}")
PY
echo "== injection share, demo scale";      python3 benchmarks/bench_injection.py --steps 100
echo "== injection share, GPT-2 small bf16"; python3 benchmarks/bench_injection.py --steps 100 "${GPT2_SMALL[@]}"
echo "== monitor share, demo scale";        python3 benchmarks/bench_monitors.py
echo "== monitor share, GPT-2 small bf16";  python3 benchmarks/bench_monitors.py "${GPT2_SMALL[@]}" --set train.max_duration=1000ba
echo "== probe scoring, GPT-2 small (kept columns, shared contexts)"
python3 benchmarks/bench_scoring.py --questions 64 --prompt-tokens 256 --repeats 5
