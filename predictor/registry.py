"""Named predictors: built-ins, shipped CNN weights, and third-party entry points.

``get("baseline")`` returns a ready-to-use predictor. Third parties (e.g. a TPS vendor)
register theirs without editing atp, through the ``atp.predictors`` entry-point group::

    [project.entry-points."atp.predictors"]
    vendor-model = "vendor_pkg.module:make_predictor"   # a zero-argument factory

or at run time with ``register(name, factory)``. Asking for a name that is not
installed raises :class:`~atp.errors.BackendUnavailableError` listing what is.

The default predictor (``default_predictor_name()``) is the shipped predictor with the
best validation dose score recorded in ``predictor/weights/shipped.json`` among those
that can run here (the CNNs need torch).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from atp.predictor.base import Predictor

from atp.errors import BackendUnavailableError, InputError

ENTRY_POINT_GROUP = "atp.predictors"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_INDEX = WEIGHTS_DIR / "shipped.json"
FALLBACK_DEFAULT = "baseline"

Factory = Callable[[], Predictor]
_FACTORIES: dict[str, Factory] = {}
_ENTRY_POINTS_LOADED = False


def register(name: str, factory: Factory, *, replace: bool = False) -> None:
    """Make ``factory`` (a zero-argument callable returning a Predictor) known as ``name``."""
    if not isinstance(name, str) or not name.strip():
        raise InputError("predictor name must be a non-empty string", field="name")
    if not callable(factory):
        raise InputError(f"factory for predictor '{name}' is not callable", field=name)
    if name in _FACTORIES and not replace:
        raise InputError(f"predictor '{name}' is already registered", field=name)
    _FACTORIES[name] = factory


def unregister(name: str) -> None:
    _FACTORIES.pop(name, None)


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _FACTORIES:
            continue
        _FACTORIES[ep.name] = _lazy_entry_point(ep)


def _lazy_entry_point(ep) -> Factory:
    def factory():
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party package must say which one
            raise BackendUnavailableError(
                f"predictor '{ep.name}' (entry point {ep.value}) failed to load: {exc}"
            ) from exc
        return obj() if callable(obj) and not isinstance(obj, Predictor) else obj
    return factory


def available() -> list[str]:
    """Names of every registered predictor (built-in, shipped, entry points)."""
    _register_builtins()
    _load_entry_points()
    return sorted(_FACTORIES)


def get(spec) -> Predictor:
    """A predictor from a name, an instance, or a dict ``{"name": ..., **ignored}``."""
    if isinstance(spec, dict):
        if "name" not in spec:
            raise InputError("predictor spec needs a 'name'", field="predictor")
        spec = spec["name"]
    if not isinstance(spec, str):
        if isinstance(spec, Predictor):
            return spec
        raise InputError(f"not a predictor: {spec!r}", field="predictor")
    names = available()
    if spec not in _FACTORIES:
        raise BackendUnavailableError(
            f"unknown predictor '{spec}'; installed: {', '.join(names)}. Third-party "
            f"predictors register through the '{ENTRY_POINT_GROUP}' entry-point group.")
    pred = _FACTORIES[spec]()
    if not isinstance(pred, Predictor):
        raise BackendUnavailableError(
            f"predictor '{spec}' factory returned {type(pred).__name__}, which has no "
            "name/predict(patient)")
    return pred


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


def default_predictor_name() -> str:
    """The shipped predictor with the lowest validation dose score that can run here."""
    best, best_score = FALLBACK_DEFAULT, float("inf")
    for name, entry in shipped_index().items():
        score = entry.get("validation", {}).get("dose_score_gy")
        if score is None or not _runnable(entry):
            continue
        if score < best_score and (WEIGHTS_DIR / entry.get("file", "")).is_file():
            best, best_score = name, float(score)
    return best


# --- built-ins -----------------------------------------------------------------------
_BUILTINS_DONE = False


def _register_builtins() -> None:
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True

    def baseline():
        from atp.predictor.baseline import DistanceBaseline

        return DistanceBaseline().load()

    def mean_dose():
        from atp.predictor.baseline import MeanDosePredictor

        return MeanDosePredictor().load()

    _FACTORIES.setdefault("baseline", baseline)
    _FACTORIES.setdefault("mean-dose", mean_dose)
    for name, entry in shipped_index().items():
        if name in _FACTORIES or "file" not in entry or entry.get("kind") != "cnn":
            continue
        _FACTORIES[name] = _cnn_factory(name, WEIGHTS_DIR / entry["file"])


def _cnn_factory(name: str, path: Path) -> Factory:
    def factory():
        if importlib.util.find_spec("torch") is None:
            raise BackendUnavailableError(
                f"predictor '{name}' needs PyTorch: pip install 'atp[ml]'")
        from atp.predictor.cnn import CNNPredictor

        return CNNPredictor.from_checkpoint(path, name=name)
    return factory
