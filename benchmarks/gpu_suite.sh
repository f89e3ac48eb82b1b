#!/usr/bin/env bash
# kfac-edit GPU benchmark suite: one command, < 8 minutes on one H100 (see benchmarks/README.md).
#   benchmarks/gpu_suite.sh               # random-initialized OLMo-2-1B/7B shapes on the GPU
#   benchmarks/gpu_suite.sh --cpu-smoke   # tiny shapes on the CPU: proves the script end to end
# Prints a Markdown table and writes benchmarks/results/gpu_suite.json (gpu_suite_cpu_smoke.json for the smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON_SET:-}" ] && ! "$PYTHON" -c "import kfac_edit" 2>/dev/null; then
    PYTHON=.venv/bin/python
fi
if ! "$PYTHON" -c "import kfac_edit" 2>/dev/null; then
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # not installed: run from the checkout
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_suite.py "$@"
