"""Declared dependencies versus what the shipped code imports.

Used by ``tests/test_packaging.py`` (pyproject.toml + the source tree) and by
``.ci/wheel_check.sh`` (a built wheel's METADATA + the modules inside it)::

    python tests/depcheck.py dist/atp-0.1.0-py3-none-any.whl

Every third-party module imported anywhere in the shipped packages (module level or inside
a function) must be declared: in ``[project] dependencies`` unless it is one of the
optional stacks in :data:`OPTIONAL` (then in that extra). ``contourpy`` (RTSTRUCT export)
imported in a function but not declared is exactly the bug this catches.
"""

from __future__ import annotations

import ast
import re
import sys
import zipfile
from pathlib import Path

FIRST_PARTY = {"atp", "predictor", "optimizer", "sequencer", "goal_lists", "site_configs"}
# import name -> distribution name (PyPI, normalised)
DISTRIBUTION = {
    "numpy": "numpy", "scipy": "scipy", "pydicom": "pydicom", "yaml": "pyyaml",
    "tqdm": "tqdm", "contourpy": "contourpy", "matplotlib": "matplotlib",
    "torch": "torch", "cupy": "cupy-cuda12x", "cupyx": "cupy-cuda12x",
    "cvxpy": "cvxpy", "osqp": "osqp", "clarabel": "clarabel",
    "ray": "ray", "pyarrow": "pyarrow",
}
# optional stacks: imported only behind an availability check; distribution -> extra
OPTIONAL = {"torch": "ml", "cupy-cuda12x": "gpu", "cvxpy": "qp", "osqp": "qp",
            "clarabel": "qp", "matplotlib": "report", "ray": "cluster", "pyarrow": "cluster"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(sources: dict[str, str]) -> dict[str, set[str]]:
    """Top-level third-party import name -> the files importing it."""
    std = set(sys.stdlib_module_names)
    found: dict[str, set[str]] = {}
    for path, text in sources.items():
        for node in ast.walk(ast.parse(text, filename=path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in std and top not in FIRST_PARTY and top != "__future__":
                    found.setdefault(top, set()).add(path)
    return found


def problems(sources: dict[str, str], core: set[str], extras: dict[str, set[str]]) -> list[str]:
    """One line per import that no declared dependency provides."""
    core = {_norm(c) for c in core}
    extras = {k: {_norm(d) for d in v} for k, v in extras.items()}
    out = []
    for mod, files in sorted(imported_modules(sources).items()):
        where = ", ".join(sorted(files)[:3])
        dist = DISTRIBUTION.get(mod)
        if dist is None:
            out.append(f"{mod}: imported ({where}) but unknown to tests/depcheck.py: declare "
                       "it in pyproject.toml and add it to DISTRIBUTION")
            continue
        extra = OPTIONAL.get(dist)
        if extra is None and _norm(dist) not in core:
            out.append(f"{mod}: imported ({where}) but {dist} is not in [project] "
                       "dependencies")
        elif extra is not None and _norm(dist) not in core | extras.get(extra, set()):
            out.append(f"{mod}: imported ({where}) but {dist} is not in the '{extra}' extra")
    return out


def _requirement_name(req: str) -> str:
    return _norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def pyproject_dependencies(pyproject: Path) -> tuple[set[str], dict[str, set[str]]]:
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    core = {_requirement_name(r) for r in project.get("dependencies", [])}
    extras = {k: {_requirement_name(r) for r in v}
              for k, v in project.get("optional-dependencies", {}).items()}
    return core, extras


def source_tree(root: Path) -> dict[str, str]:
    out = {}
    for pkg in sorted(FIRST_PARTY):
        for f in sorted((root / pkg).rglob("*.py")):
            out[str(f.relative_to(root))] = f.read_text()
    return out


def wheel_contents(wheel: Path) -> tuple[dict[str, str], set[str], dict[str, set[str]]]:
    """(python sources, core dependencies, extras) of a built wheel."""
    with zipfile.ZipFile(wheel) as z:
        sources = {n: z.read(n).decode() for n in z.namelist()
                   if n.endswith(".py") and n.split("/")[0] in FIRST_PARTY}
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name).decode()
    core: set[str] = set()
    extras: dict[str, set[str]] = {}
    for line in meta.splitlines():
        if line.startswith("Provides-Extra:"):
            extras.setdefault(line.split(":", 1)[1].strip(), set())
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1]
        name = _requirement_name(req)
        m = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        if m:
            extras.setdefault(m.group(1), set()).add(name)
        else:
            core.add(name)
    return sources, core, extras


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/depcheck.py WHEEL", file=sys.stderr)
        return 2
    sources, core, extras = wheel_contents(Path(argv[0]))
    if not sources:
        print(f"{argv[0]}: no atp modules in the wheel", file=sys.stderr)
        return 1
    bad = problems(sources, core, extras)
    for line in bad:
        print(f"{Path(argv[0]).name}: {line}", file=sys.stderr)
    if not bad:
        print(f"{Path(argv[0]).name}: {len(sources)} modules, every third-party import "
              f"declared (core: {', '.join(sorted(core))})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
