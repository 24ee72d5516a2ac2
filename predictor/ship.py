"""Record shipped predictors and their validation scores in ``weights/shipped.json``.

    python -m atp.predictor.ship --scores bench.json [--checkpoint runs/x/best.pt --name cadunet]

``bench.json`` is written by ``benchmarks/bench_predictors.py --json``. A checkpoint is
copied (float32 state, plain data) to ``weights/<name>.pt``; the registry then offers it
under ``name`` and ``default_predictor_name()`` picks the best validation dose score.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from atp.predictor.registry import SHIPPED_INDEX, WEIGHTS_DIR

from atp.errors import InputError
from atp.outputs import write_json

BUILTIN_FILES = {"baseline": "baseline.json", "mean-dose": "mean_dose.json"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scores", required=True, help="bench_predictors.py --json output")
    ap.add_argument("--checkpoint", action="append", default=[],
                    help="NAME=PATH of a best.pt to ship (repeatable)")
    ap.add_argument("--sites", default="hn,nasopharynx",
                    help="comma-separated disease sites the checkpoints apply to (default "
                         "hn,nasopharynx: the OpenKBP head-and-neck data)")
    args = ap.parse_args(argv)
    bench = json.loads(Path(args.scores).read_text())
    results = bench["results"]
    index = json.loads(SHIPPED_INDEX.read_text()) if SHIPPED_INDEX.is_file() else {}
    preds = index.setdefault("predictors", {})
    for name, fname in BUILTIN_FILES.items():
        if name in results:
            preds[name] = {"kind": "builtin", "file": fname, "needs": [],
                           "validation": _scores(results[name], bench)}
    for item in args.checkpoint:
        name, _, path = item.partition("=")
        src = Path(path)
        if not src.is_file():
            raise InputError("checkpoint not found", file=src)
        key = src.stem if src.stem in results else name
        if key not in results:
            raise InputError(f"no scores for '{key}' in the benchmark file", file=args.scores)
        dst = WEIGHTS_DIR / f"{name}.pt"
        shutil.copyfile(src, dst)
        preds[name] = {"kind": "cnn", "file": dst.name, "needs": ["torch"],
                       "sites": [x.strip() for x in args.sites.split(",") if x.strip()],
                       "validation": _scores(results[key], bench)}
    index["note"] = ("validation = OpenKBP validation split scores (predictor.scoring); "
                     "the default predictor is the runnable one with the lowest dose score")
    write_json(SHIPPED_INDEX, index)
    print(json.dumps(index, indent=2))
    return 0


def _scores(r: dict, bench: dict) -> dict:
    return {"split": bench.get("split"), "n_patients": bench.get("n_patients"),
            "dose_score_gy": round(r["dose_score_gy"], 4),
            "dvh_score_gy": round(r["dvh_score_gy"], 4),
            "median_predict_s_cpu": round(r["median_predict_s"], 3)}


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
