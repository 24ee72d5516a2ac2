"""Refit the shipped 6 MV beam model to the shipped reference table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fit_beam_model.py [--write] [--evaluations N]

Least squares (:func:`atp.dose.fit.fit_model`) on the ``fit`` rows of
``atp/data/photon_6mv_reference.csv``, starting from the current
``atp/data/photon_6mv.json``; prints the commissioning summary (fitted and held-back
fields). ``--write`` stores the parameters and the fit residuals in
``atp/data/photon_6mv.json`` (name, sources and calibration kept). A clinic refits to its
own data with ``atp commission --fit measured.csv --out model.json`` instead.
"""

from __future__ import annotations

import argparse
import json

from atp.dose.beam_model import DEFAULT_MODEL, PhotonBeamModel
from atp.dose.commission import commission
from atp.dose.fit import DEFAULT_REFERENCE, fit_model, model_json, read_measurements


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--evaluations", type=int, default=400)
    args = ap.parse_args()
    base = PhotonBeamModel.load()
    rows = read_measurements()
    model, info = fit_model(rows, base, max_nfev=args.evaluations)
    print(json.dumps(info))
    print(json.dumps(commission(model)["summary"], indent=1))
    if args.write:
        old = json.loads(DEFAULT_MODEL.read_text())
        doc = model_json(model, info, "atp/data/photon_6mv_reference.csv",
                         old.get("description"))
        doc["name"], doc["reference"] = old.get("name", model.name), old.get("reference", {})
        doc["fit"]["command"] = ("atp commission --fit atp/data/photon_6mv_reference.csv "
                                 "--out model.json")
        DEFAULT_MODEL.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {DEFAULT_MODEL} (data {DEFAULT_REFERENCE.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
