"""YAML reading that remembers line numbers, so every goal-list error can name its line.

``load_yaml(path)`` returns plain Python data in which every mapping is a
:class:`LineDict` (``.line``: 1-based line of the mapping, ``.key_lines[key]``: line of
each key) and every sequence a :class:`LineList` (``.line``, ``.item_lines[i]``).
Malformed YAML and duplicate keys raise :class:`~atp.errors.GoalListError` with the line.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from atp.errors import GoalListError


class LineDict(dict):
    """A dict that knows the YAML line it started on and the line of each key."""

    line: int | None = None
    file: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.key_lines: dict = {}

    def line_of(self, key) -> int | None:
        return self.key_lines.get(key, self.line)


class LineList(list):
    """A list that knows the YAML line it started on and the line of each item."""

    line: int | None = None
    file: str | None = None

    def __init__(self, *args):
        super().__init__(*args)
        self.item_lines: list[int | None] = []

    def line_of(self, i: int) -> int | None:
        return self.item_lines[i] if 0 <= i < len(self.item_lines) else self.line


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings/sequences carry their source lines."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    out = LineDict()
    out.line = node.start_mark.line + 1
    out.file = loader.atp_file
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise GoalListError("a mapping key must be a plain value", file=loader.atp_file,
                                line=key_node.start_mark.line + 1) from None
        if key in out:
            raise GoalListError(f"duplicate key '{key}'", file=loader.atp_file,
                                line=key_node.start_mark.line + 1, field=str(key))
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode, deep: bool = False):
    out = LineList()
    out.line = node.start_mark.line + 1
    out.file = loader.atp_file
    for child in node.value:
        out.append(loader.construct_object(child, deep=True))
        out.item_lines.append(child.start_mark.line + 1)
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG,
                            _construct_sequence)


def loads_yaml(text: str, file: str | None = None):
    """Parse YAML text (``file`` is only used in messages)."""
    loader = _LineLoader(text)
    loader.atp_file = file
    try:
        return loader.get_single_data()
    except GoalListError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise GoalListError(f"malformed YAML: {what}", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise GoalListError(f"malformed YAML: {exc}", file=file) from None
    finally:
        loader.dispose()


def load_yaml(path: str | os.PathLike):
    """Read and parse a YAML file, keeping line numbers (see module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GoalListError("no such file", file=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GoalListError(f"cannot read: {exc}", file=path) from None
    return loads_yaml(text, str(path))
