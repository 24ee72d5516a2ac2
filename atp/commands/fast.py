"""``atp plan PATIENT --fast [--spare OAR=FACTOR ...] [--arc-spacing DEG] [--preset
airt|coverage] [--device auto|cpu|cuda] --out DIR``: the AIRT-style fast path (see :mod:`atp.fastplan`).

The fast-path flags of ``atp plan`` (not a subcommand of its own) and their checks (bad
``--spare`` -> exit 2 with one line, before any work): :func:`add_fast_arguments`,
:func:`reject_fast_only`, :func:`fast_options` (the flags -> sliders and
:class:`~atp.fastplan.FastPlanOptions`). ``atp plan`` (:mod:`atp.commands.plan`) runs it.
"""

from __future__ import annotations

from atp.commands import argtypes
from atp.commands.common import add_repeatable
from atp.errors import InputError

# optimiser-only flags of `atp plan` (dest, flag, value when not given)
NOT_FAST = (("beams", "--beams", None), ("beam_template", "--beam-template", None),
            ("refine", "--refine", None), ("max_iter", "--max-iter", None),
            ("backend", "--backend", "auto"))

# the two network choices: (flag, its weights flag, network, the exact choice, what that is)
NETWORK_FLAGS = (("--initial-fluence", "--weights", "Bev2Fluence", "fallback",
                  ("initial fluence from the trained Bev2Fluence network or the exact "
                   "fallback")),
                 ("--correction", "--correction-weights", "correction-network", "exact",
                  ("fluence correction by the trained correction network or exact "
                   "unrolled gradient steps")))

# flag dest -> FastPlanOptions field, for the flags that are copied when given
COPIED = (("arc_spacing", "arc_spacing_deg"), ("dose_grid_factor", "dose_grid_factor"),
          ("device", "device"), ("initial_fluence", "initial_fluence"),
          ("weights", "weights"), ("correction", "correction"),
          ("correction_weights", "correction_weights"), ("preset", "preset"))


def add_fast_arguments(p) -> None:
    p.add_argument("--fast", action="store_true",
                   help="AIRT-style fast path instead of the optimiser: one full arc, "
                        "predicted dose -> fluence by differentiable dose feedback, VMAT "
                        "sequencing (see --spare, --arc-spacing, --device)")
    add_repeatable(p, "--spare", "OAR=FACTOR",
                   help="--fast: OAR sparing slider, factor in [0, 1): aim the OAR's dose "
                        "below (1 - FACTOR) x the initial fluence's (repeatable)")
    p.add_argument("--arc-spacing", type=argtypes.ARC_SPACING_DEG, default=None, metavar="DEG",
                   help="--fast: degrees between arc control points (default 4)")
    for flag, weights_flag, what, exact, text in NETWORK_FLAGS:
        p.add_argument(flag, default=None, metavar=f"auto|network|{exact}",
                       help=f"--fast: {text} (default auto: the network when its weights "
                            "exist)")
        p.add_argument(weights_flag, default=None, metavar="PT",
                       help=f"--fast: {what} weights file (default: the shipped one)")
    p.add_argument("--aperture-iterations", type=argtypes.ITERATIONS, default=None, metavar="N",
                   help="--fast: L-BFGS-B iterations per round of direct aperture "
                        "refinement after sequencing (leaf tips and control-point MU "
                        "moved to lower the plan objective within the machine limits; "
                        "0: off, control-point MU only; default: the fast path's)")
    p.add_argument("--preset", default=None, metavar="airt|coverage",
                   help="--fast: named settings (default airt: rule-based arcs; coverage: "
                        "sliding-window arc sectors and a coverage-first objective -- "
                        "PTV homogeneity level with the optimiser's, OAR means higher, "
                        "longer beam-on; flags given explicitly win)")
    p.add_argument("--device", default=None, metavar="auto|cpu|cuda",
                   help="--fast: torch device (default auto: cuda when available, else "
                        "cpu; cuda without a GPU is an error)")


def reject_fast_only(args) -> None:
    """Without --fast, the fast-path flags are an input error (not silently ignored)."""
    for dest, flag in (("spare", "--spare"), ("arc_spacing", "--arc-spacing"),
                       ("device", "--device"), ("initial_fluence", "--initial-fluence"),
                       ("weights", "--weights"), ("correction", "--correction"),
                       ("correction_weights", "--correction-weights"),
                       ("aperture_iterations", "--aperture-iterations"),
                       ("preset", "--preset")):
        if getattr(args, dest, None) is not None and getattr(args, dest) != []:
            raise InputError(f"{flag} needs --fast", field=flag)


def check_weights_file(path, flag: str) -> None:  # lazy: torch, only --weights needs it
    """Before any work: ``path`` must load as the network weights ``flag`` names (a
    torch file of plain data, weights_only=True); else InputError naming the file."""
    from atp.optimizer.fastpath.bev2fluence import BEV2FLUENCE, load_weights
    from atp.optimizer.fastpath.correction_net import CORRECTION

    try:
        load_weights(path, "cpu", kind=CORRECTION if "correction" in flag else BEV2FLUENCE)
    except InputError as exc:
        raise InputError(exc.message, file=exc.file or path, field=flag) from None


def fast_options(args):  # lazy: CLI start-up (the fast path imports every stage)
    """(spare, :class:`~atp.fastplan.FastPlanOptions`) from the CLI flags; raises
    InputError on bad input."""
    from atp import fastplan
    from atp.sequencer.machine import load_machine

    for dest, flag, unset in NOT_FAST:
        if getattr(args, dest, unset) != unset:
            raise InputError(f"{flag} does not apply to --fast (one arc; see "
                             "--arc-spacing)", field=flag)
    seq = getattr(args, "sequencer", "auto")
    if seq not in ("auto", "vmat", "vmat-sliding"):
        raise InputError("--fast always sequences a VMAT arc (--sequencer vmat or "
                         "vmat-sliding)", field="--sequencer")
    spare = fastplan.parse_spare_args(args.spare)
    load_machine(args.machine)  # a bad machine file fails before any work
    for flag, weights_flag, _, exact, _ in NETWORK_FLAGS:
        choice = getattr(args, _dest(flag), None)
        if choice is not None and choice not in ("auto", "network", exact):
            raise InputError(f"{_dest(flag)} must be auto, network or {exact}, got "
                             f"'{str(choice)[:40]}'", field=flag)
    for _, weights_flag, _, _, _ in NETWORK_FLAGS:
        if getattr(args, _dest(weights_flag), None) is not None:
            check_weights_file(getattr(args, _dest(weights_flag)), weights_flag)
    opts = {"machine": args.machine}
    if seq != "auto":
        opts["vmat_sequencer"] = seq
    for dest, key in COPIED:
        if getattr(args, dest) is not None:
            opts[key] = getattr(args, dest)
    n = getattr(args, "aperture_iterations", None)
    if n is not None:
        if n < 0:
            raise InputError(f"--aperture-iterations must be >= 0, got {n}",
                             field="--aperture-iterations")
        opts["aperture_iterations"] = n
    return spare, fastplan.fast_plan_options(opts)


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")
