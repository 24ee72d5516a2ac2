"""All exceptions atp raises on purpose, in one module.

Every input problem is an :class:`InputError` (a ``ValueError``) carrying the file and
field it concerns (and the YAML line where known), so the CLI can print one line and
exit with code 2. Callers embedding atp can catch ``ValueError`` or the specific class.
"""

from __future__ import annotations

import os


class AtpError(Exception):
    """Base class of every error atp raises deliberately."""


class InputError(AtpError, ValueError):
    """Bad user input: a file, a field of it, and what is wrong.

    Parameters
    ----------
    message: what is wrong and, where possible, what to do next.
    file: the file (or folder) the problem is in, if any.
    field: the field / key / structure / tag concerned, if any.
    line: 1-based line number (YAML), if known.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | os.PathLike | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.file = os.fspath(file) if file is not None else None
        self.field = field
        self.line = line
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = []
        if self.file:
            where.append(self.file + (f":{self.line}" if self.line else ""))
        if self.field:
            where.append(f"field '{self.field}'")
        prefix = ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class GridMismatchError(InputError):
    """Two arrays that must share a grid do not (shape, spacing or origin differ)."""


class StructureError(InputError):
    """A structure is unknown, missing, empty or otherwise unusable."""


class GoalListError(InputError):
    """A goal list or institution overlay is malformed."""


class DicomError(InputError):
    """A DICOM file or series is corrupt, incomplete or inconsistent."""


class InfeasibleError(AtpError):
    """Hard (priority-1) goals that cannot be met together."""


class BackendUnavailableError(AtpError):
    """A requested backend / device / registry entry is not installed or not present."""
