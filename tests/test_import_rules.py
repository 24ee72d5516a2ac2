"""The import rules of ARCHITECTURE.md ("Import rules"), checked on the library's import graph.

The library is ``atp/`` plus the stages ``optimizer/``, ``predictor/``, ``sequencer/``,
installed as ``atp.optimizer``, ``atp.predictor``, ``atp.sequencer``. Every ``import`` of
every module is read with ``ast``, at module level and inside functions:

- the core (``atp.*`` below the top floor: every module neither in ``TOP_FLOOR``, nor the
  ``atp`` facade itself, nor in a stage) never imports a stage or the top floor;
- a stage never imports another stage or the top floor;
- no cycles among library modules (function-level imports included);
- a function-level import is of an optional heavy dependency (``HEAVY``) or carries a
  ``# lazy: <reason>`` comment (on the import, in the comment lines right above it, or on
  its function's ``def`` line).

``test_checker_finds_planted_violations`` runs the same checker on a tiny package written
to ``tmp_path`` with one violation of each rule; ``test_architecture_names_the_same_top_floor``
checks that ARCHITECTURE.md lists the same top floor as ``TOP_FLOOR`` and ``FACADE``.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package name -> folder (the stages live in top-level folders, installed under atp.)
LIBRARY = {"atp": ROOT / "atp", "atp.optimizer": ROOT / "optimizer",
           "atp.predictor": ROOT / "predictor", "atp.sequencer": ROOT / "sequencer"}
HEAVY = frozenset({"torch", "cupy", "cupyx", "cvxpy", "matplotlib", "ray", "pyarrow"})
STAGES = ("atp.optimizer", "atp.predictor", "atp.sequencer")
# the top floor composes the stages: these modules and packages (with their submodules),
# and the package facade "atp" itself (its lazy __getattr__ exposes atp.plan /
# atp.load_plan / atp.Plan), matched by its exact name only: every library module is
# below "atp", and as a prefix it would put the whole library on the top floor.
# atp.final_dose and atp.scorecard are core: they work on doses, goals and YAML and
# import no stage.
FACADE = ("atp",)
TOP_FLOOR = ("atp.cli", "atp.commands", "atp.pipeline", "atp.plans", "atp.fastplan",
             "atp.forward", "atp.report", "atp.batch", "atp.cohort_report", "atp.vmatplan",
             "atp.score_refine")

_LAZY_MARK = re.compile(r"#\s*lazy:\s*\S")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module: a library module, or an external dotted name
    line: int
    in_function: bool
    marked: bool  # a "# lazy: <reason>" comment covers it
    internal: bool  # the target is a library module


@dataclass(frozen=True)
class Rules:
    stages: tuple[str, ...]
    top_floor: tuple[str, ...]  # modules and packages, with their submodules
    heavy: frozenset[str]
    facade: tuple[str, ...] = ()  # top-floor modules by their exact name only


ATP_RULES = Rules(STAGES, TOP_FLOOR, HEAVY, FACADE)


def _within(module: str, prefixes) -> str | None:
    return next((p for p in prefixes if module == p or module.startswith(p + ".")), None)


def find_modules(packages: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under each package folder."""
    out = {}
    for pkg, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _nearest(name: str, modules) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _comments(source: str) -> dict[int, str]:
    toks = tokenize.generate_tokens(io.StringIO(source).readline)
    return {t.start[0]: t.string for t in toks if t.type == tokenize.COMMENT}


def module_imports(module: str, path: Path, modules) -> list[Import]:
    """Every import statement of one module, resolved to library modules where it can be."""
    source = path.read_text(encoding="utf-8")
    comments = _comments(source)
    lines = source.splitlines()
    is_pkg = path.name == "__init__.py"

    def marked(node, defs) -> bool:
        spots = list(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        above = node.lineno - 1  # the comment block right above the import
        while above >= 1 and lines[above - 1].strip().startswith("#"):
            spots.append(above)
            above -= 1
        spots += [d.lineno for d in defs[-1:]]
        return any(_LAZY_MARK.search(comments.get(n, "")) for n in spots)

    out: list[Import] = []

    def add(node, target, defs):
        lib = _nearest(target, modules) if target.split(".")[0] in {
            m.split(".")[0] for m in modules} else None
        out.append(Import(module, lib or target, node.lineno, bool(defs),
                          marked(node, defs), lib is not None))

    def visit(node, defs):
        for child in ast.iter_child_nodes(node):
            inner = defs + [child] if isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef)) else defs
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(child, alias.name, defs)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module if is_pkg else module.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    add(child, sub if sub in modules else base, defs)
            visit(child, inner)

    visit(ast.parse(source, filename=str(path)), [])
    return out


def import_graph(packages: dict[str, Path]) -> tuple[dict[str, Path], list[Import]]:
    modules = find_modules(packages)
    return modules, [i for m, p in modules.items() for i in module_imports(m, p, modules)]


def _floor(module: str, rules: Rules) -> str:
    if module in rules.facade or _within(module, rules.top_floor):
        return "top floor"
    stage = _within(module, rules.stages)
    return f"stage {stage}" if stage else "core"


def layer_violations(imports: list[Import], rules: Rules) -> list[tuple[Import, str]]:
    out = []
    for imp in imports:
        if not imp.internal or imp.target == imp.module:
            continue
        src, dst = _floor(imp.module, rules), _floor(imp.target, rules)
        if src == "top floor" or dst == "core" or src == dst:
            continue
        out.append((imp, f"{src} imports {dst}"))
    return out


def lazy_violations(imports: list[Import], rules: Rules) -> list[Import]:
    return [i for i in imports if i.in_function and not i.marked
            and (i.internal or i.target.split(".")[0] not in rules.heavy)]


def cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components (Tarjan) of more than one module."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        if i.internal and i.target != i.module:
            graph.setdefault(i.module, set()).add(i.target)
            graph.setdefault(i.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:  # iterative, so deep graphs cannot overflow
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def cycle_edges(imports: list[Import], component: list[str]) -> set[tuple[str, str]]:
    members = set(component)
    return {(i.module, i.target) for i in imports
            if i.internal and i.module in members and i.target in members
            and i.module != i.target}


def violations(packages: dict[str, Path], rules: Rules) -> set[tuple[str, str, str]]:
    """(importer, imported or "function-level", rule) of every broken rule."""
    _, imports = import_graph(packages)
    found = {(i.module, i.target, why) for i, why in layer_violations(imports, rules)}
    found |= {(i.module, f"function-level {i.target}", "unmarked function-level import")
              for i in lazy_violations(imports, rules)}
    for comp in cycles(imports):
        found |= {(a, b, "cycle") for a, b in cycle_edges(imports, comp)}
    return found


def _report(found, modules) -> str:
    rows = []
    for module, target, why in sorted(found):
        path = modules.get(module)
        where = path.relative_to(ROOT) if path and path.is_relative_to(ROOT) else path
        rows.append(f"  {where}: {module} -> {target}: {why}")
    return "\n".join(rows)


# --- the library -------------------------------------------------------------------------
def test_library_follows_the_import_rules():
    """Every rule, over the whole library: no allow-list, no known exceptions."""
    modules = find_modules(LIBRARY)
    found = violations(LIBRARY, ATP_RULES)
    assert not found, "import rules broken (ARCHITECTURE.md, Import rules):\n" + \
        _report(found, modules)


def test_library_graph_is_read():
    """The checker sees the library: the stages, their imports of the core, lazy torch."""
    modules, imports = import_graph(LIBRARY)
    assert {"atp.pipeline", "atp.optimizer.problem", "atp.predictor.registry",
            "atp.sequencer.registry", "atp.registry", "atp.dose.influence"} <= set(modules)
    edges = {(i.module, i.target) for i in imports if i.internal}
    assert ("atp.sequencer.registry", "atp.registry") in edges
    assert any(i.in_function and i.target == "torch" for i in imports)


def test_library_floors():
    """Each module is on the floor ARCHITECTURE.md gives it; the facade is the package
    ``atp`` alone, not everything below it."""
    floors = {"atp": "top floor", "atp.cli": "top floor", "atp.commands.plan": "top floor",
              "atp.pipeline": "top floor", "atp.vmatplan": "top floor",
              "atp.final_dose": "core", "atp.scorecard": "core", "atp.dvh": "core",
              "atp.dose.influence": "core", "atp.io.dicom_export": "core",
              "atp.optimizer.problem": "stage atp.optimizer",
              "atp.sequencer.dmpo": "stage atp.sequencer",
              "atp.predictor.registry": "stage atp.predictor"}
    assert set(floors) <= set(find_modules(LIBRARY))
    assert {m: _floor(m, ATP_RULES) for m in floors} == floors


def _architecture_top_floor() -> tuple[set[str], set[str]]:
    """The top floor as ARCHITECTURE.md names it, as module names: (the Import rules' Top
    floor bullet, the Rooms table's top floor row)."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    bullet = re.search(r"- \*\*Top floor\*\* \((.*?)\): may import", text, re.DOTALL)
    assert bullet, "ARCHITECTURE.md: no Top floor bullet under Import rules"
    rule = {n.removesuffix(".*") for n in re.findall(r"`(atp[\w.*]*)`", bullet.group(1))}
    row = next((line for line in text.splitlines() if line.startswith("| top floor |")), "")
    assert row, "ARCHITECTURE.md: no top floor row in the Rooms table"
    files = re.findall(r"`(atp/[\w/]*(?:\.py)?)`", row.split("|")[2])
    table = {f.removesuffix(".py").removesuffix("/__init__").rstrip("/").replace("/", ".")
             for f in files}
    return rule, table


def test_architecture_names_the_same_top_floor():
    rule, table = _architecture_top_floor()
    assert rule == set(TOP_FLOOR) | set(FACADE), "ARCHITECTURE.md, Import rules: Top floor"
    assert table == set(TOP_FLOOR) | set(FACADE), "ARCHITECTURE.md, Rooms: top floor"


# --- the checker, on a planted package -----------------------------------------------------
PLANTED = {
    "__init__.py": "import pkg.stage_a\n",  # the facade: may import a stage
    "core.py": "import json\n",
    "core_bad.py": "from pkg.stage_a import thing\n",  # core -> stage
    "loop_a.py": "import pkg.loop_b\n",
    "loop_b.py": "def f():\n    from pkg import loop_a  # lazy: still a cycle\n",
    "lazy_ok.py": ("def f():\n    import torch\n"
                   "    # lazy: start-up time of the command line,\n"
                   "    # a comment block of two lines\n"
                   "    from pkg import core\n"
                   "    import cupy.linalg\n"
                   "def g():  # lazy: every import of g\n"
                   "    import pkg.core\n"),
    "lazy_bad.py": "def f():\n    import json\n    from pkg import core  # not marked\n",
    "top.py": "import pkg.stage_b\n",
    "stage_a/__init__.py": "thing = 1\n",
    "stage_a/x.py": "from pkg import core\nfrom . import y\n",
    "stage_a/y.py": "from ..stage_b import z\n",  # stage -> another stage (relative)
    "stage_b/__init__.py": "",
    "stage_b/z.py": "def f():\n    import pkg.top  # lazy: marked, still the top floor\n",
}


def test_checker_finds_planted_violations(tmp_path):
    root = tmp_path / "pkg"
    for name, text in PLANTED.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    rules = Rules(stages=("pkg.stage_a", "pkg.stage_b"), top_floor=("pkg.top",),
                  heavy=frozenset({"torch", "cupy"}), facade=("pkg",))
    found = violations({"pkg": root}, rules)
    assert found == {
        ("pkg.core_bad", "pkg.stage_a", "core imports stage pkg.stage_a"),
        ("pkg.stage_a.y", "pkg.stage_b.z", "stage pkg.stage_a imports stage pkg.stage_b"),
        ("pkg.stage_b.z", "pkg.top", "stage pkg.stage_b imports top floor"),
        ("pkg.loop_a", "pkg.loop_b", "cycle"),
        ("pkg.loop_b", "pkg.loop_a", "cycle"),
        ("pkg.lazy_bad", "function-level json", "unmarked function-level import"),
        ("pkg.lazy_bad", "function-level pkg.core", "unmarked function-level import"),
    }, _report(found, {})
    # the library's own layering on the planted files: a clean package passes
    for name in ("core_bad.py", "loop_b.py", "lazy_bad.py", "stage_a/y.py", "stage_b/z.py"):
        (root / name).write_text("")
    assert violations({"pkg": root}, rules) == set()
