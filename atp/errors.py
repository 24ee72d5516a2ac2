"""All exceptions atp raises on purpose, in one module.

Every input problem is an :class:`InputError` (a ``ValueError``) carrying the file and
field it concerns (and the YAML line where known), so the CLI can print one line and
exit with code 2. Callers embedding atp can catch ``ValueError`` or the specific class.
"""

from __future__ import annotations

import os
import reprlib

QUOTE_CHARS = 80        # the most of a user's value a message quotes
MESSAGE_CHARS = 600     # the most an error message (one line) holds


class _Repr(reprlib.Repr):
    """reprlib with bounded sizes that also bounds dict / list subclasses (the YAML
    reader's LineDict / LineList), which plain reprlib would repr in full."""

    def repr1(self, x, level):
        if isinstance(x, dict) and type(x) is not dict:
            return self.repr_dict(x, level)
        if isinstance(x, list) and type(x) is not list:
            return self.repr_list(x, level)
        return super().repr1(x, level)


def quote(value, limit: int = QUOTE_CHARS, *, repr_: bool = True) -> str:
    """``repr(value)`` (or ``str`` with ``repr_=False``) for a message: one line, at most
    ``limit`` characters (an ellipsis marks a cut). Built with bounded nesting and lengths,
    so quoting a huge value costs no more than quoting a small one."""
    r = _Repr()
    r.maxstring = r.maxother = r.maxlong = limit + 2
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = 8
    r.maxlevel = 3
    if repr_ or not isinstance(value, str):
        text = r.repr(value)
    else:
        text = value[: limit * 4]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _one_line(text: str, limit: int = MESSAGE_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


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
        self.message = _one_line(message)
        self.file = _one_line(os.fspath(file), 200) if file is not None else None
        self.field = _one_line(field, 120) if field is not None else None
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


class OutputError(InputError):
    """An output location atp may not or cannot write: a folder or file atp did not write,
    a read-only or full file system, the file-size limit (CLI exit 2, one line)."""
