"""Prescriptions for imports whose data do not carry one (DICOM CT + RTSTRUCT).

Sidecar YAML (``prescription.yaml`` beside the DICOM files, or any file given with
``--prescription-file``)::

    fractions: 35
    targets:          # target name (canonical or any alias) -> total dose in Gy
      PTV_70: 70
      PTV56: 56

Where a prescription comes from, first that applies:

1. explicit values (``prescriptions={"PTV_70": 70}``, CLI ``--rx PTV_70=70``);
2. the sidecar's ``targets``;
3. the dose in each target's name (``PTV_70`` -> 70 Gy, see :mod:`atp.names`).

The number of fractions comes from the explicit value (``--fractions``), else the
sidecar; without it the import stops with an error that says how to give it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from atp.errors import InputError, StructureError, quote
from atp.names import AliasTable, canonical_name, target_dose_from_name
from atp.patient import Prescription, Role, Structure
from atp.yamlio import load_yaml

SIDECAR_NAMES = ("prescription.yaml", "prescription.yml")
HOW_TO = ("give it with --rx TARGET=GY and --fractions N, or a prescription.yaml "
          "(fractions: N, targets: {PTV_70: 70}) beside the DICOM files or via "
          "--prescription-file")


@dataclass(frozen=True)
class PrescriptionSpec:
    """Contents of a sidecar: fractions (or None) and target name -> dose in Gy."""

    fractions: int | None = None
    targets: Mapping[str, float] = field(default_factory=dict)
    source: str | None = None
    lines: Mapping[str, int] = field(default_factory=dict)  # field -> YAML line


def _key_lines(data, prefix: str = "") -> dict[str, int]:
    """Field path -> 1-based line for the keys of a YAML mapping read by
    :func:`atp.yamlio.load_yaml` (2 levels)."""
    out: dict[str, int] = {}
    if isinstance(data, dict) and hasattr(data, "line_of"):
        for k, v in data.items():
            name = f"{prefix}{k}"
            out[name] = data.line_of(k)
            if not prefix:
                out.update(_key_lines(v, prefix=f"{name}."))
    return out


MAX_FRACTIONS = 100


def _finite(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _fractions(value, *, file=None, line=None, field_name="fractions") -> int:
    if not _finite(value) or value != int(value) or not 1 <= int(value) <= MAX_FRACTIONS:
        raise InputError(f"fractions must be a whole number 1..{MAX_FRACTIONS}, got "
                         f"{quote(value)}", file=file, field=field_name, line=line)
    return int(value)


def _dose(value, *, file=None, field_name=None, line=None) -> float:
    if not _finite(value) or not 0 < float(value) < 1000:
        raise InputError(f"dose must be a number of Gy in (0, 1000), got {quote(value)}",
                         file=file, field=field_name, line=line)
    return float(value)


def load_prescription_file(path: str | Path) -> PrescriptionSpec:
    """Read and validate a sidecar YAML (errors name the file, field and line)."""
    path = Path(path)
    data = load_yaml(path, what="prescription file")
    lines = _key_lines(data)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError("expected a mapping with 'fractions' and 'targets'", file=path)
    unknown = set(data) - {"fractions", "targets"}
    if unknown:
        name = quote(min(map(str, unknown)), repr_=False)
        raise InputError("unknown key; expected 'fractions' and 'targets'", file=path,
                         field=name, line=lines.get(name))
    fx = None
    if data.get("fractions") is not None:
        fx = _fractions(data["fractions"], file=path, line=lines.get("fractions"))
    targets_raw = data.get("targets") or {}
    if not isinstance(targets_raw, dict):
        raise InputError("must map target names to doses in Gy", file=path, field="targets",
                         line=lines.get("targets"))
    targets = {}
    for name, dose in targets_raw.items():
        if not isinstance(name, str) or not name.strip():
            raise InputError("target names must be text", file=path,
                             field=f"targets.{quote(name, repr_=False)}",
                             line=lines.get(f"targets.{name}"))
        fname = f"targets.{name}"
        targets[str(name)] = _dose(dose, file=path, field_name=fname, line=lines.get(fname))
    return PrescriptionSpec(fx, targets, str(path), lines)


def find_sidecar(folder: str | Path) -> Path | None:
    """The ``prescription.yaml`` (or ``.yml``) in ``folder``, if there is one."""
    for name in SIDECAR_NAMES:
        p = Path(folder) / name
        if p.is_file():
            return p
    return None


def _match_target(name: str, structures: Mapping[str, Structure],
                  table: AliasTable | None) -> str | None:
    if name in structures:
        return name
    canon = canonical_name(name, table)
    if canon in structures:
        return canon
    for s in structures.values():  # original spelling from the source data
        if s.original_name == name:
            return s.name
    return None


def resolve_prescriptions(structures: Mapping[str, Structure], *,
                          explicit: Mapping[str, float] | None = None,
                          fractions: int | None = None,
                          sidecar: PrescriptionSpec | None = None,
                          source: str | None = None,
                          alias_table: AliasTable | None = None) -> tuple[Prescription, ...]:
    """Prescriptions for ``structures`` by the precedence in the module docstring.

    Raises InputError when no prescription or no number of fractions can be found, or
    when a named target is not among the structures / not a target.
    """
    if explicit:
        where, given, lines = "--rx", dict(explicit), {}
        for k, v in given.items():
            _dose(v, file=source, field_name=f"--rx {k}")
    elif sidecar is not None and sidecar.targets:
        where, given, lines = sidecar.source, dict(sidecar.targets), sidecar.lines
    else:
        where, given, lines = None, {}, {}
    fx = fractions if fractions is not None else (sidecar.fractions if sidecar else None)
    if fx is not None:
        fx = _fractions(fx, file=source, field_name="--fractions" if fractions is not None
                        else "fractions")
    doses: dict[str, float] = {}
    if given:
        for name, dose in given.items():
            field_name = f"targets.{name}" if where != "--rx" else f"--rx {name}"
            file = where if where != "--rx" else source
            target = _match_target(name, structures, alias_table)
            if target is None:
                targets = sorted(n for n, s in structures.items() if s.role == Role.TARGET)
                raise StructureError(f"prescribed target '{name}' is not among the "
                                     f"structures; targets found: {targets}", file=file,
                                     field=field_name, line=lines.get(field_name))
            if structures[target].role != Role.TARGET:
                raise StructureError(f"'{name}' is a {structures[target].role.value}, not a "
                                     "target", file=file, field=field_name,
                                     line=lines.get(field_name))
            doses[target] = float(dose)
    else:
        for name, s in structures.items():
            if s.role == Role.TARGET:
                dose = target_dose_from_name(name)
                if dose is not None:
                    doses[name] = dose
        if not doses:
            raise InputError("no prescription: no target name carries a dose (like "
                             f"PTV_70); {HOW_TO}", file=source, field="prescriptions")
    if fx is None:
        raise InputError(f"number of fractions unknown; {HOW_TO}", file=source,
                         field="fractions")
    return tuple(Prescription(t, d, fx) for t, d in doses.items())


__all__ = [
    "SIDECAR_NAMES",
    "PrescriptionSpec",
    "find_sidecar",
    "load_prescription_file",
    "resolve_prescriptions",
]
