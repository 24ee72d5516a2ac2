"""atp: clinical-goal-guided hybrid automated radiotherapy treatment planning.

Core package: patient model, IO, dose engine, DVH/metrics, goal-list language, the
planning pipeline and the CLI. Stages live in the sibling packages ``predictor``,
``optimizer`` and ``sequencer``.
"""

__version__ = "0.1.0"

from atp.errors import InputError
from atp.grid import Grid
from atp.patient import Patient, Prescription, Role, Structure

__all__ = ["Grid", "InputError", "Patient", "Plan", "Prescription", "Role", "Structure",
           "__version__", "load_plan", "plan"]

_PIPELINE_NAMES = ("plan", "load_plan", "Plan")


def __getattr__(name):  # lazy: `import atp` stays light; the pipeline loads on first use
    if name in _PIPELINE_NAMES:
        from atp import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'atp' has no attribute {name!r}")
