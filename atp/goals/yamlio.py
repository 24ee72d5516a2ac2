"""YAML reading for goal lists and overlays: :mod:`atp.yamlio` (the one YAML reader of
atp: safe, bounded, line numbers kept) with :class:`~atp.errors.GoalListError` as the
error class."""

from __future__ import annotations

import os

from atp import yamlio as _yamlio
from atp.errors import GoalListError
from atp.yamlio import LineDict, LineList


def loads_yaml(text: str, file: str | None = None):
    """Parse goal-list YAML text (``file`` is only used in messages)."""
    return _yamlio.loads_yaml(text, file, error=GoalListError)


def load_yaml(path: str | os.PathLike):
    """Read and parse a goal-list / overlay YAML file, keeping line numbers."""
    return _yamlio.load_yaml(path, error=GoalListError)


__all__ = ["LineDict", "LineList", "load_yaml", "loads_yaml"]
