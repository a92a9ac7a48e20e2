#!/usr/bin/env bash
# Build (or reuse) the MONAI Label 0.8.5 virtual environment and print its path.
#
#   scripts/monailabel_env.sh [VENV_DIR]
#
# MONAI Label 0.8.5 pins old packages and numpy<2, so it gets its own venv, kept apart from
# the project's. The default VENV_DIR is ~/.cache/monai-mask/monailabel-<key>, keyed by a hash
# of the recipe below, so a changed recipe builds a new venv and an unchanged one is reused
# (a file `.monai-mask-recipe` inside the venv, written last, marks a finished build; a
# half-built venv is removed and built again). Building takes ~5 minutes on 2 cores.
#
# monai-mask itself is NOT installed there: the MONAI Label server runs with the repository
# on PYTHONPATH (the bundle configs import monai_mask.*). Only the monai-mask dependencies
# that MONAI Label lacks and that keep numpy<2 are added (slicerio). highdicom is left out
# (it needs numpy 2 / pydicom 3): writing DICOM-SEG is not on MONAI Label's path.
set -euo pipefail

PYTHON=${PYTHON:-python3}
# torch and torchvision come as the matching PyPI pair: MONAI Label imports torchvision, whose
# PyPI wheels do not load into the CPU-only torch build the project's venv uses (torchvision
# ops missing), so this venv gets the full PyPI torch (~8 GB with its CUDA libraries).
RECIPE=(
  "monailabel==0.8.5" "monai==1.6.1" "torch==2.14.1" "torchvision==0.29.1" "numpy<2"
  "pydicom<3" "dicomweb-client<0.60" "pynetdicom<3" "slicerio==1.4.0"
)
key=$(printf '%s\n' "$("$PYTHON" -c 'import sys; print(sys.version[:4])')" "${RECIPE[@]}" \
      | sha256sum | cut -c1-12)
VENV=${1:-"${XDG_CACHE_HOME:-$HOME/.cache}/monai-mask/monailabel-$key"}
MARK="$VENV/.monai-mask-recipe"

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # one build at a time per venv path

if [[ -f "$MARK" && "$(cat "$MARK")" == "$key" ]] && "$VENV/bin/python" -c "import monailabel" 2>/dev/null; then
  echo "$VENV"
  exit 0
fi

rm -rf "$VENV"
start=$(date +%s)
"$PYTHON" -m venv "$VENV" >&2
"$VENV/bin/pip" install --quiet --upgrade pip > "$VENV/pip.log" 2>&1 || { tail -20 "$VENV/pip.log" >&2; exit 1; }
if ! "$VENV/bin/pip" install --quiet "${RECIPE[@]}" >> "$VENV/pip.log" 2>&1; then
  grep -v "^WARNING: Location" "$VENV/pip.log" | tail -30 >&2
  exit 1
fi
"$VENV/bin/python" - <<'EOF' >&2
import monai, monailabel, numpy, slicerio, torch
assert numpy.__version__.startswith("1."), numpy.__version__
print(f"monailabel {monailabel.__version__}, monai {monai.__version__}, torch {torch.__version__},"
      f" numpy {numpy.__version__}")
EOF
echo "$key" > "$MARK"
echo "built $VENV in $(( $(date +%s) - start )) s" >&2
echo "$VENV"
