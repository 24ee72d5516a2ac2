#!/bin/bash
# GPU chunk, call 1 of 2 (training/README.md): unpack half A of the packed train split,
# the GPU tests, and timing probes of both recipes run side by side (call2.sh sizes the
# schedules from them). Carry: .devdata/a .whl
set -u
source training/gpu/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, cupy; print('torch', torch.__version__, torch.cuda.is_available(), 'cupy', cupy.__version__)"
mkdir -p $DATA/train
$PY -m training.openkbp_pack unpack .devdata/a $DATA/train --workers 16 || exit 1
$PY - <<'PY' || exit 1
import torch
ck = torch.load("training/runs/okbp_stage2s/cascade.pt", weights_only=True)
torch.save(ck["stage1"], "/root/stage1_e39.pt")
PY
rm -rf /root/probe1 /root/probe2
atp train --config okbp_stage1g --data $DATA --out /root/probe1 --limit 30 --selection 2 \
    --epochs 1 --steps-per-epoch ${PROBE_STEPS:-150} --encode-workers 7 --quiet > /root/probe1.log 2>&1 &
atp train --config okbp_stage2g --stage1 /root/stage1_e39.pt --data $DATA --out /root/probe2 \
    --limit 30 --selection 2 --epochs 1 --steps-per-epoch ${PROBE_STEPS:-150} --encode-workers 7 --quiet \
    > /root/probe2.log 2>&1 &
wait
tail -n 3 /root/probe1.log /root/probe2.log
$PY -P -m pytest -q -m gpu -p no:cacheprovider --import-mode=append tests/test_dose_gpu.py tests/test_optimizer.py \
    tests/test_fastpath_pipeline.py 2>&1 | tail -n 5
