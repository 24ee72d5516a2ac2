"""``atp list [KIND] [--json]``: what can be named on the command line.

KIND is one of predictors, engines, backends, sequencers, machines, templates, sites,
institutions (default: all). Each entry is the value an option takes (``--predictor``,
``--dose-engine``, ``--backend``, ``--sequencer``, ``--machine``, ``--beam-template``,
``--site``, ``--institution``) with whether it can run here and where it comes from.
"""

from __future__ import annotations

from atp.commands.common import print_json

KINDS = ("predictors", "engines", "backends", "sequencers", "machines", "templates",
         "sites", "institutions")
OPTION = {"predictors": "--predictor", "engines": "--dose-engine", "backends": "--backend",
          "sequencers": "--sequencer", "machines": "--machine",
          "templates": "--beam-template", "sites": "--site",
          "institutions": "--institution"}


def register(sub) -> None:
    p = sub.add_parser("list", help="list predictors, dose engines, backends, sequencers, "
                                    "machines, beam templates, sites, institutions")
    p.add_argument("kind", nargs="?", choices=KINDS, metavar="KIND",
                   help=f"one of {', '.join(KINDS)} (default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _predictors() -> list[dict]:
    from atp.predictor import registry

    index = registry.shipped_index()
    default = registry.default_predictor_name()
    out = []
    for name in registry.available():
        entry = index.get(name, {})
        needs = entry.get("needs", [])
        runnable = registry._runnable(entry) if entry else True
        score = entry.get("validation", {}).get("dose_score_gy")
        detail = entry.get("kind", "entry point")
        if score is not None:
            detail += f", validation dose score {score:g} Gy"
        if needs and not runnable:
            detail += f" (needs {', '.join(needs)}: not installed)"
        out.append({"name": name, "default": name == default, "available": runnable,
                    "detail": detail})
    return out


def _engines() -> list[dict]:
    from atp.dose import registry

    return [{"name": n, "default": n == "pencil-beam", "available": True,
             "detail": "devices cpu, cuda" if n == "pencil-beam" else ""}
            for n in registry.available()]


def _backends() -> list[dict]:
    from atp.optimizer import registry

    installed = set(registry.installed())
    out = [{"name": "auto", "default": True, "available": True,
            "detail": "gpu when a GPU is present, else cpu"}]
    for n in registry.names():
        out.append({"name": n, "default": False, "available": n in installed,
                    "detail": ""})
    return out


def _sequencers() -> list[dict]:
    from atp.sequencer import registry

    out = [{"name": "auto", "default": True, "available": True,
            "detail": "sliding window for static beams, vmat for arcs"}]
    return out + [{"name": n, "default": False, "available": True, "detail": ""}
                  for n in registry.names()]


def _machines() -> list[dict]:
    from atp.sequencer.machine import MACHINE_DIR, available_machines

    return [{"name": n, "default": n == "millennium120", "available": True,
             "detail": str(MACHINE_DIR / f"{n}.yaml")} for n in available_machines()]


def _templates() -> list[dict]:
    from atp.dose.geometry import BEAM_TEMPLATES

    return [{"name": n, "default": False, "available": True,
             "detail": f"{k} equispaced coplanar beams from gantry {a:g} deg"}
            for n, (k, a) in sorted(BEAM_TEMPLATES.items())]


def _sites() -> list[dict]:
    from atp.commands.common import DEFAULT_SITE
    from atp.goals.loader import list_sites, site_path

    return [{"name": s, "default": s == DEFAULT_SITE, "available": True,
             "detail": str(site_path(s))} for s in list_sites()]


def _institutions() -> list[dict]:
    from atp.goals.loader import find_institutions

    return [{"name": n, "default": False, "available": True, "detail": str(p)}
            for n, p in sorted(find_institutions().items())]


def listing(kind: str) -> list[dict]:
    """Entries of one KIND: name, default, available (can run here), detail."""
    return globals()[f"_{kind}"]()


def run(args) -> int:
    kinds = [args.kind] if args.kind else list(KINDS)
    data = {k: listing(k) for k in kinds}
    if args.json:
        print_json(data[args.kind] if args.kind else data)
        return 0
    for k in kinds:
        print(f"{k} ({OPTION[k]}):")
        for e in data[k]:
            flags = " (default)" if e["default"] else ""
            flags += "" if e["available"] else " [unavailable]"
            print(f"  {e['name']:<24}{flags:<16}{e['detail']}".rstrip())
        if k == "institutions":
            from atp.goals.loader import CONFIG_PATH_ENV, institution_search_path

            print(f"  (searched: {', '.join(map(str, institution_search_path()))}; add "
                  f"folders with {CONFIG_PATH_ENV})")
    return 0
