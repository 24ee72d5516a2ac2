"""atp: clinical-goal-guided hybrid automated radiotherapy treatment planning.

Core package: patient model, IO, dose engine, DVH/metrics, goal-list language, the
planning pipeline and the CLI. Stages live in the sibling packages ``predictor``,
``optimizer`` and ``sequencer``.
"""

import importlib
import os

# Intel MKL (torch's CPU BLAS) picks its kernels by the CPU it runs on, so the fast path's
# plans differed in the last bits between two x86 machines (and then, through the
# iterations, by up to 0.5 Gy). Its conditional-numerical-reproducibility mode makes the
# results the same on every x86 CPU, at no measurable cost here (the phantom's fast plan
# 4.8-5.5 s either way). Read when MKL first runs: a program that used torch before
# importing atp keeps its own setting, as does one that sets MKL_CBWR itself.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

from atp.errors import InputError
from atp.grid import Grid
from atp.patient import Patient, Prescription, Role, Structure
from atp.version import __version__

__all__ = ["Grid", "InputError", "Patient", "Plan", "Prescription", "Role", "Structure",
           "__version__", "load_plan", "plan", "replan", "respare"]

#: the top floor's entry points, by the module that holds each
_LAZY = {"plan": "atp.pipeline", "replan": "atp.pipeline", "Plan": "atp.plans",
         "load_plan": "atp.plans", "respare": "atp.fastplan"}


def __getattr__(name):
    if name in _LAZY:
        # lazy: `import atp` stays light (no stage is imported); the top floor loads on
        # first use
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'atp' has no attribute {name!r}")
