"""Packaging: every third-party import is declared (contourpy was not), ranges in
pyproject.toml, exact pins only in constraints.txt. `.ci/wheel_check.sh` does the same on a
built wheel and runs `atp demo` from it in a fresh venv (CI)."""

from __future__ import annotations

import re
from pathlib import Path

import depcheck

ROOT = Path(__file__).resolve().parents[1]


def test_every_import_is_declared_in_pyproject():
    core, extras = depcheck.pyproject_dependencies(ROOT / "pyproject.toml")
    assert "contourpy" in core
    assert depcheck.problems(depcheck.source_tree(ROOT), core, extras) == []


def test_an_undeclared_import_is_caught():
    src = {"atp/io/x.py": "def f():\n    import contourpy\n    import torch\n"}
    bad = depcheck.problems(src, {"numpy"}, {"ml": set()})
    assert any(line.startswith("contourpy:") and "[project] dependencies" in line
               for line in bad)
    assert any(line.startswith("torch:") and "'ml' extra" in line for line in bad)
    assert depcheck.problems(src, {"contourpy"}, {"ml": {"torch"}}) == []


def test_ranges_in_pyproject_pins_in_constraints():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "<" not in project["requires-python"]  # no upper cap on Python
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    assert not [r for r in reqs if "==" in r], "exact pins belong in constraints.txt"
    assert all(">=" in r for r in reqs), "each dependency has a tested lower bound"
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: '{line}' is not an exact pin"
            pins[depcheck._norm(name)] = version
    for r in reqs:  # every declared dependency is pinned, inside its range
        name = depcheck._requirement_name(r)
        assert name in pins, f"{name} has no pin in constraints.txt"
        low = re.search(r">=\s*([0-9][0-9.]*)", r).group(1)
        as_tuple = [tuple(int(x) for x in re.findall(r"\d+", v)[:3]) for v in (pins[name], low)]
        assert as_tuple[0] >= as_tuple[1], f"{name}=={pins[name]} below its range {r}"
    assert pins["torch"] == "2.13.0"  # the CPU wheel on disk, never a CUDA download


def test_make_and_ci_use_the_constraints():
    make = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in make
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make wheel-check" in ci
    assert "wheel_check.sh" in make
