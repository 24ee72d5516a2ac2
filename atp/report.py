"""The plan report: one self-contained ``report.html`` (figures as base64 PNG, no links).

Sections: plan summary (patient, prescription, and the plan's site, institution
overlay, predictor, backend, ... as ``plan_info``), DVH (plan solid vs prediction dashed,
one distinct colour per structure), goal table (priority, goal id, pass/fail, value,
achieved, margin, note), dose colour-wash over the CT with isodose lines and the
structures outlined in their DVH colours, on axial / coronal / sagittal planes through the
main target (one large view each), delivery and fidelity tables (when given), timings.
Figures are ``matplotlib.figure.Figure`` objects drawn by the Agg canvas directly: no
pyplot, so the host application's matplotlib backend is never switched.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
from pathlib import Path

import numpy as np

from atp.errors import InputError
from atp.io.dicom_export_geometry import slice_layout
from atp.outputs import atomic_write_bytes
from atp.patient import Role

_CSS = """
body{font-family:system-ui,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.pass{background:#dff5df}.fail{background:#f9d6d6}.unknown{background:#eee}
img{max-width:100%}img.view{display:block;margin:6px 0}.small{color:#666;font-size:12px}
code{font-size:12px}
"""


def _figure(width_in: float, height_in: float):
    """A matplotlib Figure drawn by the Agg canvas directly: no pyplot, and the host
    application's backend (``matplotlib.use``) is never switched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional (atp[report])
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in))
    FigureCanvasAgg(fig)
    return fig


def _png(fig, dpi: int = 100, tight: bool = True) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# one colour per structure, the same in the DVH and on the dose views; well-separated hues
# (tab10, then Dark2 and Set1), so neighbouring legend entries never share a hue family
_PALETTE = ("#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#bcbd22", "#ff7f0e", "#7f7f7f", "#1b9e77", "#d95f02", "#7570b3", "#e7298a",
            "#66a61e", "#e6ab02", "#a6761d", "#377eb8", "#4daf4a", "#984ea3", "#a65628",
            "#f781bf", "#999999", "#e41a1c")


def structure_colours(names) -> dict[str, str]:
    """Structure name -> colour, distinct for the first len(_PALETTE) structures."""
    return {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(names)}


ISODOSE_PCT = (107, 95, 80, 50, 30)  # % of the highest prescription
_ISODOSE_COLOURS = ("#ff00ff", "#ff2020", "#ffd000", "#00e0ff", "#2050ff")


def _esc(v) -> str:
    return html.escape(str(v))


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}f}" if np.isfinite(v) else "–"
    return _esc(v)


def _structures_for_plots(patient) -> list[str]:
    return [n for n, s in patient.structures.items()
            if s.role in (Role.TARGET, Role.ORGAN) and s.n_voxels > 0]


def plain_label(text) -> str:
    """A structure name as literal matplotlib text: ``$`` escaped (no mathtext, so a name
    like ``Larynx $x^^2$`` cannot break the figure), a leading ``_`` kept visible."""
    text = str(text).replace("$", r"\$")
    return "\u200b" + text if text.startswith("_") else text


def dvh_figure(patient, dose_gy, predicted_dose_gy=None, structures=None):
    """DVH figure: plan (solid) and prediction (dashed) per structure, one colour per
    structure (:func:`structure_colours`); returns a data URI."""
    names = structures or _structures_for_plots(patient)
    colours = structure_colours(names)
    fig = _figure(11, 6.5)
    ax = fig.add_subplot()
    top = float(np.max(dose_gy)) * 1.05 if np.max(dose_gy) > 0 else 1.0
    for name in names:
        m = patient.mask(name)
        c = colours[name]
        for dose, style, lab in ((dose_gy, "-", name), (predicted_dose_gy, "--", None)):
            if dose is None:
                continue
            d = np.sort(np.asarray(dose)[m])
            levels = np.linspace(0, top, 400)
            vol = 100.0 * (d.size - np.searchsorted(d, levels, side="left")) / d.size
            ax.plot(levels, vol, style, color=c, lw=1.5,
                    label=None if lab is None else plain_label(lab))
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.set_xlim(0, top)
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    title = "DVH: plan (solid)" + (" vs prediction (dashed)" if predicted_dose_gy is not None
                                    else "")
    ax.set_title(title)
    ax.legend(fontsize=9, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              frameon=False)
    return _png(fig)


def dose_wash_figure(patient, dose_gy, target: str | None = None):
    """Dose colour-wash over the CT on axial, coronal and sagittal planes through the
    main target's centre of mass, cropped to the body: isodose lines (:data:`ISODOSE_PCT`
    of the highest prescription, else of the maximum dose) and every target and organ
    outlined in its DVH colour; one large view per row. Returns a data URI."""
    from matplotlib import colormaps  # optional (atp[report])
    from matplotlib.lines import Line2D

    layout = slice_layout(patient.grid)  # (z, y, x) for axis-aligned grids
    ct = layout.reorient(patient.ct_hu)
    dose = layout.reorient(np.asarray(dose_gy, dtype=np.float64))
    target = target or (patient.targets[0] if patient.targets else None)
    tmask = layout.reorient(patient.mask(target)) if target else None
    if tmask is not None and tmask.any():
        centre = np.rint(np.argwhere(tmask).mean(axis=0)).astype(int)
    else:
        centre = np.array(ct.shape) // 2
    sp = layout.grid.spacing_mm
    dmax = float(dose.max()) if dose.max() > 0 else 1.0
    ref = max((p.dose_gy for p in patient.prescriptions), default=dmax)
    iso = [(pct, pct / 100.0 * ref, col) for pct, col in zip(ISODOSE_PCT, _ISODOSE_COLOURS)
           if pct / 100.0 * ref <= dmax]
    names = _structures_for_plots(patient)
    colours = structure_colours(names)
    masks = {n: layout.reorient(patient.mask(n)) for n in names}
    body = layout.reorient(patient.body_mask)
    lo, hi = np.zeros(3, int), np.array(ct.shape)
    if body.any():  # crop to the body (+5 voxels): the anatomy fills the view
        idx = np.argwhere(body)
        lo, hi = np.maximum(idx.min(0) - 5, 0), np.minimum(idx.max(0) + 6, ct.shape)

    def plane(a, axis):
        k = centre[axis]
        cut = [slice(lo[i], hi[i]) for i in range(3)]
        cut[axis] = k
        return a[tuple(cut)]

    views = [("axial", 0, sp[1] / sp[2], False), ("coronal", 1, sp[0] / sp[2], True),
             ("sagittal", 2, sp[0] / sp[1], True)]
    cmap = colormaps["jet"]
    figs = []
    for title, axis, aspect, flip_up in views:
        c, d = plane(ct, axis), plane(dose, axis)
        # fixed layout (no tight bounding box: one draw instead of two): the view on the
        # left two thirds at the plane's true aspect, colour bar and legend on the right
        h = 7.3 * min(1.4, max(0.45, c.shape[0] * aspect / c.shape[1]))
        fig = _figure(11, h + 0.5)
        ax = fig.add_axes((0.005, 0.01, 0.66, h / (h + 0.5)))
        cax = fig.add_axes((0.675, 0.1, 0.015, 0.8 * h / (h + 0.5)))
        origin = "lower" if flip_up else "upper"  # superior up in coronal/sagittal
        ax.imshow(c, cmap="gray", vmin=-400, vmax=600, aspect=aspect, origin=origin)
        wash = np.ma.masked_less(d, 0.1 * dmax)
        im = ax.imshow(wash, cmap=cmap, alpha=0.4, vmin=0, vmax=dmax, aspect=aspect,
                       origin=origin, interpolation="bilinear")
        handles = []
        for pct, level, col in iso:
            if d.min() < level < d.max():  # contour and imshow share pixel centres
                cs = ax.contour(d, levels=[level], colors=[col], linewidths=1.2,
                                linestyles="--")
                ax.clabel(cs, fmt={level: f"{pct}%"}, fontsize=8, inline=True)
                handles.append(Line2D([], [], color=col, ls="--",
                                      label=f"{pct}% ({level:.1f} Gy)"))
        for n in names:
            m = plane(masks[n], axis)
            if m.any():
                ax.contour(m.astype(np.float32), levels=[0.5], colors=[colours[n]],
                           linewidths=2.2 if n in patient.targets else 1.6)
                handles.append(Line2D([], [], color=colours[n], label=plain_label(n)))
        ax.set_title(f"{title} (slice {centre[axis] + 1} of {ct.shape[axis]})")
        ax.set_axis_off()
        fig.colorbar(im, cax=cax, label="dose (Gy)")
        if handles:
            fig.legend(handles=handles, fontsize=9, loc="upper left",
                       bbox_to_anchor=(0.76, 0.98), frameon=False,
                       title=f"isodose (% of {ref:g} Gy),\nstructures", title_fontsize=9)
        figs.append(_png(fig, dpi=90, tight=False))
    return figs


def _goal_rows(goal_results) -> list[dict]:
    rows = []
    for r in goal_results or []:
        rows.append(r.to_dict() if hasattr(r, "to_dict") else dict(r))
    return rows


def _goal_table(goal_results) -> str:
    rows = _goal_rows(goal_results)
    if not rows:
        return "<p class='small'>no goals evaluated</p>"
    rows.sort(key=lambda r: (r.get("priority", 99), str(r.get("structure", ""))))
    head = ("<tr><th>priority</th><th>goal id</th><th>structure</th><th>goal</th>"
            "<th>value</th><th>predicted</th><th>achieved</th><th>margin</th>"
            "<th>result</th><th>note</th></tr>")
    body = []
    for r in rows:
        passed = r.get("passed")
        cls = "pass" if passed is True else "fail" if passed is False else "unknown"
        word = "pass" if passed is True else "FAIL" if passed is False else "n/a"
        unit = r.get("unit", "")
        body.append(
            f"<tr class='{cls}'><td class='num'>{_fmt(r.get('priority'))}</td>"
            f"<td><code>{_esc(r.get('id', ''))}</code></td>"
            f"<td>{_esc(r.get('structure', ''))}</td>"
            f"<td>{_esc(r.get('metric', ''))} {_esc(r.get('operator', ''))}</td>"
            f"<td class='num'>{_fmt(r.get('value'))} {_esc(unit)}</td>"
            f"<td class='num'>{_fmt(r.get('predicted_value'))}</td>"
            f"<td class='num'>{_fmt(r.get('achieved'))} {_esc(unit)}</td>"
            f"<td class='num'>{_fmt(r.get('margin'))}</td><td>{word}</td>"
            f"<td class='small'>{_esc(r.get('note') or '')}</td></tr>")
    n_pass = sum(r.get("passed") is True for r in rows)
    return (f"<p>{n_pass} of {len(rows)} goals met.</p><table>{head}{''.join(body)}</table>")


def _kv_table(d: dict, digits: int = 3) -> str:
    rows = "".join(f"<tr><td>{_esc(k)}</td><td class='num'>{_fmt(v, digits)}</td></tr>"
                   for k, v in d.items())
    return f"<table>{rows}</table>"


def refinement_section(rec: dict) -> str:
    """The refinement rounds (plan.json ``optimizer.refine``): the scorecard mode's
    rounds (total, objectives added, kept, priority-1 goals broken, seconds) with the
    per-item scores of each, or the DVH-point mode's scores."""
    if rec.get("mode") != "scorecard":
        scores = ", ".join(f"{x:.4g}" for x in rec.get("scores") or [])
        return (f"<h2>Refinement (DVH points)</h2><p class='small'>{rec.get('rounds_run', 0)}"
                f" round(s); goal-list score per round (start first): {_esc(scores)}; kept: "
                f"{_esc(rec.get('accepted'))}</p>")
    rounds = rec.get("rounds") or []
    ids = list(rounds[0]["scores"]) if rounds else []
    head = ("<tr><th>round</th><th>total</th><th>objectives</th><th>kept</th>"
            "<th>P1 broken</th><th>s</th>" + "".join(f"<th>{_esc(i)}</th>" for i in ids)
            + "</tr>")
    body = "".join(
        f"<tr><td>{r['round']}</td><td class='num'>{_fmt(r['total'], 2)}</td>"
        f"<td class='num'>{r.get('n_objectives', 0)}</td><td>{'yes' if r['kept'] else 'no'}"
        f"</td><td>{_esc(', '.join(r['broke_p1']) or '-')}</td>"
        f"<td class='num'>{_fmt(r['seconds'], 1)}</td>"
        + "".join(f"<td class='num'>{_fmt(r['scores'].get(i), 2)}</td>" for i in ids)
        + "</tr>" for r in rounds)
    return (f"<h2>Scorecard refinement</h2><p class='small'>scorecard {_esc(rec['scorecard'])}"
            f": total {_fmt(rec['total'], 2)} of {_fmt(rec['max_total'], 2)} after "
            f"{rec['rounds_run']} round(s) (round 0: the goal-list plan); stopped: "
            f"{_esc(rec['stopped'])}. The plan is the best round kept.</p>"
            f"<table>{head}{body}</table>")


def _delivery_table(delivery_summary: dict) -> str:
    top = {k: v for k, v in delivery_summary.items() if not isinstance(v, (list, dict))}
    out = _kv_table(top)
    beams = delivery_summary.get("beams") or []
    if beams:
        keys = list(beams[0])
        head = "".join(f"<th>{_esc(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td class='num'>{_fmt(b.get(k))}</td>" for k in keys)
                       + "</tr>" for b in beams)
        out += f"<table><tr>{head}</tr>{body}</table>"
    return out


def _fidelity_table(fid: dict) -> str:
    g = fid.get("gamma", {})
    out = _kv_table({f"gamma pass rate (%), {g.get('criterion', '')}": g.get("pass_rate_pct"),
                     "voxels scored": g.get("n_voxels"), "mean gamma": g.get("mean_gamma")})
    deltas = fid.get("dvh_delta_gy") or {}
    if deltas:
        keys = list(next(iter(deltas.values())))
        head = "<tr><th>structure</th>" + "".join(f"<th>&Delta;{_esc(k)} (Gy)</th>"
                                                  for k in keys) + "</tr>"
        body = "".join(f"<tr><td>{_esc(n)}</td>" + "".join(
            f"<td class='num'>{_fmt(v.get(k), 3)}</td>" for k in keys) + "</tr>"
            for n, v in deltas.items())
        out += ("<p class='small'>delivered minus ideal (optimised fluence)</p>"
                f"<table>{head}{body}</table>")
    return out


def replan_changes_section(changes) -> str:
    """A re-plan's before -> after table (rows of ``atp.goals.changes.goal_changes``)."""
    if not changes:
        return ("<h2>What this re-plan changed</h2><p class='small'>no goal touched, no "
                "goal flipped between pass and fail</p>")
    head = ("<tr><th>goal</th><th>set</th><th>limit before &rarr; after</th>"
            "<th>achieved before &rarr; after</th><th>result before &rarr; after</th>"
            "<th>why</th></tr>")

    def word(p):
        return "pass" if p is True else "FAIL" if p is False else "n/a"

    body = []
    for r in changes:
        unit = _esc(r.get("unit", ""))
        v0, v1 = r.get("value", [None, None])
        a0, a1 = r.get("achieved", [None, None])
        p0, p1 = r.get("passed", [None, None])
        cls = "pass" if p1 is True else "fail" if p1 is False else "unknown"
        body.append(
            f"<tr class='{cls}'><td>{_esc(r.get('id', ''))}</td>"
            f"<td>{_esc(', '.join(r.get('touched') or []))}</td>"
            f"<td class='num'>{_esc(r.get('operator', ''))} {_fmt(v0)} &rarr; {_fmt(v1)} "
            f"{unit}</td><td class='num'>{_fmt(a0)} &rarr; {_fmt(a1)} {unit}</td>"
            f"<td>{word(p0)} &rarr; {word(p1)}</td><td class='small'>"
            f"{_esc(r.get('why', ''))}</td></tr>")
    return ("<h2>What this re-plan changed</h2><p class='small'>goals whose setting was "
            "changed, and every goal whose pass/fail flipped</p>"
            f"<table>{head}{''.join(body)}</table>")


def render_report(patient, dose_gy, predicted_dose_gy=None, goal_results=None, timings=None,
                  *, title: str | None = None, plan_info: dict | None = None,
                  delivery_summary: dict | None = None,
                  fidelity: dict | None = None, notes=None, changes=None,
                  refinement: dict | None = None) -> str:
    """The report as an HTML string (see :func:`write_report`)."""
    dose = np.asarray(dose_gy, dtype=np.float64)
    patient.grid.check_array(dose, field="dose_gy")
    pred = None
    if predicted_dose_gy is not None:
        pred = np.asarray(predicted_dose_gy, dtype=np.float64)
        patient.grid.check_array(pred, field="predicted_dose_gy")
    if not np.all(np.isfinite(dose)):
        raise InputError("dose contains NaN/inf", field="dose_gy")
    title = title or f"atp plan report — {patient.patient_id}"
    rx = ", ".join(f"{p.target}: {p.dose_gy:g} Gy / {p.fractions} fx"
                   for p in patient.prescriptions) or "none"
    parts = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
              f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>"),
             ("<table>"
              f"<tr><td>patient</td><td>{_esc(patient.patient_id)}</td></tr>"
              f"<tr><td>source</td><td>{_esc(patient.source or '')}</td></tr>"
              f"<tr><td>prescription</td><td>{_esc(rx)}</td></tr>"
              + "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>"
                        for k, v in (plan_info or {}).items() if v not in (None, ""))
              + f"<tr><td>max dose</td><td>{dose.max():.2f} Gy</td></tr>"
              f"<tr><td>created</td><td>{_dt.datetime.now().isoformat(timespec='seconds')}"
              "</td></tr></table>")]
    if delivery_summary:
        parts.append("<p class='small'>Dose, DVH and goal results are from the deliverable "
                     "(sequenced) dose.</p>")
    parts.append("<h2>Dose-volume histograms</h2>")
    parts.append(f"<img alt='DVH' src='{dvh_figure(patient, dose, pred)}'>")
    if changes is not None:
        parts.append(replan_changes_section(changes))
    parts.append("<h2>Clinical goals</h2>" + _goal_table(goal_results))
    if refinement:
        parts.append(refinement_section(refinement))
    parts.append("<h2>Dose distribution</h2>")
    parts.append("<p class='small'>colour-wash with isodose lines (dashed) and structure "
                 "outlines in their DVH colours</p>")
    parts.extend(f"<img class='view' alt='dose colour-wash' src='{uri}'>"
                 for uri in dose_wash_figure(patient, dose))
    if delivery_summary:
        parts.append("<h2>Delivery</h2>" + _delivery_table(delivery_summary))
    if fidelity:
        parts.append("<h2>Sequencing fidelity</h2>" + _fidelity_table(fidelity))
    if timings:
        parts.append("<h2>Timings (s)</h2>" + _kv_table(dict(timings), 3))
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes)
                     + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(plan_dir: str | os.PathLike, patient, dose_gy, predicted_dose_gy=None,
                 goal_results=None, timings=None, **kwargs) -> Path:
    """Write ``plan_dir/report.html`` (atomically) and return its path.

    dose_gy / predicted_dose_gy: Gy on the patient grid. goal_results: GoalResult objects
    or their ``to_dict()`` rows. timings: {stage: seconds}. kwargs: ``title``,
    ``plan_info`` ({label: value} for the summary, e.g. ``Plan.report_info()``: site,
    institution overlay, predictor, backend), ``delivery_summary`` (``Delivery.summary()``),
    ``fidelity``
    (``atp.sequencer.fidelity.fidelity`` output), ``notes``.
    """
    text = render_report(patient, dose_gy, predicted_dose_gy, goal_results, timings, **kwargs)
    path = Path(plan_dir) / "report.html"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
