#!/usr/bin/env bash
# Build the wheel from a clean copy of the checkout, install it into a throwaway venv and train from another folder,
# so a file the package needs but the wheel lacks (a Hydra config, the embedded sample, static files) fails here
# instead of on a user's machine. The editable install hides such gaps: it imports from the checkout.
#
#   bash scripts/check_wheel.sh            # uses .venv/bin/python (PYTHON=... to change)
#
# The throwaway venv has no packages of its own: a .pth file puts .venv's site-packages on its path, so torch & co.
# are reused, never reinstalled. Lines of a .pth only extend sys.path; the .pth files inside .venv's site-packages
# (among them the editable install's finder, which would import /work/main/lesionnet) are not run.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || { echo "check_wheel: no Python at $PYTHON; run scripts/setup.sh first or set PYTHON=" >&2; exit 2; }
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lesionnet-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# 1. The wheel, built from the files git tracks or would track (nothing ignored: no .venv, logs or build leftovers).
mkdir -p "$WORK/src" "$WORK/dist"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"   # skip files deleted in the working tree but still in the index
done | xargs -0 cp --parents -t "$WORK/src"
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/lesionnet-*.whl)"
"$PYTHON" - "$WHEEL" "$WORK/src" <<'EOF'
import sys, zipfile
from pathlib import Path
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
src = Path(sys.argv[2])
need = sorted(str(p.relative_to(src)) for p in (src / "lesionnet" / "conf").rglob("*") if p.is_file())
need += ["lesionnet/data/sample/HAM10000_metadata.csv", "lesionnet/py.typed"]  # py.typed: typed for type checkers
missing = [n for n in need if n not in names]
if missing:
    sys.exit(f"check_wheel: the wheel lacks {missing}; add them to [tool.setuptools.package-data] in pyproject.toml")
print(f"check_wheel: {Path(sys.argv[1]).name} has {len(names)} files, all {len(need) - 2} of lesionnet/conf among them")
EOF

# 2. A venv that reuses .venv's packages through a .pth, with the wheel (and nothing else) installed into it.
"$PYTHON" -m venv --without-pip "$WORK/venv"
SITE="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$SITE/_reuse_lesionnet_venv.pth"
"$PYTHON" -m pip --python "$WORK/venv/bin/python" install --quiet --no-deps --no-index "$WHEEL"

# 3. From an empty folder: lesionnet must come from the wheel, and a training run must work.
mkdir -p "$WORK/cwd"
cd "$WORK/cwd"
unset PYTHONPATH
ORIGIN="$("$WORK/venv/bin/python" -c 'import lesionnet; print(lesionnet.__file__)')"
echo "check_wheel: lesionnet imported from $ORIGIN"
case "$ORIGIN" in
    "$SITE"/*) ;;
    *) echo "check_wheel: lesionnet was imported from $ORIGIN, not from the wheel in $SITE" >&2; exit 1 ;;
esac
HF_HUB_OFFLINE=1 "$WORK/venv/bin/lesionnet" train trainer.fast_dev_run=true logger=csv data.num_workers=0 \
    "hydra.run.dir=$WORK/cwd/run"
[ -f "$WORK/cwd/run/metrics.json" ] || { echo "check_wheel: the training run wrote no metrics.json" >&2; exit 1; }
[ "$(head -1 "$WORK/venv/bin/lesionnet")" = "#!$WORK/venv/bin/python" ] \
    || { echo "check_wheel: the lesionnet command does not run the wheel's venv's Python" >&2; exit 1; }
echo "check_wheel: passed (wheel installed into a fresh venv, lesionnet train ran from $WORK/cwd)"
