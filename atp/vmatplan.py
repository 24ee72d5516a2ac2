"""VMAT in the optimiser (``atp plan --technique vmat``): arcs, fluence optimisation on
the arc dij, rule-based arc sequencing, then direct machine-parameter optimisation.

The planning floor's part of the technique (the stages stay independent):

1. the beams are :func:`vmat_arcs`: ``arcs`` full coplanar arcs (default two, clockwise
   then counter-clockwise), collimator alternately +``collimator_deg`` / -``collimator_deg``
   (default 15 deg, so the tongue-and-groove strips of the two arcs do not coincide),
   a control point every ``spacing_deg`` (default 6 deg); their dose-influence matrix on
   the CT/2 dose grid with the arc sparsification threshold (``atp.dose.arc``);
2. the goal-list optimisation of :func:`atp.pipeline.plan` on that dij (every term, the
   hard-goal loop and goal attainment as for static fields);
3. :func:`atp.sequencer.vmat.sequence_vmat` with one pass per arc (two arcs already give
   two apertures per gantry sector), each 24-degree sector's summed fluence spread over
   its control points as nested intensity slices (``sector_cps``, SmartArc's coarse-sector
   start), the MU fitted to the ideal dose;
4. :func:`atp.sequencer.dmpo.optimise_machine_parameters`: leaf tips and MU of every
   control point on :func:`goal_objective` -- the goal-list objective as the optimiser
   left it (its terms with the hard-goal weights and the attainment references in force),
   on the deliverable dose (leaf/jaw transmission, tongue and groove, and the far-scatter
   tail the reported dose adds) -- under the machine limits. DMPO runs as an optimiser
   backend (:class:`DmpoBackend`) under :func:`atp.optimizer.solve.optimize`, so the
   hard-goal loop and the attainment rounds go on on the delivered dose: a goal DMPO
   leaves short (typically a target's D99, whose DVH term is weak once the goal is
   nearly met) gets its weight raised and DMPO continues from where it stopped
   (``dmpo_rounds``);
5. the reported dose: the final delivery recomputed over each beam's whole jaw field
   (``atp.pipeline._field_dose``, what ``atp dose`` computes from the RT Plan); when it
   fails a hard goal, a second DMPO pass measures the goals on its beamlet dose plus the
   reported-minus-beamlet offset (kept only when it fails less).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from atp.dose.geometry import Beam, arc_control_points
from atp.errors import InputError
from atp.optimizer.backends.base import Backend, Result
from atp.optimizer.objectives import evaluate_terms
from atp.optimizer.rowop import InterpolatedRows
from atp.optimizer.solve import apply_state, optimize
from atp.sequencer.deliverable import delivered_weights
from atp.sequencer.dmpo import DmpoOptions, machine_limit_report, optimise_machine_parameters
from atp.sequencer.vmat_cg import ColumnGenOptions, column_generation

VMAT_SPACING_DEG = 6.0
VMAT_COLLIMATOR_DEG = 15.0
VMAT_ARCS = 2
VMAT_DMPO_ROUNDS = 3
#: control points per sector whose summed fluence is spread over them as nested slices
#: (atp.sequencer.vmat.sector_slices): 24 deg sectors at the default 6 deg spacing
VMAT_SECTOR_CPS = 4
#: DMPO's start: 'cg' (apertures by column generation on the goal list,
#: atp.sequencer.vmat_cg) or 'sequence' (the rule-based arc sequencing as it is)
VMAT_START = "sequence"
VMAT_STARTS = ("cg", "sequence")
#: optimize() options of the fluence solve that DMPO's rounds take over (the goal check,
#: the attainment and hard-goal rules)
_ROUND_OPTIONS = ("goal_check", "hard_growth", "attain_max_priority", "attain_max_shift",
                  "attain_margin", "hard_max_factor", "hard_max_shift", "attain_ids",
                  "attain_release", "attain_limits", "attain_weight_ids", "attain_growth",
                  "attain_max_factor")


@dataclass(frozen=True)
class VmatOptions:
    """The VMAT technique's knobs (``--vmat KEY=VALUE``; ``dmpo``: a dict of
    :class:`atp.sequencer.dmpo.DmpoOptions` fields)."""

    arcs: int = VMAT_ARCS
    spacing_deg: float = VMAT_SPACING_DEG
    collimator_deg: float = VMAT_COLLIMATOR_DEG
    jaw_tracking: bool = False
    sector_cps: int = VMAT_SECTOR_CPS
    dmpo_rounds: int = VMAT_DMPO_ROUNDS
    dmpo: dict = field(default_factory=dict)
    start: str = VMAT_START
    cg: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if int(self.arcs) != self.arcs or not 1 <= self.arcs <= 4:
            raise InputError(f"vmat arcs must be 1..4, got {self.arcs!r}", field="vmat.arcs")
        if not (np.isfinite(self.spacing_deg) and 1.0 <= self.spacing_deg <= 10.0):
            raise InputError(f"vmat spacing_deg must be in [1, 10] (an arc's control "
                             f"points are <= 10 deg apart), got {self.spacing_deg!r}",
                             field="vmat.spacing_deg")
        if not (np.isfinite(self.collimator_deg) and 0.0 <= self.collimator_deg <= 45.0):
            raise InputError(f"vmat collimator_deg must be in [0, 45], got "
                             f"{self.collimator_deg!r}", field="vmat.collimator_deg")
        if int(self.sector_cps) != self.sector_cps or not 1 <= self.sector_cps <= 10:
            raise InputError(f"vmat sector_cps must be 1..10, got {self.sector_cps!r}",
                             field="vmat.sector_cps")
        if int(self.dmpo_rounds) != self.dmpo_rounds or not 0 <= self.dmpo_rounds <= 10:
            raise InputError(f"vmat dmpo_rounds must be 0..10, got {self.dmpo_rounds!r}",
                             field="vmat.dmpo_rounds")
        if self.start not in VMAT_STARTS:
            raise InputError(f"vmat start must be one of {', '.join(VMAT_STARTS)}, got "
                             f"{self.start!r}", field="vmat.start")
        self.dmpo_options()  # fails early on a bad DMPO field
        self.cg_options()

    @classmethod
    def from_dict(cls, d: dict | None) -> VmatOptions:
        """Options from a dict; an unknown key is an InputError naming it."""
        d = dict(d or {})
        known = cls.__dataclass_fields__
        bad = [k for k in d if k not in known]
        if bad:
            raise InputError(f"unknown VMAT option '{bad[0]}'; known: {', '.join(known)}",
                             field=f"vmat.{bad[0]}")
        if not isinstance(d.get("dmpo", {}), dict):
            raise InputError("vmat dmpo must be a mapping of DMPO options", field="vmat.dmpo")
        return cls(**d)

    def dmpo_options(self) -> DmpoOptions:
        known = DmpoOptions.__dataclass_fields__
        bad = [k for k in self.dmpo if k not in known]
        if bad:
            raise InputError(f"unknown DMPO option '{bad[0]}'; known: {', '.join(known)}",
                             field=f"vmat.dmpo.{bad[0]}")
        try:
            return DmpoOptions(**self.dmpo)
        except TypeError as e:  # a value of the wrong type
            raise InputError(f"bad DMPO option: {e}", field="vmat.dmpo") from None

    def cg_options(self) -> ColumnGenOptions:
        """The column-generation start's options (``start='cg'``; ``n_sub`` DMPO's)."""
        if not isinstance(self.cg, dict):
            raise InputError("vmat cg must be a mapping of column-generation options",
                             field="vmat.cg")
        known = set(ColumnGenOptions.__dataclass_fields__) - {"n_sub"}
        bad = [k for k in self.cg if k not in known]
        if bad:
            raise InputError(f"unknown column-generation option '{bad[0]}'; known: "
                             f"{', '.join(sorted(known))}", field=f"vmat.cg.{bad[0]}")
        try:
            return ColumnGenOptions(**self.cg, n_sub=self.dmpo_options().n_sub)
        except (TypeError, ValueError) as e:  # a value of the wrong type
            raise InputError(f"bad column-generation option: {e}", field="vmat.cg") from None

    def to_dict(self) -> dict:
        return asdict(self)


def vmat_arcs(options: VmatOptions | None = None):
    """The control points (``atp.dose.geometry.Beam``) of the technique's arcs."""
    o = options or VmatOptions()
    beams = []
    for k in range(int(o.arcs)):
        cw = k % 2 == 0
        col = (o.collimator_deg if cw else -o.collimator_deg) % 360.0
        beams += arc_control_points(180.0, 180.0, float(o.spacing_deg),
                                    "cw" if cw else "ccw", collimator_deg=col)
    return beams


class _FineFar:
    """A far-scatter operator on a problem's rows when some are patient-grid rows
    (``Problem.fine``): the dose-grid rows' own, then the interpolation of the far dose
    on the dose voxels those rows read."""

    def __init__(self, far, problem):
        fine = problem.fine
        self.first = fine.first
        interp = fine.interp.tocsc()
        cols = np.flatnonzero(np.diff(interp.indptr))
        self.interp = interp[:, cols].tocsr()
        self.real = far.restrict_rows(problem.rows[:fine.first])
        self.stencil = far.restrict_rows(cols)

    def apply(self, w):
        return np.concatenate([self.real.apply(w),
                               self.interp @ self.stencil.apply(w).astype(np.float32)])

    def rmatvec(self, g):
        g = np.asarray(g)
        return self.real.rmatvec(g[:self.first]) + self.stencil.rmatvec(
            self.interp.T @ g[self.first:].astype(np.float32))


def problem_far(far, problem):
    """``far`` (a dij's far-scatter operator) on ``problem``'s rows: ``apply(w)`` the
    far dose of each row, ``rmatvec(g)`` its adjoint."""
    if getattr(problem, "fine", None) is None:
        return far.restrict_rows(problem.rows)
    return _FineFar(far, problem)


def goal_objective(problem, hard_state=None, dtype=np.float32, far=None):
    """``w -> (J, dJ/dw)``: the goal-list objective of ``problem`` on the dose ``A w``
    (every dose term: the goals', hard ones with the weights and references of
    ``hard_state``, and the automatic fall-off and global-maximum terms). far: the dij's
    far-scatter operator (``dij.far``), so the dose is the reported one, ``A w +
    far(w)`` on the problem's rows (``far.restrict_rows``), and the gradient ``A^T g +
    far^T g``; None: the sparse matrix alone. The fluence regularisers (smoothness, the
    sliding-window MU surrogate) are left out: DMPO's variables are leaves and MU, and it
    has its own MU term. dtype: of the dose and the sums (float64 for finite-difference
    checks)."""
    p = apply_state(problem, hard_state) if hard_state else problem
    # no copies of the problem's matrix (an arc dij's rows run to GB): A^T as A's CSC view
    A = p.A
    if isinstance(A, InterpolatedRows):
        A = A.astype(dtype, copy=False)
    else:
        A = A.tocsr().astype(dtype, copy=False)
    AT = A.T
    arrays = [(t.rows, t.voxel_weight, t.ref_gy) for t in p.terms]
    far_p = None if far is None else problem_far(far, p)

    def value_grad(w):
        d = A @ np.asarray(w, dtype)
        if far_p is not None:
            d = d + far_p.apply(w).astype(dtype)
        total, g_rows, _ = evaluate_terms(p.terms, arrays, d)
        g = np.asarray(AT @ g_rows, np.float64)
        if far_p is not None:
            g += far_p.rmatvec(g_rows)
        return float(total), g

    return value_grad


class DmpoBackend(Backend):
    """DMPO as an optimiser backend (for :func:`atp.optimizer.solve.optimize`): the
    variables are the arcs' leaf tips and MU, ``Result.fluence`` the beamlet weights the
    delivery gives (:func:`atp.sequencer.deliverable.delivered_weights`, transmission in).
    It carries its delivery from one solve to the next (``x0`` is ignored: a warm solve
    continues from the last delivery); ``max_iter``: DMPO iterations of that solve."""

    name = "dmpo"
    description = "direct machine-parameter optimisation of VMAT arcs"
    first_order = True

    def __init__(self, delivery, dij, options: DmpoOptions):
        self.delivery, self.dij, self.options = delivery, dij, options
        self.infos: list[dict] = []

    def solve(self, problem, x0=None, max_iter=None, **_options) -> Result:
        opts = replace(self.options, iterations=int(max_iter or self.options.iterations))
        self.delivery, info = optimise_machine_parameters(
            self.delivery, self.dij.beamlets,
            goal_objective(problem, far=self.dij.far), opts)
        self.infos.append(info)
        w = delivered_weights(self.delivery, self.dij.beamlets, n_sub=opts.n_sub)
        return Result(w, float(info["plan_objective_after"]),
                      "max_iter" if info["stop"] == "iterations" else "optimal", self.name,
                      iterations=int(info["iterations"]),
                      history=[(k, float(v)) for k, v in enumerate(info["history"])])


def dmpo_step(problem, res, dij, delivery, options: VmatOptions, solve_options=None,
              hard_state=None, column_gen: bool = False):
    """DMPO of ``delivery`` on the goal list of ``problem`` as ``res`` (the optimiser's
    result) left it, then ``options.dmpo_rounds`` rounds of the optimiser's hard-goal and
    attainment rules on the delivered dose (``solve_options``: the fluence solve's
    :func:`optimize` options; their goal check measures the goals). hard_state: the
    weights and shifts to start from (default ``res.hard_state``; a second DMPO pass
    passes the first one's, ``info['hard_state']``). column_gen: with ``options.start``
    'cg', the apertures and MU are first rebuilt by column generation on the same
    objective (:func:`atp.sequencer.vmat_cg.column_generation`; the first pass only).
    Returns (delivery, info)."""
    opts = options.dmpo_options()
    start = res.hard_state if hard_state is None else hard_state
    cg = None
    if column_gen and options.start == "cg":
        delivery, cg = column_generation(
            delivery, dij.beamlets, goal_objective(problem, start, far=dij.far),
            options.cg_options())
    be = DmpoBackend(delivery, dij, opts)
    rounds = int(options.dmpo_rounds) if solve_options else 0
    kw = {k: v for k, v in (solve_options or {}).items() if k in _ROUND_OPTIONS}
    out = optimize(problem, be, hard_state=start, hard_rounds=rounds,
                   attain_rounds=rounds, surrogate_offsets=False,
                   max_iter=opts.iterations, **kw)
    first, last = be.infos[0], be.infos[-1]
    info = {k: v for k, v in first.items() if k != "history"} | {
        "objective_after": last["objective_after"],
        "plan_objective_after": last["plan_objective_after"],
        "iterations": sum(i["iterations"] for i in be.infos),
        "evaluations": sum(i["evaluations"] for i in be.infos),
        "stop": last["stop"], "mu_after": last.get("mu_after"), "solves": len(be.infos),
        "kept": any(i["kept"] for i in be.infos),
        "history": [round(float(v), 6) for i in be.infos for v in i.get("history", [])],
        "unmet_hard": [g["id"] for g in out.unmet_hard], "hard_state": out.hard_state,
        "limits": machine_limit_report(be.delivery, opts.travel_per_deg_mm)}
    if cg is not None:
        info.update({"cg_objective": cg["objective"], "cg_evaluations": cg["evaluations"],
                     "cg_objective_per_level": cg["objective_per_level"]})
    return be.delivery, info


def control_point_beams(delivery):
    """(delivery, beams): the delivery with every control point its own dose beam (at the
    control point's gantry angle, one per distinct geometry), as
    :func:`atp.sequencer.rtplan.read_rt_plan` reads the exported RT Plan -- so the
    reported dose is what ``atp dose`` recomputes. (The planning dij has one beam per
    arc sector; the arcs' half-step end control points use the first / last sector's.)"""
    keys: dict = {}
    geometry: list = []
    out = []
    for b in delivery.beams:
        iso = np.asarray(b.isocenter_mm, np.float64)
        idx = np.zeros(b.n_control_points, dtype=np.int64)
        for k, g in enumerate(np.asarray(b.gantry_deg, np.float64) % 360.0):
            key = (round(float(g), 4), round(float(b.collimator_deg), 4),
                   round(float(b.couch_deg), 4), *np.round(iso, 3))
            if key not in keys:
                keys[key] = len(geometry)
                geometry.append(Beam(float(g), float(b.collimator_deg), float(b.couch_deg),
                                     tuple(float(v) for v in iso)))
            idx[k] = keys[key]
        out.append(replace(b, dij_beam=idx))
    return replace(delivery, beams=tuple(out)), geometry
