#!/usr/bin/env bash
# Throw-away environment for benchmarks/independent_engine.py's reference engine:
# opentps-core 3.0.1 (its collapsed-cone convolution photon engine). NEVER an atp
# dependency: the venv lives outside the repository and atp never imports opentps.
#
#   bash benchmarks/opentps_setup.sh [VENV]        (default /work/venvs/opentps)
#
# What it takes (issue 20): Python 3.12 (pyenv), matplotlib (imported, undeclared),
# the CCC_DoseEngine binary made executable, a kernel_header.txt in every kernel
# folder (the wheel ships none; opentps reads it for the kernel's sampling), and a
# HOME of its own (importing opentps writes ~/openTPS_workspace).
set -euo pipefail
VENV=${1:-/work/venvs/opentps}
PY=${PYTHON312:-$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)}
[ -x "$PY" ] || { echo "opentps_setup.sh: no Python 3.12 (set PYTHON312)" >&2; exit 2; }
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "opentps-core==3.0.1" matplotlib
mkdir -p "$VENV/home"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ENGINE=$SITE/opentps/core/processing/doseCalculation/photons
chmod +x "$ENGINE/CCC_DoseEngine/CCC_DoseEngine"
# kernel_header.txt: "<comment line>" then "Nradii Nangles Nenergies" (parse_func.cpp),
# counted from the float32 files of each kernel folder
for K in "$ENGINE"/Kernels_*; do
  nr=$(( $(stat -c %s "$K/radii.bin") / 4 )); na=$(( $(stat -c %s "$K/angles.bin") / 4 ))
  ne=$(( $(stat -c %s "$K/energies.bin") / 4 ))
  printf 'Nradii Nangles Nenergies\n%d %d %d\n' "$nr" "$na" "$ne" > "$K/kernel_header.txt"
done
HOME="$VENV/home" "$VENV/bin/python" -c 'import opentps.core, importlib.metadata as m; print("opentps-core", m.version("opentps-core"))'
echo "venv: $VENV   site-packages: $SITE"
