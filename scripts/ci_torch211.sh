#!/usr/bin/env bash
# CI's second torch: the whole suite (bash scripts/run.sh test) on torch 2.11.0 with
# Triton 3.6.0 -- the lowest torch pyproject.toml claims, and what the GPU machine
# of issue 13 has -- next to the main job's pinned torch.
#
#   bash scripts/ci_torch211.sh [pytest args...]
#
# It runs in a copy of the checkout with its own .venv, in $FASTOPT_TORCH211_DIR
# (default ${TMPDIR:-/tmp}/fastopt-torch211): an editable build writes the
# extension into the source tree, so building in this checkout would replace
# the main .venv's extension with one built against another torch. The copy is
# refreshed from the checkout (tracked and untracked-but-not-ignored files) on
# every run and the extension rebuilt; the venv is kept between runs.
#
# numpy<2.4: Triton 3.6's interpreter (how the triton backend is tested without
# a GPU) converts 1-element arrays to Python ints, which numpy 2.4 refuses
# ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.8,
# the main job's, does not. Compiled Triton on a GPU is not affected. numpy 2.3 still
# warns about that conversion, thousands of times per run: filtered (PYTEST_ADDOPTS).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.11.0"
TRITON="triton==3.6.0"
work="${FASTOPT_TORCH211_DIR:-${TMPDIR:-/tmp}/fastopt-torch211}"
src="$work/src"
start=$(date +%s)

mkdir -p "$src"
find "$src" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
# (ls-files also lists tracked files deleted in the work tree: only existing ones are copied)
(
  cd "$root"
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done |
    tar --null -T - -cf -
) | tar -xf - -C "$src"
rm -f "$src/.venv/.fastopt-setup"  # the copy has no extension yet: always rebuild it

if [ ! -x "$src/.venv/bin/python" ]; then
  "$PYTHON" -m venv "$src/.venv"
fi
# Every pip call of this job, run.sh's included, keeps these pins (torch 2.11 wants
# setuptools<82; run.sh upgrades setuptools).
printf '%s\n' "$TORCH" "$TRITON" "numpy<2.4" "setuptools<82" > "$work/constraints.txt"
export PIP_CONSTRAINT="$work/constraints.txt"
echo "== torch 2.11 job: installing $TORCH $TRITON into $src/.venv"
"$src/.venv/bin/python" -m pip install --quiet "$TORCH" "$TRITON" "numpy<2.4" \
  2> >(grep -v "is ignored: it is neither a file" >&2)
echo "== torch 2.11 job: installed in $(( $(date +%s) - start )) s"

cd "$src"
export PYTEST_ADDOPTS="${PYTEST_ADDOPTS:-} -W ignore:Conversion\ of\ an\ array\ with\ ndim:DeprecationWarning"
FASTOPT_TORCH_SPEC="$TORCH" PYTHON="$PYTHON" bash scripts/run.sh test "$@"
.venv/bin/python - "$TORCH" "$TRITON" <<'EOF'
import sys, importlib.metadata as md
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    got = md.version(name)
    assert got.split("+")[0] == want, f"the torch 2.11 job ran {name} {got}, not {want}"
print(f"== torch 2.11 job: suite passed on torch {md.version('torch')}, triton {md.version('triton')}")
EOF
echo "== torch 2.11 job: $(( $(date +%s) - start )) s in all"
