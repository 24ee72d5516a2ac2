"""``atp predict PATIENT [--predictor NAME|PATH] --out pred.npy``: predicted dose in Gy.

The output is a float32 ``.npy`` on the patient grid (same axes as the patient's CT),
zero outside the body. ``--predictor`` (as in ``atp plan``; ``--model`` is its old,
hidden name) takes a registered predictor name (``atp list predictors``) or a ``.pt``
network checkpoint written by ``atp train``; the default is the best shipped predictor for
``--site`` (default hn; the shipped networks are head-and-neck only).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np

from atp.commands import common
from atp.commands.common import load_patient_from_args
from atp.errors import BackendUnavailableError
from atp.outputs import atomic_write_bytes, check_output_file, is_npy_dose


def register(sub) -> None:
    p = sub.add_parser("predict", help="predict the dose distribution of a patient")
    common.add_patient_arguments(p)
    p.add_argument("--predictor", metavar="NAME|PT",
                   help="predictor name or .pt checkpoint (default: best shipped; "
                        "`atp list predictors`)")
    common.add_hidden_alias(p, "--model", "--predictor")
    p.add_argument("--site", default=common.DEFAULT_SITE,
                   help="disease site: picks the default predictor (the shipped networks are "
                        "head-and-neck only; other sites get the baseline; default "
                        f"{common.DEFAULT_SITE})")
    p.add_argument("--out", required=True, help="output .npy (Gy on the patient grid)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    p.set_defaults(func=run)


def resolve_predictor(model: str | None, site: str | None = None):  # lazy: CLI start-up
    from atp.predictor import registry

    if model and (model.endswith(".pt") or Path(model).is_file()):
        try:  # lazy: the network predictors import torch (an optional dependency)
            from atp.predictor.cnn import CNNPredictor
        except ImportError:
            raise BackendUnavailableError("network checkpoints need PyTorch: "
                                          "pip install 'atp[ml]'") from None
        return CNNPredictor.from_checkpoint(model, name=Path(model).stem)
    return registry.get(model or registry.default_predictor_name(site))


def run(args) -> int:
    check_output_file(args.out, recognise=is_npy_dose,
                      what="a dose .npy (float32, 3-D)")  # before any work
    patient = load_patient_from_args(args)
    predictor = resolve_predictor(args.predictor, args.site)
    t0 = time.perf_counter()
    dose = predictor.predict(patient)
    seconds = time.perf_counter() - t0
    buf = io.BytesIO()
    np.save(buf, dose.astype(np.float32))
    atomic_write_bytes(args.out, buf.getvalue())
    body = patient.body_mask
    info = {"patient_id": patient.patient_id, "predictor": predictor.name,
            "out": str(Path(args.out).resolve()), "shape": list(dose.shape),
            "max_dose_gy": float(dose.max()), "mean_body_dose_gy": float(dose[body].mean()),
            "seconds": round(seconds, 3)}
    if args.json:
        common.print_json(info)
    else:
        print(f"{info['predictor']}: predicted dose for {info['patient_id']} "
              f"(max {info['max_dose_gy']:.1f} Gy, mean in body "
              f"{info['mean_body_dose_gy']:.1f} Gy, {seconds:.2f} s) -> {info['out']}")
    return 0
