#!/usr/bin/env bash
# Install the frameworks that tests/test_integrations.py drives (PyTorch Lightning,
# HF transformers, HF accelerate) into the project's .venv, CPU only, without
# letting pip move torch: the torch spec is named in the same pip command, so the
# resolver must keep the installed build. Run after `bash scripts/run.sh test`
# (or anything else that created .venv); idempotent: 13-40 s when it installs
# (measured on the shared 2-core machine, wheels from the local index) and
# 0.1 s when everything is already there.
#   bash scripts/install_integrations.sh
#   python -m pytest -q tests/test_integrations.py
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "install_integrations: no .venv here; run 'bash scripts/run.sh test' first" >&2
  exit 1
fi
TORCH_SPEC="${FASTOPT_TORCH_SPEC:-torch==2.14.1}"
# The versions tests/test_integrations.py was written and run against.
FRAMEWORKS=(lightning==2.6.6 transformers==5.24.0 accelerate==1.16.0)

have() {
  "$PY" - "$TORCH_SPEC" "${FRAMEWORKS[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        got = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    if got.split("+")[0] != want:
        sys.exit(1)
EOF
}

if have; then
  echo "install_integrations: ${FRAMEWORKS[*]} already installed (with $TORCH_SPEC)"
  exit 0
fi
before="$("$PY" -c 'import torch; print(torch.__version__)')"
# pip warns about every local index folder a package is missing from; drop that noise.
"$PY" -m pip install --quiet "$TORCH_SPEC" "${FRAMEWORKS[@]}" \
  2> >(grep -v "is ignored: it is neither a file" >&2)
after="$("$PY" -c 'import torch; print(torch.__version__)')"
if [ "$before" != "$after" ]; then
  echo "install_integrations: torch changed from $before to $after" >&2
  exit 1
fi
"$PY" -c 'import lightning.pytorch, transformers, accelerate, fastopt' || {
  echo "install_integrations: a framework does not import" >&2
  exit 1
}
echo "install_integrations: ${FRAMEWORKS[*]} installed; torch still $after"
