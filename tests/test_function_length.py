"""No function of the top floor is longer than ``LIMIT`` lines (issue 21).

The top floor composes the stages (ARCHITECTURE.md); a long function there is several
steps that want names. Length is counted with ``ast``: ``end_lineno - lineno + 1`` of
every ``def`` (methods and nested functions too), its docstring, comments and blank
lines included, its decorators not. A function over the limit is split into named
steps, not exempted.

``test_checker_finds_a_planted_long_function`` runs the same checker on files written
to ``tmp_path``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 80
# the top floor's modules (tests/test_import_rules.py's TOP_FLOOR, with the final-dose
# stage and the scorecards the pipeline and atp batch call), and every module of
# atp/commands/
TOP_FLOOR = ("atp/__init__.py", "atp/pipeline.py", "atp/fastplan.py", "atp/plans.py",
             "atp/vmatplan.py", "atp/forward.py", "atp/batch.py", "atp/cohort_report.py",
             "atp/final_dose.py", "atp/scorecard.py", "atp/report.py", "atp/cli.py",
             "atp/score_refine.py")
TOP_FLOOR_DIRS = ("atp/commands",)


def top_floor_files(root: Path = ROOT) -> list[Path]:
    files = [root / f for f in TOP_FLOOR]
    for d in TOP_FLOOR_DIRS:
        files += sorted((root / d).glob("*.py"))
    return files


def function_lengths(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, first line, lines) of every function and method of ``path``."""
    out: list[tuple[str, int, int]] = []

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                out.append((name, child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "")
    return out


def long_functions(files, limit: int = LIMIT) -> list[str]:
    """``file:line name (N lines)`` of every function longer than ``limit``."""
    rows = []
    for path in files:
        for name, line, n in function_lengths(path):
            if n > limit:
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                rows.append(f"{where}:{line} {name} ({n} lines)")
    return rows


def test_top_floor_functions_are_short():
    files = top_floor_files()
    missing = [str(f.relative_to(ROOT)) for f in files if not f.is_file()]
    assert not missing, f"top-floor modules not found (update TOP_FLOOR): {missing}"
    assert len(files) > len(TOP_FLOOR) + 5  # atp/commands/ was read too
    long = long_functions(files)
    assert not long, (f"top-floor functions over {LIMIT} lines (split them into named "
                      "steps):\n  " + "\n  ".join(long))


# --- the checker, on planted files -------------------------------------------------------
def _body(n: int, indent: str = "    ") -> str:
    return "".join(f"{indent}x{i} = {i}\n" for i in range(n))


def test_checker_finds_a_planted_long_function(tmp_path):
    ok = tmp_path / "ok.py"
    # def line + docstring + 78 lines = 80 lines: at the limit, allowed
    ok.write_text('def at_limit():\n    """Doc."""\n' + _body(78))
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\n"
                   "class C:\n"
                   "    def short(self):\n        return 1\n\n"
                   '    def long_method(self):\n        """Doc\n\n        string."""\n'
                   + _body(78, "        ")
                   + "\n\ndef outer():\n    def inner():\n" + _body(81, "        "))
    assert [(n, ln, k) for n, ln, k in function_lengths(ok)] == [("at_limit", 1, 80)]
    found = long_functions([ok, bad], limit=80)
    assert found == [f"{bad}:8 C.long_method (82 lines)",
                     f"{bad}:92 outer (83 lines)",
                     f"{bad}:93 outer.inner (82 lines)"], found
    assert long_functions([ok, bad], limit=200) == []
