"""Epochs of each GPU recipe that fit a training budget, from call1.sh's timing probes.

    python3 training/gpu/size_epochs.py PROBE1_LOG PROBE2_LOG BUDGET_S N_FIT [N_SEL]

Each probe ran one epoch of ``--steps-per-epoch`` steps on a 2-patient selection, side by
side with the other probe (so the step times include sharing the GPU). Prints the two
epoch counts. A step's time is the probe's whole training time over its steps (its warm-up
included: conservative); a selection of N_SEL patients costs the probe's per patient.
"""

import json
import sys
from pathlib import Path


def probe(log: str) -> tuple[float, float]:
    rec = cfg = None
    for line in Path(log).read_text().splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if "config" in d and cfg is None:
            cfg = d["config"]
        if "epoch" in d and "elapsed_s" in d:
            rec = d
    steps = cfg["steps_per_epoch"]
    return rec["elapsed_s"] / steps, rec.get("selection_s", 0.0) / 2.0


def main() -> None:
    log1, log2, budget, n_fit = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    n_sel = int(sys.argv[5]) if len(sys.argv) > 5 else 20
    out = []
    for log in (log1, log2):
        s_step, s_sel = probe(log)
        sel = n_sel * s_sel
        epoch = n_fit * s_step * 1.1 + 0.5  # +10 % and per-epoch validation loss
        e = int((budget - sel) / (epoch + sel / 10.0))
        out.append(max(10, min(400, e)))
        print(f"{log}: {s_step:.4f} s/step, {sel:.1f} s/selection -> {out[-1]} epochs",
              file=sys.stderr)
    print(*out)


if __name__ == "__main__":
    main()
