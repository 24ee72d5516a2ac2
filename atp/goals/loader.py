"""Finding and loading shipped goal lists (``goal_lists/``) and overlays (``site_configs/``).

``load_goal_list(site="hn", institution="example_parotid_sparing")`` reads
``goal_lists/hn.yaml`` shipped with the package and merges
``site_configs/example_parotid_sparing.yaml``; ``path=`` reads any goal-list file
instead, and ``institution`` may also be a path to an overlay file.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from atp.errors import GoalListError
from atp.goals.overlay import apply_overlay
from atp.goals.schema import GoalList, parse_goal_list
from atp.goals.yamlio import load_yaml


def _package_dir(package: str) -> Path:
    return Path(str(importlib.resources.files(package)))


def goal_lists_dir() -> Path:
    """Folder of the shipped goal lists."""
    return _package_dir("goal_lists")


def site_configs_dir() -> Path:
    """Folder of the shipped institution overlays."""
    return _package_dir("site_configs")


def list_sites() -> list[str]:
    """Names of the shipped goal lists (``--site`` values)."""
    return sorted(p.stem for p in goal_lists_dir().glob("*.yaml"))


def list_institutions() -> list[str]:
    """Names of the shipped institution overlays (``--institution`` values)."""
    return sorted(p.stem for p in site_configs_dir().glob("*.yaml"))


def site_path(site: str) -> Path:
    p = goal_lists_dir() / f"{site}.yaml"
    if not p.is_file():
        raise GoalListError(f"no shipped goal list for site '{site}'; sites: {list_sites()}",
                            field="site")
    return p


def institution_path(institution: str) -> Path:
    """A shipped overlay by name, or an overlay file path."""
    p = Path(institution)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise GoalListError("no such overlay file", file=p, field="institution")
        return p
    q = site_configs_dir() / f"{institution}.yaml"
    if not q.is_file():
        raise GoalListError(f"no shipped institution overlay '{institution}'; institutions: "
                            f"{list_institutions()}", field="institution")
    return q


def read_goal_list(path: str | Path) -> tuple[GoalList, list]:
    """Parse one goal-list file (no overlay); also returns the raw goal fields."""
    return parse_goal_list(load_yaml(path), str(path))


def load_goal_list(site: str | None = None, path: str | Path | None = None,
                   institution: str | Path | None = None) -> GoalList:
    """Load a goal list by shipped ``site`` name or by file ``path`` (exactly one), and
    merge an institution overlay (shipped name or file path) for that site."""
    if (site is None) == (path is None):
        raise GoalListError("give exactly one of a site name or a goal-list file",
                            field="site")
    file = site_path(site) if site is not None else Path(path)
    goal_list, raws = read_goal_list(file)
    if site is not None and goal_list.site != site:
        raise GoalListError(f"file declares site '{goal_list.site}', expected '{site}'",
                            file=file, field="site")
    if institution is None:
        return goal_list
    ofile = institution_path(str(institution))
    return apply_overlay(goal_list, raws, load_yaml(ofile), str(ofile), goal_list.site)
