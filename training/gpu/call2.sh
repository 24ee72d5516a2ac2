#!/bin/bash
# GPU chunk, call 2 of 2, on the machine call1.sh left warm: unpack half B, train
# okbp_stage1g and okbp_stage2g side by side for BUDGET_S seconds (the schedules sized
# from call 1's probes), return the best weights and logs under $OUT. Carry: .devdata/b .whl
set -u
source training/gpu/common.sh
[ "$(ls $DATA/train 2>/dev/null | wc -l)" -ge 85 ] && [ -f /root/probe2/train.log ] \
    || { echo "call 1's files are gone (a new machine): run call1.sh first"; exit 3; }
$PY -m training.openkbp_pack unpack .devdata/b $DATA/train --workers 16 || exit 1
[ "$(ls $DATA/train/*.npz | wc -l)" = 169 ] || { echo "expected 169 patients"; exit 1; }
B=${BUDGET_S:-400}
read E1 E2 < <($PY training/gpu/size_epochs.py /root/probe1/train.log \
    /root/probe2/train.log "$B" 149)
echo "epochs: stage1g $E1, $STAGE2 $E2 (budget $B s)"
M=$($PY -c "print(round(($B + 45) / 60, 2))")
rm -rf /root/s1g /root/s2g
atp train --config $S1RECIPE --data $DATA --out /root/s1g --epochs "$E1" \
    --encode-workers 8 --max-minutes "$M" --checkpoint-minutes 2 --quiet \
    > /root/s1g.console 2>&1 &
atp train --config $STAGE2 --stage1 $STAGE1 --data $DATA --out /root/s2g \
    --epochs "$E2" --encode-workers 8 --max-minutes "$M" --checkpoint-minutes 2 --quiet \
    > /root/s2g.console 2>&1 &
wait
tail -n 2 /root/s1g.console /root/s2g.console
for r in s1g s2g; do
    (cd /root/$r && tar cf "$OUT/$r.tar" --exclude=cache --exclude=last.pt .)
done
ls -la "$OUT"
