"""atp: clinical-goal-guided hybrid automated radiotherapy treatment planning.

Core package: patient model, IO, dose engine, DVH/metrics, goal-list language, the
planning pipeline and the CLI. Stages live in the sibling packages ``predictor``,
``optimizer`` and ``sequencer``.
"""

__version__ = "0.1.0"

from atp.errors import InputError  # noqa: E402
from atp.grid import Grid  # noqa: E402
from atp.patient import Patient, Prescription, Role, Structure  # noqa: E402

__all__ = ["Grid", "InputError", "Patient", "Prescription", "Role", "Structure", "__version__"]
