"""``DIR/cohort.html`` of ``atp batch``: one self-contained page over the cohort.

Sections: counts; pass rate per goal with the worst patients per goal (smallest margin);
the standard criteria's pass rates; the scorecard (median total, mean score per item);
DVH bands per structure (median and 10-90 % of the patients' cumulative DVHs; needs
matplotlib, else a note); time per stage (median, 90th percentile, max); failed
patients with their one-line errors. Built from the patients' records only (no dose).
"""

from __future__ import annotations

import datetime as _dt
import importlib.util

import numpy as np

from atp.dvh import cumulative_dvh
from atp.outputs import atomic_write_bytes
from atp.report import (
    _CSS,
    _esc,
    _figure,
    _fmt,
    _png,
    _structures_for_plots,
    plain_label,
    structure_colours,
)

WORST_PER_GOAL = 3
# the cumulative DVH each patient's record keeps for the DVH bands (a few kB a patient)
DVH_STEP_GY = 0.5
DVH_MAX_GY = 90.0


def dvh_curves(patient, dose_gy) -> dict:
    """Cumulative DVH (fraction of the structure) at 0, 0.5, ... 90 Gy per target and
    organ: the cohort's DVH bands are drawn from these (a few kB per patient)."""
    out = {}
    for name in _structures_for_plots(patient):
        d = cumulative_dvh(dose_gy, patient.mask(name), patient.grid.voxel_volume_cc,
                           bin_width_gy=DVH_STEP_GY, max_dose_gy=DVH_MAX_GY)
        out[name] = [round(float(x), 4) for x in d.volume_fraction]
    return out


def _pct(k: int, n: int) -> str:
    return f"{100.0 * k / n:.0f} %" if n else "–"


def _table(headers: tuple, rows: list) -> str:
    """An HTML table: one header row of ``headers``, then ``rows`` (``<tr>`` strings)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _goal_section(good: list) -> str:
    stats: dict = {}
    for rec in good:
        for g in rec.get("goals", []):
            s = stats.setdefault(g["id"], {"g": g, "n": 0, "passed": 0, "rows": []})
            if g.get("passed") is None:
                continue
            s["n"] += 1
            s["passed"] += bool(g["passed"])
            if g.get("margin") is not None:
                s["rows"].append((g["margin"], rec["name"], g.get("achieved")))
    if not stats:
        return "<p>No plan was written.</p>"
    out = []
    for gid, s in sorted(stats.items(), key=lambda kv: (kv[1]["g"].get("priority") or 9,
                                                        kv[0])):
        g = s["g"]
        worst = sorted(s["rows"])[:WORST_PER_GOAL]
        w = ", ".join(f"{_esc(n)} ({_fmt(a)})" for _, n, a in worst)
        rate = s["passed"] / s["n"] if s["n"] else None
        cls = "pass" if rate == 1 else "fail" if rate is not None and rate < 0.5 else ""
        out.append(f"<tr><td>{_fmt(g.get('priority'))}</td><td>{_esc(gid)}</td>"
                   f"<td>{_esc(g.get('operator'))} {_fmt(g.get('value'))} "
                   f"{_esc(g.get('unit') or '')}</td><td class='num {cls}'>"
                   f"{_pct(s['passed'], s['n'])} ({s['passed']}/{s['n']})</td>"
                   f"<td>{w}</td></tr>")
    return _table(("P", "goal", "limit", "pass rate", "worst patients (achieved)"), out)


def _criteria_section(good: list) -> str:
    stats: dict = {}
    for rec in good:
        for c in rec.get("criteria", []):
            s = stats.setdefault(c["id"], {"c": c, "vals": [], "passed": 0})
            s["vals"].append(c["value"])
            s["passed"] += bool(c["passed"])
    if not stats:
        return "<p>–</p>"
    out = []
    for cid, s in stats.items():
        v = np.asarray(s["vals"], float)
        out.append(f"<tr><td>{_esc(cid)}</td><td>{_esc(s['c']['op'])} "
                   f"{_fmt(s['c']['limit'])}</td><td class='num'>"
                   f"{_pct(s['passed'], v.size)}</td><td class='num'>"
                   f"{_fmt(np.median(v))}</td><td class='num'>{_fmt(np.percentile(v, 10))}"
                   f" – {_fmt(np.percentile(v, 90))}</td></tr>")
    return _table(("criterion", "limit (Gy)", "pass rate", "median (Gy)", "10-90 % (Gy)"),
                  out)


def _scorecard_section(good: list) -> str:
    cards = [r["scorecard"] for r in good if r.get("scorecard")]
    if not cards:
        return "<p>No scorecard (pass <code>--scorecard NAME</code>).</p>"
    totals = np.asarray([c["total"] for c in cards], float)
    intro = (f"<p>Scorecard <code>{_esc(cards[0]['scorecard'])}</code>: median total "
             f"{_fmt(np.median(totals))} (10-90 %: {_fmt(np.percentile(totals, 10))} – "
             f"{_fmt(np.percentile(totals, 90))}) over {len(cards)} patients.</p>")
    items: dict = {}
    for c in cards:
        for it in c["items"]:
            s = items.setdefault(it["id"], {"max": it["max"], "scores": []})
            if it["score"] is not None:
                s["scores"].append(it["score"])
    out = []
    for iid, s in items.items():
        m = np.mean(s["scores"]) if s["scores"] else None
        out.append(f"<tr><td>{_esc(iid)}</td><td class='num'>{_fmt(s['max'])}</td>"
                   f"<td class='num'>{_fmt(m)}</td><td class='num'>{len(s['scores'])}"
                   f"</td></tr>")
    return intro + _table(("item", "max", "mean score", "scored"), out)


def _dvh_section(good: list) -> str:
    curves: dict = {}
    for rec in good:
        for name, frac in (rec.get("dvh") or {}).items():
            curves.setdefault(name, []).append(frac)
    if not curves:
        return "<p>–</p>"
    if importlib.util.find_spec("matplotlib") is None:
        return ("<p class='small'>DVH bands not drawn: matplotlib is not installed "
                "(pip install 'atp[report]').</p>")
    names = list(curves)
    colours = structure_colours(names)
    fig = _figure(9.0, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    for name in names:
        a = np.asarray(curves[name], float) * 100.0
        dose = np.arange(a.shape[1]) * DVH_STEP_GY
        lo, med, hi = np.percentile(a, [10, 50, 90], axis=0)
        ax.fill_between(dose, lo, hi, color=colours[name], alpha=0.18, linewidth=0)
        ax.plot(dose, med, color=colours[name], lw=1.6,
                label=f"{plain_label(name)} (n={a.shape[0]})")
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    return (f"<img src='{_png(fig)}' alt='DVH bands'><p class='small'>Line: median over "
            "patients; band: 10th to 90th percentile of the volume at each dose.</p>")


def _timing_section(good: list) -> str:
    stages: dict = {}
    for rec in good:
        for k, v in (rec.get("timings_s") or {}).items():
            stages.setdefault(k, []).append(v)
    wall = [r["seconds"] for r in good if isinstance(r.get("seconds"), (int, float))]
    if wall:
        stages["worker wall time (plan + summary)"] = wall
    if not stages:
        return "<p>–</p>"
    out = []
    for k, v in stages.items():
        a = np.asarray(v, float)
        out.append(f"<tr><td>{_esc(k)}</td><td class='num'>{_fmt(np.median(a))}</td>"
                   f"<td class='num'>{_fmt(np.percentile(a, 90))}</td><td class='num'>"
                   f"{_fmt(a.max())}</td><td class='num'>{a.size}</td></tr>")
    return _table(("stage", "median (s)", "90 % (s)", "max (s)", "n"), out)


def _failures(order, records) -> str:
    bad = [(n, records.get(n)) for n in order
           if records.get(n) is None or records[n]["status"] == "failed"]
    if not bad:
        return "<p>None.</p>"
    out = [f"<tr><td>{_esc(n)}</td><td class='num'>{_fmt(r['exit_code'] if r else None)}"
           f"</td><td>{_esc(r.get('error', '') if r else 'not finished')}</td></tr>"
           for n, r in bad]
    return _table(("patient", "exit", "error"), out)


def render_cohort_report(order, records, rows) -> str:
    good = [records[n] for n in order if records.get(n) and records[n]["status"] in
            ("ok", "p1_unmet")]
    n_ok = sum(1 for r in good if r["status"] == "ok")
    n_unmet = len(good) - n_ok
    n_fail = len(order) - len(good)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>atp cohort</title>"
            f"<style>{_CSS}</style></head><body><h1>atp cohort: {len(order)} patients</h1>"
            f"<p>{n_ok} planned with every priority-1 goal met, {n_unmet} planned with "
            f"priority-1 goals unmet, {n_fail} failed or not finished. "
            f"<span class='small'>Written {stamp}; one row per patient in "
            f"summary.csv.</span></p>"
            f"<h2>Goals: pass rate and worst patients</h2>{_goal_section(good)}"
            f"<h2>Standard criteria (OpenKBP)</h2>{_criteria_section(good)}"
            f"<h2>Scorecard</h2>{_scorecard_section(good)}"
            f"<h2>DVH bands</h2>{_dvh_section(good)}"
            f"<h2>Time per stage</h2>{_timing_section(good)}"
            f"<h2>Failed patients</h2>{_failures(order, records)}"
            "</body></html>\n")


def write_cohort_report(out, order, records, rows) -> str:
    atomic_write_bytes(out / "cohort.html",
                       render_cohort_report(order, records, rows).encode("utf-8"))
    return "cohort.html"
