#!/usr/bin/env bash
# Build atp's wheel, install it into fresh virtual environments and run `atp demo` there,
# so a dependency used by the code but not declared in pyproject.toml fails here.
#   1. the bare wheel (core dependencies only): demo with the built-in predictor, no report
#   2. the same venv plus the [ml,report] extras: demo with the shipped network, report.html
# Versions come from constraints.txt (torch==2.13.0: the CPU wheel on this machine's disk).
# Usage: .ci/wheel_check.sh [PYTHON]   (default python3; the repo's .venv builds the wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${1:-python3}
BUILDER=${BUILDER:-.venv/bin/python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/atp-wheel-check.XXXXXX")
echo "wheel check in $WORK"

"$BUILDER" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/dist" "$REPO"
WHEEL=$(ls "$WORK"/dist/atp-*.whl)
echo "built $(basename "$WHEEL")"
# the wheel's metadata must declare every third-party module the shipped code imports
"$BUILDER" "$REPO/tests/depcheck.py" "$WHEEL"

"$PY" -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/python" -m pip install --quiet --disable-pip-version-check
     -c "$REPO/constraints.txt")
run_demo() {  # outside the repo, so nothing is imported from the source tree
    (cd "$WORK" && rc=0 && "$WORK/venv/bin/atp" demo --quiet --out "$1" || rc=$?
     # 3 = plan written, a priority-1 goal unmet: still a working install
     if [ "$rc" != 0 ] && [ "$rc" != 3 ]; then echo "atp demo failed (exit $rc)"; exit 1; fi)
    test -s "$WORK/$1/plan.json"
    ls "$WORK/$1"/dicom/RS*.dcm >/dev/null  # RTSTRUCT export (contourpy)
}

"${PIP[@]}" "$WHEEL"
# atp installs one top-level package: its stages are atp.optimizer, atp.predictor, ...; a
# host application's own `optimizer` or `predictor` module is never shadowed
(cd "$WORK" && "$WORK/venv/bin/python" - <<'PYEOF'
import importlib, importlib.metadata as md, sys
top = sorted({f.parts[0] for f in md.files("atp") if f.parts[0] not in ("atp", "..")
              and not f.parts[0].endswith((".dist-info", ".data"))})
assert not top, f"wheel installs top-level names besides atp: {top}"
for name in ("optimizer", "predictor", "sequencer", "goal_lists", "site_configs"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    else:
        sys.exit(f"`import {name}` works outside the repository: it must not")
    importlib.import_module(f"atp.{name}")
print("wheel: atp is the only top-level package; atp.optimizer etc. import")
PYEOF
)
run_demo demo-core
echo "bare wheel: atp demo ok (core dependencies only)"

"${PIP[@]}" "$WHEEL[ml,report]"
run_demo demo-full
test -s "$WORK/demo-full/report.html"
echo "wheel [ml,report]: atp demo ok"
rm -rf "$WORK"
