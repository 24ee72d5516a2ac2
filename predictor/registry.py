"""Named predictors: built-ins, shipped CNN weights, and third-party entry points.

``get("baseline")`` returns a ready-to-use predictor. Third parties (e.g. a TPS vendor)
register theirs without editing atp, through the ``atp.predictors`` entry-point group::

    [project.entry-points."atp.predictors"]
    vendor-model = "vendor_pkg.module:make_predictor"   # a zero-argument factory

or at run time with ``register(name, factory)`` (one :class:`atp.registry.Registry`,
``PREDICTORS``). Asking for a name that is not installed raises
:class:`~atp.errors.BackendUnavailableError` listing what is; a plug-in that fails to load
raises :class:`atp.registry.PluginError` naming its entry point (``atp list`` shows it as
broken).

The default predictor (``default_predictor_name(site)``) is the shipped predictor with the
best validation dose score recorded in ``predictor/weights/shipped.json`` among those
that can run here (the CNNs need torch) and were trained for the plan's site (an entry's
``sites``: the shipped networks are head-and-neck only, so other sites get the baseline).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from atp.predictor.base import Predictor

from atp.errors import BackendUnavailableError, InputError
from atp.registry import Registry

ENTRY_POINT_GROUP = "atp.predictors"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_INDEX = WEIGHTS_DIR / "shipped.json"
FALLBACK_DEFAULT = "baseline"


# The predictors' modules load inside their factories (marked "lazy: CLI start-up"): the
# baseline's and the CNN's import scipy.ndimage and the OpenKBP reader (pydicom), which
# listing the names (`atp list`) does not need.


def _baseline() -> Predictor:
    from atp.predictor.baseline import DistanceBaseline  # lazy: CLI start-up
    return DistanceBaseline().load()


def _mean_dose() -> Predictor:
    from atp.predictor.baseline import MeanDosePredictor  # lazy: CLI start-up
    return MeanDosePredictor().load()


def _builtins() -> dict:
    """baseline, mean-dose and every shipped CNN of ``weights/shipped.json``."""
    out = {"baseline": _baseline, "mean-dose": _mean_dose}
    for name, entry in shipped_index().items():
        if name not in out and "file" in entry and entry.get("kind") == "cnn":
            out[name] = _cnn_factory(name, WEIGHTS_DIR / entry["file"])
    return out


PREDICTORS = Registry("predictor", ENTRY_POINT_GROUP, methods=("predict",),
                      attributes=("name",), builtins=_builtins)
register = PREDICTORS.register
unregister = PREDICTORS.unregister
available = PREDICTORS.names


def get(spec) -> Predictor:
    """A predictor from a name, an instance, or a dict ``{"name": ..., **ignored}``."""
    if isinstance(spec, dict):
        if "name" not in spec:
            raise InputError("predictor spec needs a 'name'", field="predictor")
        spec = spec["name"]
    return PREDICTORS.get(spec)


def shipped_index() -> dict:
    """The shipped-weights index: name -> {file, validation scores, needs}."""
    if not SHIPPED_INDEX.is_file():
        return {}
    try:
        data = json.loads(SHIPPED_INDEX.read_text())
    except ValueError as exc:
        raise InputError(f"malformed shipped-weights index: {exc}", file=SHIPPED_INDEX) from None
    return data.get("predictors", {})


def _runnable(entry: dict) -> bool:
    return all(importlib.util.find_spec(mod) is not None for mod in entry.get("needs", []))


def default_predictor_name(site: str | None = None) -> str:
    """The shipped predictor with the lowest validation dose score that can run here and,
    when ``site`` is given, was trained for that disease site (an entry's ``sites``; none
    listed: any site). The baseline (any site) when no shipped network qualifies."""
    best, best_score = FALLBACK_DEFAULT, float("inf")
    for name, entry in shipped_index().items():
        score = entry.get("validation", {}).get("dose_score_gy")
        if score is None or not _runnable(entry):
            continue
        if site is not None and entry.get("sites") and site not in entry["sites"]:
            continue
        if score < best_score and (WEIGHTS_DIR / entry.get("file", "")).is_file():
            best, best_score = name, float(score)
    return best


def _cnn_factory(name: str, path: Path):
    def factory():
        if importlib.util.find_spec("torch") is None:
            raise BackendUnavailableError(
                f"predictor '{name}' needs PyTorch: pip install 'atp[ml]'")
        from atp.predictor.cnn import CNNPredictor  # lazy: CLI start-up
        return CNNPredictor.from_checkpoint(path, name=name)
    return factory
