"""Water measurements of a photon beam (CSV): the rows :mod:`atp.dose.fit` fits and
:mod:`atp.dose.commission` reports.

The format is documented at the top of ``atp/data/photon_6mv_reference.csv`` (the
representative data atp ships with): ``quantity,field_x_cm,field_y_cm,depth_cm,
off_axis_cm,value,use`` with quantity one of ``pdd`` (SSD 100 cm, % of the curve's
maximum), ``output_factor`` (10 cm depth, isocentre at that depth, relative to 10 x 10),
``oar`` (off-axis ratio, SSD 100 cm) and ``penumbra_80_20_mm`` (x profile, SSD 100 cm);
``use`` is ``fit`` or ``holdout``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atp.errors import InputError

DEFAULT_REFERENCE = Path(__file__).resolve().parents[1] / "data" / "photon_6mv_reference.csv"
QUANTITIES = ("pdd", "output_factor", "oar", "penumbra_80_20_mm")
COLUMNS = ("quantity", "field_x_cm", "field_y_cm", "depth_cm", "off_axis_cm", "value", "use")


@dataclass(frozen=True)
class Measurement:
    quantity: str
    field_x_cm: float
    field_y_cm: float
    depth_cm: float
    off_axis_cm: float
    value: float
    use: str

    @property
    def field_key(self) -> tuple[float, float]:
        return (self.field_x_cm, self.field_y_cm)


def read_measurements(path: str | os.PathLike | None = None) -> list[Measurement]:
    """Rows of a measurement CSV (``#`` lines are comments); InputError names the file,
    line and column of the first bad value."""
    path = Path(path) if path is not None else DEFAULT_REFERENCE
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read measurements: {exc}", file=path) from None
    body = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip()
            .startswith("#")]
    if not body:
        raise InputError("no header and no rows", file=path, field="quantity")
    header = next(csv.reader([body[0][1]]))
    header = [h.strip() for h in header]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise InputError(f"missing column(s) {missing} (need {','.join(COLUMNS)})",
                         file=path, field=missing[0])
    out = []
    for lineno, ln in body[1:]:
        row = dict(zip(header, (x.strip() for x in next(csv.reader([ln])))))
        where = f"{path}:{lineno}"
        q = row.get("quantity", "")
        if q not in QUANTITIES:
            raise InputError(f"line {lineno}: quantity {q!r} is not one of {QUANTITIES}",
                             file=where, field="quantity")
        vals = {}
        for c in COLUMNS[1:6]:
            try:
                vals[c] = float(row.get(c, ""))
            except ValueError:
                raise InputError(f"line {lineno}: {c} {row.get(c)!r} is not a number",
                                 file=where, field=c) from None
            if not np.isfinite(vals[c]):
                raise InputError(f"line {lineno}: {c} is not finite", file=where, field=c)
        if not (0.5 <= vals["field_x_cm"] <= 45 and 0.5 <= vals["field_y_cm"] <= 45):
            raise InputError(f"line {lineno}: field sides must be 0.5-45 cm", file=where,
                             field="field_x_cm")
        if not (0.0 <= vals["depth_cm"] <= 40.0):
            raise InputError(f"line {lineno}: depth_cm must be 0-40", file=where,
                             field="depth_cm")
        if vals["value"] <= 0:
            raise InputError(f"line {lineno}: value must be > 0", file=where, field="value")
        use = row.get("use", "") or "fit"
        if use not in ("fit", "holdout"):
            raise InputError(f"line {lineno}: use {use!r} must be fit or holdout",
                             file=where, field="use")
        out.append(Measurement(q, vals["field_x_cm"], vals["field_y_cm"], vals["depth_cm"],
                               vals["off_axis_cm"], vals["value"], use))
    if not any(m.quantity == "pdd" and m.use == "fit" for m in out):
        raise InputError("no pdd rows to fit", file=path, field="quantity")
    return out
