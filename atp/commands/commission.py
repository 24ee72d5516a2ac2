"""``atp commission [--json] [--beam-model FILE]``: the beam model in water vs reference data.

10 x 10 cm^2 field at SSD 100 cm: PDD at 1.5 / 5 / 10 / 20 cm, depth of maximum dose and
80-20 % penumbra at 10 cm depth, next to the reference values and their sources.
"""

from __future__ import annotations

from atp.commands.common import add_hidden_alias, print_json


def register(sub) -> None:
    p = sub.add_parser("commission", help="check the photon beam model against reference "
                                          "water data (10x10 field, SSD 100 cm)")
    p.add_argument("--beam-model", help="beam-model JSON (default: built-in 6 MV; the same "
                                        "option as `atp dij --beam-model`)")
    add_hidden_alias(p, "--model", "--beam-model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from atp.dose.beam_model import PhotonBeamModel
    from atp.dose.commission import commission

    res = commission(PhotonBeamModel.load(args.beam_model))
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
    for s in res["sources"]:
        print(f"  source: {s}")
    return 0
