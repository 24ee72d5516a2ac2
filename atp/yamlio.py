"""The one YAML reader of atp: safe, bounded, and keeping line numbers.

Goal lists, institution overlays, prescription sidecars, machine models and alias
tables are all read with :func:`load_yaml`, which

* parses with PyYAML's safe loader (no Python objects);
* refuses duplicate keys (with the line of the second one);
* refuses documents whose aliases would expand beyond :data:`MAX_NODES` nodes (a
  "billion laughs" alias bomb of a few hundred bytes is refused before anything is
  built), recursive aliases, nesting deeper than :data:`MAX_DEPTH`, and files larger than
  :data:`MAX_BYTES`;
* returns plain Python data in which every mapping is a :class:`LineDict` (``.line``:
  1-based line of the mapping, ``.key_lines[key]``: line of each key) and every sequence
  a :class:`LineList` (``.line``, ``.item_lines[i]``).

Every problem raises the given ``error`` class (an :class:`~atp.errors.InputError`) with
the file and line.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from atp.errors import InputError, quote

MAX_NODES = 200_000     # nodes after alias expansion (shipped goal lists: a few hundred)
MAX_DEPTH = 100         # nesting of mappings / sequences
MAX_BYTES = 5_000_000   # size of one YAML file


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

    atp_file: str | None = None
    atp_error: type = InputError
    atp_depth: int = 0

    def fetch_flow_collection_start(self, token_class):
        # the scanner's cost grows with the square of the flow depth: stop early
        if self.flow_level >= MAX_DEPTH:
            raise self.atp_error(f"YAML nested deeper than {MAX_DEPTH} levels",
                                 file=self.atp_file, line=self.line + 1)
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent, index):
        # refuse deep nesting while composing (PyYAML recurses once per level)
        self.atp_depth += 1
        try:
            if self.atp_depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise self.atp_error(f"YAML nested deeper than {MAX_DEPTH} levels",
                                     file=self.atp_file, line=mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self.atp_depth -= 1


def _children(node):
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            yield k
            yield v
    elif isinstance(node, yaml.SequenceNode):
        yield from node.value


def check_expansion(root, *, file=None, error=InputError, max_nodes: int = MAX_NODES,
                    max_depth: int = MAX_DEPTH) -> int:
    """Number of nodes the composed YAML graph ``root`` stands for once every alias is
    expanded; raises ``error`` beyond ``max_nodes``, for a recursive alias, or nesting
    deeper than ``max_depth``. Linear in the number of distinct nodes (memoised)."""
    if root is None:
        return 0
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, 0, False)]
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            total = 1
            for c in _children(node):
                total += size[id(c)]
            if total > max_nodes:
                raise error(f"YAML aliases expand to more than {max_nodes} nodes; refused",
                            file=file, line=node.start_mark.line + 1)
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise error("recursive YAML alias", file=file, line=node.start_mark.line + 1)
        if depth > max_depth:
            raise error(f"YAML nested deeper than {max_depth} levels", file=file,
                        line=node.start_mark.line + 1)
        on_path.add(key)
        stack.append((node, depth, True))
        for c in _children(node):
            if id(c) not in size:
                stack.append((c, depth + 1, False))
    return size[id(root)]


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
            raise loader.atp_error("a mapping key must be a plain value", file=loader.atp_file,
                                   line=key_node.start_mark.line + 1) from None
        if key in out:
            raise loader.atp_error(f"duplicate key {quote(key)}", file=loader.atp_file,
                                   line=key_node.start_mark.line + 1,
                                   field=quote(key, repr_=False))
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


def loads_yaml(text: str, file: str | None = None, *, error: type = InputError):
    """Parse YAML text (``file`` is only used in messages); see the module docstring."""
    if len(text) > MAX_BYTES:
        raise error(f"YAML larger than {MAX_BYTES} bytes; refused", file=file)
    loader = _LineLoader(text)
    loader.atp_file = file
    loader.atp_error = error
    try:
        node = loader.get_single_node()
        check_expansion(node, file=file, error=error)
        if node is None:
            return None
        return loader.construct_document(node)
    except InputError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise error(f"malformed YAML: {what}", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise error(f"malformed YAML: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                    file=file) from None
    except RecursionError:
        raise error("YAML nested too deeply", file=file) from None
    except (ValueError, OverflowError, TypeError) as exc:  # e.g. a timestamp out of range
        raise error(f"malformed YAML value: {exc}", file=file) from None
    finally:
        loader.dispose()


def load_yaml(path: str | os.PathLike, *, error: type = InputError, what: str = "file"):
    """Read and parse a YAML file, keeping line numbers (see the module docstring).
    ``what`` names the file's role in the 'cannot read' message."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise error(f"{what} larger than {MAX_BYTES} bytes; refused", file=path)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"no such {what}", file=path) from None
    except IsADirectoryError:
        raise error(f"{what} is a folder, expected a YAML file", file=path) from None
    except UnicodeDecodeError:
        raise error(f"cannot read {what}: not UTF-8 text", file=path) from None
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror or exc}", file=path) from None
    return loads_yaml(text, str(path), error=error)


__all__ = ["MAX_NODES", "LineDict", "LineList", "check_expansion", "load_yaml", "loads_yaml"]
