"""Institution overlays (``site_configs/<institution>.yaml``): explicit, validated merges.

An overlay changes a shipped goal list for one institution, per site::

    institution: example_parotid_sparing
    description: ...
    sites:
      hn:                               # applies to --site hn only
        priority_weights: {base: 10, top: 3, table: {1: 1000}}   # replaces the rule
        beam_template: hn_9field        # beam arrangement name(s) for this site
        beams: 9
        remove:                         # 1. goals to drop
          - goal: Larynx.Dmean          #    by id ...
          - {structure: Esophagus, metric: Dmean}   # ... or by structure (+ metric)
        modify:                         # 2. fields to change on existing goals
          - goal: Parotid_L.Dmean.pred
            set: {tolerance: -20, priority: 3}
        add:                            # 3. new goals (same keys as in a goal list)
          - {structure: Cavity_Oral, metric: Dmean, operator: "<=", value: 40,
             priority: 4, note: "NRG HN001"}

Rules: a selector must match exactly one goal (``goal:`` id, or ``structure:`` with an
optional ``metric:``); a selector that matches nothing or several goals is an error
naming the overlay file and line. ``set`` may change value, tolerance, priority,
weight, operator, note, required, inner_mm, outer_mm (not structure/metric/control:
remove and add instead); every changed goal is validated again with the same rules
as a goal list, and errors point at the overlay line. Requesting a site the overlay
does not list is an error (``sites: {lung: {}}`` says "no changes for lung").
"""

from __future__ import annotations

from dataclasses import replace

from atp.errors import GoalListError, quote
from atp.goals.metric import parse_metric
from atp.goals.schema import (
    Field,
    GoalList,
    canonical_structure,
    check_document,
    check_unique_ids,
    parse_beams,
    parse_goal,
    parse_priority_weights,
    raw_fields,
    reparse_goal,
)

OVERLAY_KEYS = ("institution", "description", "sites")
SITE_KEYS = ("priority_weights", "beam_template", "beams", "remove", "modify", "add")
SETTABLE = ("value", "tolerance", "priority", "weight", "operator", "note", "required",
            "inner_mm", "outer_mm")
SELECTOR_KEYS = ("goal", "structure", "metric")


def _line(m, k, default=None):
    return m.line_of(k) if hasattr(m, "line_of") else default


def overlay_sites(data, file) -> dict:
    """Validate the top of an overlay document; return its ``sites`` mapping."""
    check_document(data, file, OVERLAY_KEYS,
                   "an overlay must be a mapping with 'institution' and 'sites'",
                   "institution", "name the institution")
    sites = data.get("sites")
    if not isinstance(sites, dict) or not sites:
        raise GoalListError("'sites' must map site names to their changes", file=file,
                            line=_line(data, "sites", 1), field="sites")
    return sites


def _select(goals, sel, file, line, what: str) -> int:
    """Index of the one goal a selector addresses (errors name file and line)."""
    if not isinstance(sel, dict):
        raise GoalListError(f"each '{what}' entry must be a mapping with 'goal' (an id) or "
                            "'structure' (+ 'metric')", file=file, line=line, field=what)
    keys = [k for k in SELECTOR_KEYS if k in sel]
    if "goal" in sel:
        if "structure" in sel or "metric" in sel:
            raise GoalListError("address a goal by 'goal' (id) or by 'structure'/'metric', "
                                "not both", file=file, line=line, field=f"{what}.goal")
        gid = sel["goal"]
        hits = [i for i, g in enumerate(goals) if g.id == gid]
        desc = f"id {quote(gid)}"
    elif "structure" in sel:
        name = canonical_structure(str(sel["structure"]))[0]
        hits = [i for i, g in enumerate(goals) if g.structure == name]
        desc = f"structure {quote(name)}"
        if "metric" in sel:
            m = parse_metric(sel["metric"], file=file, line=_line(sel, "metric", line),
                             field=f"{what}.metric")
            hits = [i for i in hits if goals[i].metric.text == m.text]
            desc += f" and metric '{m.text}'"
    else:
        raise GoalListError(f"'{what}' entry needs 'goal' (an id) or 'structure'", file=file,
                            line=line, field=what)
    if not hits:
        raise GoalListError(f"{what}: no goal with {desc} in the site's list; ids: "
                            f"{quote([g.id for g in goals], 200)}", file=file,
                            line=_line(sel, keys[0], line), field=f"{what}.{keys[0]}")
    if len(hits) > 1:
        raise GoalListError(f"{what}: {desc} matches {len(hits)} goals "
                            f"({[goals[i].id for i in hits]}); address one by 'goal: <id>'",
                            file=file, line=_line(sel, keys[0], line),
                            field=f"{what}.{keys[0]}")
    return hits[0]


def apply_overlay(base: GoalList, raws: list, data, file: str, site: str) -> GoalList:
    """Merge an overlay document into ``base`` (the goal list of ``site``)."""
    sites = overlay_sites(data, file)
    institution = str(data["institution"]).strip()
    if site not in sites:
        raise GoalListError(f"overlay has no section for site '{site}'; it covers "
                            f"{sorted(map(str, sites))} (add 'sites: {{{site}: {{}}}}' for "
                            "no changes)", file=file, line=_line(data, "sites", 1),
                        field=f"sites.{site}")
    sec = sites[site] or {}
    sline = _line(sites, site, 1)
    if not isinstance(sec, dict):
        raise GoalListError("a site section must be a mapping", file=file, line=sline,
                            field=f"sites.{site}")
    for k in sec:
        if k not in SITE_KEYS:
            raise GoalListError(f"unknown key {quote(k)}; allowed: {', '.join(SITE_KEYS)}",
                                file=file, line=_line(sec, k, sline), field=f"sites.{site}.{k}")
    goals = list(base.goals)
    raws = [dict(r) for r in raws]
    changes_made: list[dict] = []

    def entries(key):
        items = sec.get(key) or []
        if not isinstance(items, list):
            raise GoalListError(f"'{key}' must be a list", file=file,
                                line=_line(sec, key, sline), field=f"sites.{site}.{key}")
        return [(item, items.line_of(i) if hasattr(items, "line_of") else sline)
                for i, item in enumerate(items)]

    for item, ln in entries("remove"):
        for k in item if isinstance(item, dict) else ():
            if k not in SELECTOR_KEYS:
                raise GoalListError(f"unknown key {quote(k)} in remove (use goal, or structure "
                                    "+ metric)", file=file, line=_line(item, k, ln),
                                    field=f"remove.{k}")
        i = _select(goals, item, file, ln, "remove")
        changes_made.append({"id": goals[i].id, "change": "removed", "file": file,
                             "line": ln})
        del goals[i]
        del raws[i]
    for item, ln in entries("modify"):
        i = _select(goals, item, file, ln, "modify")
        for k in item:
            if k not in SELECTOR_KEYS + ("set",):
                raise GoalListError(f"unknown key {quote(k)} in modify (selector + 'set')",
                                    file=file, line=_line(item, k, ln), field=f"modify.{k}")
        changes = item.get("set")
        if not isinstance(changes, dict) or not changes:
            raise GoalListError("modify needs 'set': a mapping of fields to change",
                                file=file, line=_line(item, "set", ln), field="modify.set")
        raw = dict(raws[i])
        for k, v in changes.items():
            if k not in SETTABLE:
                raise GoalListError(
                    f"cannot set {quote(k)} (settable: {', '.join(SETTABLE)}); to change the "
                    "structure, metric or control remove the goal and add a new one",
                    file=file, line=_line(changes, k, ln), field=f"modify.set.{k}")
            raw[k] = Field(v, file, _line(changes, k, ln))
        if "value" in changes and changes["value"] != "predicted" and "tolerance" not in \
                changes and "tolerance" in raw and raw["tolerance"].file != file:
            raw.pop("tolerance")  # a tolerance belongs to the 'predicted' value it replaced
        raws[i] = raw
        goals[i] = reparse_goal(goals[i], raw)
        changes_made.append({"id": goals[i].id, "change": "modified", "file": file,
                             "line": ln, "fields": sorted(map(str, changes))})
    for item, ln in entries("add"):
        if not isinstance(item, dict):
            raise GoalListError("each added goal must be a mapping", file=file, line=ln,
                                field="add")
        raw = raw_fields(item, file)
        goals.append(parse_goal(raw, file=file, line=ln, index=len(goals)))
        raws.append(raw)
        changes_made.append({"id": goals[-1].id, "change": "added", "file": file,
                             "line": ln})
    check_unique_ids(goals)
    pw = base.priority_weights
    if "priority_weights" in sec:
        pw = parse_priority_weights(sec["priority_weights"], file,
                                    _line(sec, "priority_weights", sline))
    bt, beams = parse_beams(sec, file)
    return replace(base, goals=tuple(goals), priority_weights=pw,
                   beam_template=bt if bt is not None else base.beam_template,
                   beams=beams if beams is not None else base.beams,
                   institution=institution, overlay_file=file,
                   overlay_changes=tuple(changes_made))
