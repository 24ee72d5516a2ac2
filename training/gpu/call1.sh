#!/bin/bash
# GPU chunk, call 1 of 2 (training/README.md): unpack half A of the packed train split,
# the GPU tests, and timing probes of both recipes run side by side (call2.sh sizes the
# schedules from them). Carry: .devdata/a .whl
# STAGE2 (default okbp_stage2g): the Stage-2 recipe; STAGE1 (default the shipped
# cascade): the Stage 1 its selection runs; GPU_TESTS=0 skips the tests.
set -u
source training/gpu/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, cupy; print('torch', torch.__version__, torch.cuda.is_available(), 'cupy', cupy.__version__)"
mkdir -p $DATA/train
$PY -m training.openkbp_pack unpack .devdata/a $DATA/train --workers 16 || exit 1
rm -rf /root/probe1 /root/probe2
atp train --config $S1RECIPE --data $DATA --out /root/probe1 --limit 30 --selection 2 \
    --epochs 1 --steps-per-epoch ${PROBE_STEPS:-150} --encode-workers 7 --quiet > /root/probe1.log 2>&1 &
atp train --config $STAGE2 --stage1 $STAGE1 --data $DATA --out /root/probe2 \
    --limit 30 --selection 2 --epochs 1 --steps-per-epoch ${PROBE_STEPS:-150} --encode-workers 7 --quiet \
    > /root/probe2.log 2>&1 &
wait
tail -n 3 /root/probe1.log /root/probe2.log
[ "${GPU_TESTS:-1}" = 0 ] || $PY -P -m pytest -q -m gpu -p no:cacheprovider --import-mode=append tests/test_dose_gpu.py tests/test_optimizer.py \
    tests/test_fastpath_pipeline.py 2>&1 | tail -n 5
