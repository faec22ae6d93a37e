#!/usr/bin/env bash
# One-shot GPU check (issue 13), for a GPU machine with its own python3, torch,
# Triton and nvcc and no network: builds the extension for the local GPU, then
# runs the gpu-marked tests, the GPU benchmark and the training loop on the GPU,
# each stage timed, with its own timeout, a failure recorded and the next stage
# run all the same; the whole check stays under 8 minutes (--budget, seconds).
#
#   bash scripts/gpu_check.sh OUTDIR             # on the GPU machine
#   bash scripts/gpu_check.sh OUTDIR --dry-run   # anywhere: skips (and says so) what needs a GPU
#
# Writes OUTDIR/report.md (readable on its own), OUTDIR/results.json and
# OUTDIR/logs/. Uses the machine's python3 as it is (PYTHON=... to choose
# another): no virtualenv, no downloads. Exit status 0 when no stage failed.
# The stages themselves are in scripts/gpu_check.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if [ -z "${CUDA_HOME:-}" ]; then
  for candidate in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")"; do
    if [ -x "$candidate/bin/nvcc" ] && [ -d "$candidate/include" ]; then
      export CUDA_HOME="$candidate"
      break
    fi
  done
fi
cd "$root"
exec "$PYTHON" scripts/gpu_check.py "$@"
