# Sourced by call1.sh / call2.sh on the GPU machine (run from the repository root):
# atp laid out as it installs (stages under the atp namespace) without a build step.
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PY:-python3}
if [ ! -d /tmp/src/atp/predictor ]; then
    rm -rf /tmp/src && mkdir -p /tmp/src && cp -r atp /tmp/src/atp
    for d in optimizer predictor sequencer goal_lists site_configs scorecards; do
        cp -r "$d" "/tmp/src/atp/$d"
    done
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/src:/tmp/site
atp() { $PY -P -c 'import sys; from atp.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
DATA=/root/okbp
STAGE2=${STAGE2:-okbp_stage2g}
S1RECIPE=${S1RECIPE:-okbp_stage1g}  # okbp_stage1gw: the wider, more regularised Stage 1
STAGE1=${STAGE1:-predictor/weights/cascade.pt}
