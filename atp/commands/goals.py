"""``atp goals show|list``: inspect shipped goal lists and institution overlays.

* ``atp goals list [--json]``: shipped sites and institutions.
* ``atp goals show [--site SITE (default hn) [--institution X] | --goal-list FILE]
  [--json]``: the
  goal list after the overlay merge: priority, structure, metric, operator, value (or
  'predicted' with its tolerance), weight and note of every goal; goals the institution
  overlay modified (``*``) or added (``+``), and those it removed, name the overlay's
  file:line. ``--institution NAME`` is looked up on the overlay search path
  (``ATP_CONFIG_PATH``, the user config folder, the shipped overlays:
  :mod:`atp.goals.loader`).
"""

from __future__ import annotations

from atp.commands.common import DEFAULT_SITE, print_json
from atp.goals.loader import (
    list_institutions,
    list_sites,
    load_goal_list,
    read_goal_list,
    site_path,
)


def register(sub) -> None:
    p = sub.add_parser("goals", help="show shipped goal lists and institution overlays")
    gsub = p.add_subparsers(dest="goals_command", metavar="{show,list}")
    show = gsub.add_parser("show", help="print a site's goal list after an overlay merge")
    add_goal_list_arguments(show)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=run_show)
    lst = gsub.add_parser("list", help="list shipped sites and institutions")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=run_list)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def add_goal_list_arguments(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--site", help="shipped goal list by site name (default hn; see "
                                  "`atp list sites`)")
    g.add_argument("--goal-list", metavar="FILE", help="a goal-list YAML file")
    p.add_argument("--institution", metavar="NAME|FILE",
                   help="institution overlay: shipped name or a YAML file")


def goal_list_from_args(args):
    site = args.site if args.site or args.goal_list else DEFAULT_SITE
    return load_goal_list(site=site, path=args.goal_list, institution=args.institution)


def format_value(goal) -> str:
    if goal.is_predicted:
        return f"predicted{goal.tolerance_pct:+g}%"
    if isinstance(goal.value, str):
        return goal.value
    unit = goal.metric.result_unit
    return f"{goal.value:g}" + (f" {unit}" if unit else "")


def overlay_marks(gl) -> dict[str, dict]:
    """Goal id -> the overlay's last change to it (modified / added / removed)."""
    return {c["id"]: c for c in gl.overlay_changes}


def run_show(args) -> int:
    gl = goal_list_from_args(args)
    marks = overlay_marks(gl)
    if args.json:
        data = gl.to_dict()
        for g in data["goals"]:
            c = marks.get(g["id"])
            g["overlay_change"] = None if c is None or c["change"] == "removed" else c
        data["removed_by_overlay"] = [c for c in gl.overlay_changes
                                      if c["change"] == "removed"
                                      and c["id"] not in gl.ids]
        print_json(data)
        return 0
    title = f"goal list '{gl.site}'" + (f" + institution '{gl.institution}'"
                                        if gl.institution else "")
    print(f"{title}  ({gl.source_file}" + (f", {gl.overlay_file})" if gl.overlay_file
                                          else ")"))
    if gl.description:
        print(gl.description)
    print(f"priority -> weight: {gl.priority_weights.describe()}")
    if gl.beam_template or gl.beams:
        print(f"beams: {gl.beam_template or '-'} ({gl.beams or '-'} beams)")
    print(f"{'P':>3} {'id':<30}{'structure':<22}{'metric':<11}{'op':<3}{'value':<16}"
          f"{'weight':>8}  note")
    for g in sorted(gl.goals, key=lambda g: g.priority):
        where = g.structure
        if g.params.get("control") in ("ring", "conformity"):
            where = f"{g.params['control']}:{g.params['around']}"
        if g.params.get("control") == "ring":
            where = f"ring {g.params['inner_mm']:g}-{g.params['outer_mm']:g}mm"
        c = marks.get(g.id)
        mark, src = " ", ""
        if c is not None and c["change"] == "modified":
            mark = "*"
            src = f"  [overlay sets {', '.join(c['fields'])}: {c['file']}:{c['line']}]"
        elif c is not None and c["change"] == "added":
            mark, src = "+", f"  [added by overlay: {c['file']}:{c['line']}]"
        print(f"{mark}{g.priority:>2} {g.id:<30}{where:<22}{g.metric.text:<11}"
              f"{g.operator:<3}{format_value(g):<16}{gl.weight_for(g):>8g}  {g.note}{src}")
    for c in gl.overlay_changes:
        if c["change"] == "removed" and c["id"] not in gl.ids:
            print(f"-   {c['id']:<30}removed by overlay: {c['file']}:{c['line']}")
    if gl.overlay_changes:
        print("(* modified, + added, - removed by the institution overlay)")
    return 0


def run_list(args) -> int:
    sites = []
    for s in list_sites():
        gl, _ = read_goal_list(site_path(s))
        sites.append({"site": s, "goals": len(gl.goals), "description": gl.description})
    insts = list_institutions()
    if args.json:
        print_json({"sites": sites, "institutions": insts})
        return 0
    print("sites (--site):")
    for s in sites:
        print(f"  {s['site']:<14}{s['goals']:>3} goals  {s['description'][:70]}")
    print("institutions (--institution):")
    for i in insts:
        print(f"  {i}")
    return 0
