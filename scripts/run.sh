#!/usr/bin/env bash
# Set up fastopt in a local virtualenv (.venv) and run one job.
#   bash scripts/run.sh train [fastopt-train args...]   the main job: train the demo model
#   bash scripts/run.sh test  [pytest args...]          the test suite
#   bash scripts/run.sh bench [bench_cpu.py args...]    the CPU benchmark table
# Set-up is idempotent: it installs torch (a CUDA build on Linux x86-64, whose
# CPU kernels run anywhere), builds the C++ extension (and the CUDA kernels
# when a CUDA toolkit is found; FASTOPT_BUILD_CUDA=0 opts out) and the test tools.
set -euo pipefail

job="${1:-test}"
shift || true
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${FASTOPT_TORCH_SPEC:-torch==2.14.1}"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

if [ -z "${CUDA_HOME:-}" ]; then
  for candidate in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")"; do
    if [ -x "$candidate/bin/nvcc" ] && [ -d "$candidate/include" ]; then
      export CUDA_HOME="$candidate"
      break
    fi
  done
fi

# pip warns about every local index folder a package is missing from; drop that noise.
pipq() { python -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file" >&2); }

stamp=".venv/.fastopt-setup"
want="$(find pyproject.toml setup.py csrc -type f | sort | xargs cat | sha1sum | cut -c1-16) ${TORCH_SPEC} ${FASTOPT_BUILD_CUDA:-auto}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== fastopt set-up: $TORCH_SPEC, extension build (CUDA_HOME=${CUDA_HOME:-none})"
  pipq --upgrade pip setuptools wheel ninja
  pipq "$TORCH_SPEC" numpy
  pipq "pytest>=8" "hypothesis>=6" "pytest-benchmark>=4" ruff matplotlib tqdm
  start=$(date +%s)
  if ! python -m pip install --no-build-isolation --no-deps -v -e . > .venv/build.log 2>&1; then
    tail -n 60 .venv/build.log
    echo "fastopt: the extension build failed (full log: .venv/build.log)" >&2
    exit 1
  fi
  grep -E "^fastopt:" .venv/build.log || true
  python -c "import fastopt._C" || { echo "fastopt: the C++ extension does not import" >&2; exit 1; }
  echo "== extension built in $(( $(date +%s) - start )) s; backends: $(python -c 'import fastopt; print(fastopt.available_backends())')"
  echo "$want" > "$stamp"
fi

case "$job" in
  train) exec python -m fastopt.train "$@" ;;
  test)
    ruff check fastopt tests benchmarks triton_kernels
    # The benchmark harness's own smoke tests (quick mode end to end, the SPEC
    # bytes formula, interleaving); the timed cases stay out of the test run.
    if [ "$#" -eq 0 ]; then
      python -m pytest -q -p no:cacheprovider benchmarks/test_bench_cpu.py -k "not test_step"
      # the host-overhead benchmark end to end, in its smoke mode (no verdicts)
      python -m benchmarks.bench_host --quick > /dev/null
    fi
    # The frameworks tests/test_integrations.py drives (Lightning, transformers,
    # accelerate), pinned, with torch kept as installed.
    bash scripts/install_integrations.sh
    exec python -m pytest -q -p no:cacheprovider tests "$@"
    ;;
  bench)
    # Optional contenders; the harness skips (and names) any that cannot install here.
    pipq --no-build-isolation lion-pytorch deepspeed bitsandbytes || echo "note: optional contenders not installed"
    exec python -m benchmarks.bench_cpu "$@"
    ;;
  *) echo "usage: bash scripts/run.sh train|test|bench [args...]" >&2; exit 2 ;;
esac
