"""Finding and loading shipped goal lists (``goal_lists/``) and overlays (``site_configs/``).

``load_goal_list(site="hn", institution="example_parotid_sparing")`` reads
``goal_lists/hn.yaml`` shipped with the package and merges the overlay
``example_parotid_sparing.yaml``; ``path=`` reads any goal-list file instead, and
``institution`` may also be a path to an overlay file.

Institution overlays are found by name on a search path, first match wins:

1. each folder in ``ATP_CONFIG_PATH`` (separated by ``os.pathsep``; a folder of
   ``NAME.yaml`` overlays, or one holding a ``site_configs/`` folder of them);
2. the user's config folder, :func:`user_config_dir` (Linux
   ``$XDG_CONFIG_HOME/atp/site_configs``, default ``~/.config/atp/site_configs``; macOS
   ``~/Library/Application Support/atp/site_configs``; Windows
   ``%APPDATA%\\atp\\site_configs``);
3. the overlays shipped with atp (``site_configs/``).

So an institution keeps its own overlay outside site-packages and names it with
``--institution NAME``; a name found earlier hides a shipped overlay of the same name.
"""

from __future__ import annotations

import importlib.resources
import os
import sys
from pathlib import Path

from atp.errors import GoalListError
from atp.goals.overlay import apply_overlay
from atp.goals.schema import GoalList, parse_goal_list
from atp.goals.yamlio import load_yaml


def _package_dir(package: str) -> Path:
    return Path(str(importlib.resources.files(package)))


def goal_lists_dir() -> Path:
    """Folder of the shipped goal lists."""
    return _package_dir("atp.goal_lists")


def site_configs_dir() -> Path:
    """Folder of the shipped institution overlays."""
    return _package_dir("atp.site_configs")


def list_sites() -> list[str]:
    """Names of the shipped goal lists (``--site`` values)."""
    return sorted(p.stem for p in goal_lists_dir().glob("*.yaml"))


CONFIG_PATH_ENV = "ATP_CONFIG_PATH"
OVERLAY_SUFFIXES = (".yaml", ".yml")


def user_config_dir() -> Path:
    """The user's folder of institution overlays (platform convention; may not exist)."""
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "atp" / "site_configs"


def institution_search_path() -> list[Path]:
    """Folders searched for ``--institution NAME``, in order (see the module docstring)."""
    dirs = []
    for entry in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep):
        if entry.strip():
            d = Path(entry).expanduser()
            dirs.append(d / "site_configs" if (d / "site_configs").is_dir() else d)
    return dirs + [user_config_dir(), site_configs_dir()]


def find_institutions() -> dict[str, Path]:
    """Overlay name -> its file, the first on :func:`institution_search_path`."""
    found: dict[str, Path] = {}
    for d in institution_search_path():
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.suffix in OVERLAY_SUFFIXES and p.is_file():
                found.setdefault(p.stem, p)
    return found


def list_institutions() -> list[str]:
    """Names of the institution overlays on the search path (``--institution`` values)."""
    return sorted(find_institutions())


def site_path(site: str) -> Path:
    p = goal_lists_dir() / f"{site}.yaml"
    if not p.is_file():
        raise GoalListError(f"no shipped goal list for site '{site}'; sites: {list_sites()}",
                            field="site")
    return p


def institution_path(institution: str) -> Path:
    """An overlay by name on the search path, or an overlay file path."""
    p = Path(institution)
    if p.suffix in OVERLAY_SUFFIXES or p.is_file():
        if not p.is_file():
            raise GoalListError("no such overlay file", file=p, field="institution")
        return p
    found = find_institutions()
    if institution not in found:
        raise GoalListError(
            f"no institution overlay '{institution}'; institutions: {sorted(found)}; "
            f"searched {os.pathsep.join(map(str, institution_search_path()))} "
            f"(add folders with {CONFIG_PATH_ENV})", field="institution")
    return found[institution]


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
