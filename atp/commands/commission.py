"""``atp commission [--json] [--beam-model FILE]``: the beam model in water vs reference data.

10 x 10 cm^2 field at SSD 100 cm: PDD at 1.5 / 5 / 10 / 20 cm, depth of maximum dose and
80-20 % penumbra at 10 cm depth; then per square field (2-40 cm) and per held-back field
(``fields`` in the JSON): d_max, PDD at 5 / 10 / 20 cm, output factor at 10 cm depth and
penumbra, each beside its reference value. ``--fit measured.csv --out model.json`` refits
the model to a clinic's data first (format: the header of
``atp/data/photon_6mv_reference.csv``) and then reports against that data.
"""

from __future__ import annotations

import json
from pathlib import Path

from atp.commands.common import add_hidden_alias, print_json
from atp.errors import InputError
from atp.outputs import check_output_file, write_json

# CLI start-up: the CLI imports every command to build its parser, so the beam model,
# the water-phantom commissioning and the forward dose load inside the functions that
# use them (marked "lazy: CLI start-up")


def register(sub) -> None:
    p = sub.add_parser("commission", help="check the photon beam model against reference "
                                          "water data (10x10 field, SSD 100 cm)")
    p.add_argument("--beam-model", help="beam-model JSON (default: built-in 6 MV; the same "
                                        "option as `atp dij --beam-model`)")
    add_hidden_alias(p, "--model", "--beam-model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--data", help="measurement CSV to compare with (format: the header of "
                                  "atp/data/photon_6mv_reference.csv; default: that file)")
    p.add_argument("--fit", metavar="CSV", help="refit the beam model to this measurement "
                                               "CSV (its 'fit' rows) and write it to --out")
    p.add_argument("--out", help="with --fit: beam-model JSON to write (must not exist); "
                                 "use it with --beam-model here and in atp dij/plan")
    p.add_argument("--machine", default="millennium120",
                   help="machine model for the 'mlc' block (closed-MLC transmission "
                        "measured through atp dose; shipped name or YAML)")
    p.add_argument("--max-evaluations", type=int, default=400,
                   help="with --fit: most model evaluations of the least-squares fit")
    p.set_defaults(func=run)


def _fit(args) -> int:  # lazy: CLI start-up
    from atp.dose.beam_model import PhotonBeamModel
    from atp.dose.fit import fit_model, model_json, read_measurements

    if not args.out:
        raise InputError("--fit needs --out FILE (the beam-model JSON to write)",
                         field="--out")

    def ours(path) -> bool:  # a beam model atp fitted (replaced), nothing else
        d = json.loads(Path(path).read_text())
        return isinstance(d, dict) and "parameters" in d and "data" in d.get("fit", {})

    out = check_output_file(args.out, recognise=ours, what="a beam model atp fitted")
    rows = read_measurements(args.fit)
    if args.max_evaluations < 1:
        raise InputError("--max-evaluations must be >= 1", field="--max-evaluations")
    model, summary = fit_model(rows, PhotonBeamModel.load(args.beam_model),
                               max_nfev=args.max_evaluations)
    write_json(out, model_json(model, summary, str(args.fit)))
    print(f"wrote {out} ({summary['parameters']} parameters, {summary['residuals']} "
          f"residuals, weighted rms {summary['rms_weighted']})")
    args.beam_model, args.data = str(out), args.fit
    return 0


def run(args) -> int:  # lazy: CLI start-up
    from atp.dose.beam_model import PhotonBeamModel
    from atp.dose.commission import commission
    from atp.forward import closed_field_transmission

    if args.fit:
        _fit(args)
    elif args.out:
        raise InputError("--out is written only with --fit CSV", field="--out")
    res = commission(PhotonBeamModel.load(args.beam_model), args.data)
    res["mlc"] = closed_field_transmission(
        args.machine, engine={"name": "pencil-beam", "model": args.beam_model})
    if args.json:
        print_json(res)
        return 0
    print(f"{res['beam_model']}: {res['setup']}, calibration {res['calibration']}")
    print(f"d_max {res['dmax_cm']} cm (reference {res['reference_dmax_cm']} cm)")
    print(f"{'depth cm':>9}{'PDD %':>9}{'ref %':>9}{'diff':>8}")
    for r in res["pdd"]:
        ref = "-" if r["reference_percent"] is None else f"{r['reference_percent']:.1f}"
        diff = "-" if r["difference_percent"] is None else f"{r['difference_percent']:+.2f}"
        print(f"{r['depth_cm']:>9}{r['pdd_percent']:>9.2f}{ref:>9}{diff:>8}")
    print(f"penumbra 80-20 % at 10 cm: {res['penumbra_80_20_mm_at_10cm']} mm (reference "
          f"{res['reference_penumbra_80_20_mm_at_10cm']} mm)")
    print(f"{'field':>7}{'use':>8}{'dmax':>6}{'PDD5':>7}{'PDD10':>7}{'PDD20':>7}"
          f"{'worst>dmax':>11}{'OF10':>7}{'ref':>7}{'diff%':>7}{'pen mm':>8}")
    for f in res["fields"]:
        p = {r["depth_cm"]: r for r in f["pdd"]}
        w = f["pdd_worst_beyond_dmax"]
        of = f["output_factor"]
        print(f"{f['label']:>7}{f['use'][:7]:>8}{f['dmax_cm']['value']:>6.2f}"
              + "".join(f"{p[d]['pdd_percent']:>7.1f}" for d in (5.0, 10.0, 20.0))
              + (f"{w['difference_percent']:>+11.2f}" if w else f"{'-':>11}")
              + f"{of['value']:>7.3f}" + (f"{of['reference']:>7.3f}"
                                          f"{of['difference_percent']:>+7.2f}"
                                          if of["reference"] is not None else f"{'-':>14}")
              + f"{f['penumbra_80_20_mm_at_10cm']['value']:>8.1f}")
    mlc = res["mlc"]
    print(f"MLC ({mlc['machine']}): closed-leaf field / open field at {mlc['depth_cm']:g} cm "
          f"= {mlc['transmission_percent']:.2f} % (model leaf transmission "
          f"{mlc['machine_leaf_transmission_percent']:g} %, goal 1-2 %)")
    print(f"reference data: {res['reference_data']}")
    for s in res["sources"]:
        print(f"  source: {s}")
    return 0
