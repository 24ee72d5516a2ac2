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
import scipy.sparse as sp

from atp.dose import registry as engines
from atp.dose.far_scatter import FarScatter
from atp.dose.geometry import Beam, arc_control_points, arc_dose_angles
from atp.dose.influence import BeamletInfo, DoseInfluence
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
#: 'sweep': sliding-window arcs (the default); 'dmpo': rule-based arc sequencing + DMPO
VMAT_METHOD = "sweep"
VMAT_METHODS = ("sweep", "dmpo")
#: sweep: one optimised fluence map and one leaf sweep per sector of this many degrees
VMAT_SECTOR_DEG = 20.0
#: sweep: gantry angles a sector's planning beam is computed at (atp.vmatplan.
#: sweep_influence): each beamlet takes the dose of the one its sweep passes it at
VMAT_DIJ_ANGLES = 4
#: sweep: control points a sector, the sweep's leaf positions sampled (1 deg apart at 20:
#: leaves move linearly between control points, and a sweep sampled every 4 deg missed its
#: fluence by up to 12 Gy of PTV D99 on train pt_9; the dose is computed per 4 deg,
#: atp.dose.geometry.arc_dose_angles)
VMAT_CPS_PER_SECTOR = 20
#: optimize() options of the fluence solve that DMPO's rounds take over (the goal check,
#: the attainment and hard-goal rules)
_ROUND_OPTIONS = ("goal_check", "hard_growth", "attain_max_priority", "attain_max_shift",
                  "attain_margin", "hard_max_factor", "hard_max_shift", "attain_ids",
                  "attain_release", "attain_limits", "attain_weight_ids", "attain_growth",
                  "attain_max_factor")


@dataclass(frozen=True)
class VmatOptions:
    """The VMAT technique's knobs (``--vmat KEY=VALUE``; ``dmpo``: a dict of
    :class:`atp.sequencer.dmpo.DmpoOptions` fields).

    ``method``: ``'sweep'`` (the default: sliding-window arcs, one fluence map per
    ``sector_deg`` sector optimised as a static field at the sector's centre, delivered
    by one leaf sweep while the gantry turns through the sector, ``cps_per_sector``
    control points a sector; :func:`sweep_beams`; the planning dij at ``dij_angles``
    angles a sector, :func:`sweep_influence`) or ``'dmpo'`` (control points every
    ``spacing_deg``, rule-based arc sequencing, then direct machine-parameter
    optimisation). ``arcs`` and ``collimator_deg`` default to the method's own (sweep:
    one arc, collimator 0; dmpo: two arcs, collimator +-15 deg)."""

    method: str = VMAT_METHOD
    arcs: int | None = None
    spacing_deg: float = VMAT_SPACING_DEG
    collimator_deg: float | None = None
    sector_deg: float = VMAT_SECTOR_DEG
    cps_per_sector: int = VMAT_CPS_PER_SECTOR
    dij_angles: int = VMAT_DIJ_ANGLES
    jaw_tracking: bool = False
    sector_cps: int = VMAT_SECTOR_CPS
    dmpo_rounds: int = VMAT_DMPO_ROUNDS
    dmpo: dict = field(default_factory=dict)
    start: str = VMAT_START
    cg: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in VMAT_METHODS:
            raise InputError(f"vmat method must be one of {', '.join(VMAT_METHODS)}, got "
                             f"{self.method!r}", field="vmat.method")
        sweep = self.method == "sweep"
        if self.arcs is None:
            object.__setattr__(self, "arcs", 1 if sweep else VMAT_ARCS)
        if self.collimator_deg is None:
            object.__setattr__(self, "collimator_deg", 0.0 if sweep else VMAT_COLLIMATOR_DEG)
        if not (np.isfinite(self.sector_deg) and 5.0 <= self.sector_deg <= 60.0
                and abs(360.0 / self.sector_deg - round(360.0 / self.sector_deg)) < 1e-6):
            raise InputError(f"vmat sector_deg must divide 360 and be in [5, 60], got "
                             f"{self.sector_deg!r}", field="vmat.sector_deg")
        if (int(self.cps_per_sector) != self.cps_per_sector
                or not 1 <= self.cps_per_sector <= 60):
            raise InputError(f"vmat cps_per_sector must be 1..60, got "
                             f"{self.cps_per_sector!r}", field="vmat.cps_per_sector")
        if int(self.dij_angles) != self.dij_angles or not 1 <= self.dij_angles <= 10:
            raise InputError(f"vmat dij_angles must be 1..10, got {self.dij_angles!r}",
                             field="vmat.dij_angles")
        if sweep and self.arcs > 2:
            raise InputError(f"vmat method 'sweep' plans 1 or 2 arcs, got {self.arcs!r}",
                             field="vmat.arcs")
        if sweep and self.arcs == 2 and self.collimator_deg == 0:
            raise InputError("two sweep arcs need collimator_deg > 0 (the arcs are told "
                             "apart by their collimator, +-collimator_deg)",
                             field="vmat.collimator_deg")
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

    def sequence_params(self) -> dict:
        """The arc sequencer's parameters: sweep arcs (``vmat-sliding``) one pass, one
        sector per planning beam of :func:`sweep_beams`, sampled ``cps_per_sector``
        times (the pipeline fits the sectors' MU to the dose the optimiser planned,
        leaf leakage included: ``atp.pipeline._leaky_dose``); DMPO arcs (rule-based
        ``vmat``) one pass per arc, ``sector_cps``."""
        if self.method == "sweep":
            return {"passes": 1, "sector_deg": float(self.sector_deg),
                    "samples_per_cp": int(self.cps_per_sector),
                    "jaw_tracking": bool(self.jaw_tracking)}
        return {"passes": 1, "jaw_tracking": self.jaw_tracking,
                "sector_cps": int(self.sector_cps)}

    def to_dict(self) -> dict:
        return asdict(self)


def vmat_arcs(options: VmatOptions | None = None):
    """The control points (``atp.dose.geometry.Beam``) of the technique's arcs; for
    the sweep method the sectors' centres (:func:`sweep_beams`)."""
    o = options or VmatOptions()
    if o.method == "sweep":
        return sweep_beams(o)
    beams = []
    for k in range(int(o.arcs)):
        cw = k % 2 == 0
        col = (o.collimator_deg if cw else -o.collimator_deg) % 360.0
        beams += arc_control_points(180.0, 180.0, float(o.spacing_deg),
                                    "cw" if cw else "ccw", collimator_deg=col)
    return beams


def sweep_beams(options: VmatOptions):
    """The planning beams of sweep arcs: one static beam at the centre of every
    ``sector_deg`` sector of each full arc (the first clockwise from 180 deg, the second
    counter-clockwise with its sectors shifted by half a sector, collimator alternately
    +-``collimator_deg``), in delivery order. Each is optimised as a static field and its
    map delivered by one leaf sweep while the gantry turns through its sector
    (:mod:`atp.sequencer.vmat_sliding`, one sector per planning beam)."""
    o = options
    n = round(360.0 / o.sector_deg)
    beams = []
    for k in range(int(o.arcs)):
        cw = k % 2 == 0
        col = (o.collimator_deg if cw else -o.collimator_deg) % 360.0
        centre = 180.0 + o.sector_deg * (0.5 if cw else 1.0)
        step = o.sector_deg if cw else -o.sector_deg
        beams += [Beam(float((centre + j * step) % 360.0), col) for j in range(n)]
    return beams


def sweep_influence(engine, patient, options: VmatOptions, *, beamlet_size_mm=5.0,
                    dose_grid_factor: int = 2, sectors_per_call: int = 3, **kw):
    """The planning dose-influence matrix of sweep arcs: one beam per sector
    (:func:`sweep_beams`, at the sector's centre), each beamlet's column the dose of the
    gantry angle at which the sector's sweep passes it.

    A sweep crosses each leaf pair's span once while the gantry turns through the sector
    (left to right in a pass's even sectors, right to left in its odd ones,
    :mod:`atp.sequencer.vmat_sliding`), so a beamlet a fraction f of the way along its
    row is delivered about f of the way through the sector. The sector is computed at
    ``dij_angles`` gantry angles (the centres of equal sub-sectors, by ``engine``,
    ``sectors_per_call`` sectors at a time) and each beamlet takes the column of the
    sub-sector holding its f (its row: the sector's beamlets in that leaf row; a
    beamlet not selected at that angle takes the nearest angle's). With ``dij_angles``
    1 every beamlet is computed at the sector's centre. ``kw``: the engine's
    ``influence`` options."""
    eng = engines.get(engine)
    k_n = int(options.dij_angles)
    centres = sweep_beams(options)
    subs = _sweep_sub_beams(options)
    mats, fars, index, bev_x, bev_y, first = [], [], [], [], [], None
    for s0 in range(0, len(centres), int(sectors_per_call)):
        chunk = range(s0, min(s0 + int(sectors_per_call), len(centres)))
        d = eng.influence(patient, [b for s in chunk for b in subs[s]],
                          beamlet_size_mm=beamlet_size_mm, dose_grid_factor=dose_grid_factor,
                          **kw)
        first = first or d
        sel = []
        for n, s in enumerate(chunk):
            cols, keys = _sweep_columns(d.beamlets, n * k_n, k_n, _sweep_direction(options, s))
            sel.append(cols)
            index.append(np.full(cols.size, s, dtype=np.int32))
            size_x, size_y = d.beamlets.beamlet_size_mm
            bev_x.append((keys[:, 1] + 0.5) * size_x)
            bev_y.append((keys[:, 0] + 0.5) * size_y)
        sel = np.concatenate(sel)
        mats.append(d.matrix[:, sel])
        fars.append((None if d.far is None else replace(d.far, V=d.far.V[:, sel].tocsr()),
                     sel.size))
    matrix = sp.hstack(mats, format="csc", dtype=np.float32)
    iso = first.beamlets.isocenter_mm[0]
    info = BeamletInfo(np.concatenate(index), [c.gantry_deg for c in centres],
                       [c.collimator_deg for c in centres], [c.couch_deg for c in centres],
                       np.tile(iso, (len(centres), 1)), np.concatenate(bev_x),
                       np.concatenate(bev_y), first.beamlets.beamlet_size_mm)
    meta = dict(first.meta)
    meta.update({"sweep": {"sector_deg": float(options.sector_deg), "dij_angles": k_n},
                 "seconds": None})
    return DoseInfluence(matrix, info, first.dose_grid, first.patient_grid, meta,
                         far=FarScatter.hstack(fars, matrix.shape[0]))


def _sweep_sub_beams(options: VmatOptions) -> list[list[Beam]]:
    """Per sector of :func:`sweep_beams`, its ``dij_angles`` beams at the centres of equal
    sub-sectors, in delivery order (the first arc clockwise, the second back)."""
    k_n = int(options.dij_angles)
    per_arc = round(360.0 / options.sector_deg)
    out = []
    for s, c in enumerate(sweep_beams(options)):
        turn = 1.0 if (s // per_arc) % 2 == 0 else -1.0
        start = c.gantry_deg - turn * options.sector_deg / 2.0
        out.append([Beam(float((start + turn * (k + 0.5) * options.sector_deg / k_n) % 360.0),
                         c.collimator_deg, c.couch_deg, c.isocenter_mm) for k in range(k_n)])
    return out


def _sweep_direction(options: VmatOptions, sector: int) -> int:
    """+1: sector ``sector`` of :func:`sweep_beams` sweeps left to right (its arc's even
    sectors), -1: right to left (atp.sequencer.vmat_sliding alternates them)."""
    per_arc = round(360.0 / options.sector_deg)
    return 1 if (sector % per_arc) % 2 == 0 else -1


def _sweep_columns(beamlets, offset: int, k_n: int, direction: int):
    """(columns, keys): for one sector computed as beams ``offset .. offset + k_n - 1``
    of ``beamlets``, the union of its beamlet positions (keys (n, 2): leaf row, column
    index) and the column each takes: the sub-beam its sweep passes it in."""
    b = beamlets
    mine = np.flatnonzero((b.beam_index >= offset) & (b.beam_index < offset + k_n))
    size_x, size_y = b.beamlet_size_mm
    ix = np.floor(b.bev_x_mm[mine] / size_x).astype(np.int64)
    iy = np.floor(b.bev_y_mm[mine] / size_y).astype(np.int64)
    kk = b.beam_index[mine] - offset
    keys = np.unique(np.stack([iy, ix], axis=1), axis=0)
    lo = {r: keys[keys[:, 0] == r, 1].min() for r in np.unique(keys[:, 0])}
    hi = {r: keys[keys[:, 0] == r, 1].max() for r in np.unique(keys[:, 0])}
    where = {(int(y), int(x), int(k)): int(c) for c, y, x, k in zip(mine, iy, ix, kk)}
    cols = np.empty(keys.shape[0], dtype=np.int64)
    for n, (y, x) in enumerate(keys):
        f = (x - lo[y] + 0.5) / (hi[y] - lo[y] + 1.0)
        want = min(int((f if direction > 0 else 1.0 - f) * k_n), k_n - 1)
        k = min((k for k in range(k_n) if (int(y), int(x), k) in where),
                key=lambda k: (abs(k - want), k))
        cols[n] = where[(int(y), int(x), k)]
    return cols, keys


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
    control point's gantry angle, one per distinct geometry; control points closer than
    :data:`atp.dose.geometry.ARC_DOSE_STEP_DEG` share the one at their rounded angle,
    :func:`atp.dose.geometry.arc_dose_angles`), as
    :func:`atp.sequencer.rtplan.read_rt_plan` reads the exported RT Plan -- so the
    reported dose is what ``atp dose`` recomputes. (The planning dij has one beam per
    arc sector; the arcs' half-step end control points use the first / last sector's.)"""
    keys: dict = {}
    geometry: list = []
    out = []
    for b in delivery.beams:
        iso = np.asarray(b.isocenter_mm, np.float64)
        idx = np.zeros(b.n_control_points, dtype=np.int64)
        for k, g in enumerate(arc_dose_angles(b.gantry_deg)):
            key = (round(float(g), 4), round(float(b.collimator_deg), 4),
                   round(float(b.couch_deg), 4), *np.round(iso, 3))
            if key not in keys:
                keys[key] = len(geometry)
                geometry.append(Beam(float(g), float(b.collimator_deg), float(b.couch_deg),
                                     tuple(float(v) for v in iso)))
            idx[k] = keys[key]
        out.append(replace(b, dij_beam=idx))
    return replace(delivery, beams=tuple(out)), geometry
