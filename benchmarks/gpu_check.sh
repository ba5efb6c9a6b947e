#!/usr/bin/env bash
# The GPU figures in one session on a CUDA machine (under 8 minutes, no network):
# injection share at GPT-2-small bf16, one full monitor evaluation in training steps,
# throughput with and without experiments, an evaluation's profile, the demo end to end.
# The work is benchmarks/gpu_check.py; see its docstring.
#
#   bash benchmarks/gpu_check.sh [--cpu-smoke] [--only SECTION ...]
#
# PYTHON: the interpreter (default: the repository's .venv if there is one, else python3).
# Prints figures; exits non-zero when a section fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
