"""``atp list [KIND] [--json]``: what can be named on the command line.

KIND is one of predictors, engines, backends, sequencers, machines, templates, sites,
institutions (default: all). Each entry is the value an option takes (``--predictor``,
``--dose-engine``, ``--backend``, ``--sequencer``, ``--machine``, ``--beam-template``,
``--site``, ``--institution``) with whether it can run here and where it comes from. The
plug-in kinds (predictors, engines, backends, sequencers) come from one listing,
:meth:`atp.registry.Registry.listing`: a plug-in that fails to load is shown as broken
with its one-line reason, never left out.
"""

from __future__ import annotations

from atp.commands.common import DEFAULT_SITE, print_json
from atp.goals.loader import (
    CONFIG_PATH_ENV,
    find_institutions,
    institution_search_path,
    list_sites,
    site_path,
)

# The registries, machines and beam templates load inside the functions that list them
# (marked "lazy: CLI start-up"): every command module is imported to build the parser,
# and the stages' packages import scipy (and the predictors' pydicom), seconds on a
# loaded machine, which `atp --help` should not pay.

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


def _plugins(reg, default: str, row=None) -> list[dict]:
    """One row per name of a plug-in registry (:meth:`atp.registry.Registry.listing`):
    a broken plug-in is listed, unavailable, with its one-line reason; ``row(name)`` gives
    the others' ``available`` and ``detail``."""
    out = []
    for info in reg.listing():
        entry = {"name": info.name, "default": info.name == default and not info.broken,
                 "available": not info.broken, "source": info.origin, "detail": ""}
        if info.broken:
            entry["detail"] = f"broken ({info.target}): {info.error}"
        elif row is not None:
            entry.update(row(info.name))
        if info.origin != "built-in" and not info.broken:
            entry["detail"] = ", ".join(filter(None, (info.origin, entry["detail"])))
        out.append(entry)
    return out


def _predictors() -> list[dict]:  # lazy: CLI start-up
    from atp.predictor import registry as predictors

    index = predictors.shipped_index()

    def row(name: str) -> dict:
        entry = index.get(name, {})
        needs = entry.get("needs", [])
        runnable = predictors._runnable(entry) if entry else True
        score = entry.get("validation", {}).get("dose_score_gy")
        detail = entry.get("kind", "")
        if score is not None:
            detail += f", validation dose score {score:g} Gy"
        if entry.get("sites"):  # the default serves these sites; others get the baseline
            detail += f", sites {', '.join(entry['sites'])}"
        if needs and not runnable:
            detail += f" (needs {', '.join(needs)}: not installed)"
        return {"available": runnable, "detail": detail}

    return _plugins(predictors.PREDICTORS, predictors.default_predictor_name(), row)


def _engines() -> list[dict]:  # lazy: CLI start-up
    from atp.dose import registry as engines

    return _plugins(engines.ENGINES, engines.DEFAULT, lambda n: {
        "detail": "devices cpu, cuda" if n == "pencil-beam" else ""})


def _backends() -> list[dict]:  # lazy: CLI start-up
    from atp.optimizer import registry as backends

    auto = {"name": "auto", "default": True, "available": True, "source": "built-in",
            "detail": "gpu when a GPU is present, else cpu"}
    return [auto] + _plugins(backends.BACKENDS, "auto", lambda n: {
        "available": backends.is_installed(n)})


def _sequencers() -> list[dict]:  # lazy: CLI start-up
    from atp.sequencer import registry as sequencers

    auto = {"name": "auto", "default": True, "available": True, "source": "built-in",
            "detail": "sliding window for static beams, vmat for arcs"}
    return [auto] + _plugins(sequencers.SEQUENCERS, "auto")


def _machines() -> list[dict]:  # lazy: CLI start-up
    from atp.sequencer.machine import MACHINE_DIR, available_machines

    return [{"name": n, "default": n == "millennium120", "available": True,
             "detail": str(MACHINE_DIR / f"{n}.yaml")} for n in available_machines()]


def _templates() -> list[dict]:  # lazy: CLI start-up
    from atp.dose.geometry import BEAM_TEMPLATES

    return [{"name": n, "default": False, "available": True,
             "detail": f"{k} equispaced coplanar beams from gantry {a:g} deg"}
            for n, (k, a) in sorted(BEAM_TEMPLATES.items())]


def _sites() -> list[dict]:
    return [{"name": s, "default": s == DEFAULT_SITE, "available": True,
             "detail": str(site_path(s))} for s in list_sites()]


def _institutions() -> list[dict]:
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
            flags += "" if e["available"] else \
                (" [broken]" if e["detail"].startswith("broken") else " [unavailable]")
            print(f"  {e['name']:<24}{flags:<16}{e['detail']}".rstrip())
        if k == "institutions":
            print(f"  (searched: {', '.join(map(str, institution_search_path()))}; add "
                  f"folders with {CONFIG_PATH_ENV})")
    return 0
