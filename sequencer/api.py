"""One call from optimised fluence to a sequenced delivery (what ``atp.pipeline`` uses)."""

from __future__ import annotations

import numpy as np
from atp.sequencer.apertures import track_jaws
from atp.sequencer.delivery import Delivery
from atp.sequencer.fluence import fluence_set
from atp.sequencer.machine import Machine, load_machine
from atp.sequencer.registry import get
from atp.sequencer.reweight import reweight_mu

from atp.dose.influence import DoseInfluence


def default_technique(dij: DoseInfluence) -> str:
    """'vmat' when the beams form arcs (>= 10 beams, neighbouring angles <= 10 degrees
    apart), else 'imrt-sliding'."""
    g = np.asarray(dij.beamlets.gantry_deg)
    if g.size >= 10:
        steps = np.abs((np.diff(g) + 180.0) % 360.0 - 180.0)
        if np.median(steps) <= 10.0:
            return "vmat"
    return "imrt-sliding"


def sequence(fluence_mu, dij: DoseInfluence, technique: str | None = None, *,
             machine: str | Machine = "millennium120", fractions: int | None = None,
             reweight: bool = True, jaw_tracking: bool | None = None,
             reference_dose=None, **params) -> Delivery:
    """Sequence optimised beamlet weights (MU, total course) for ``dij``'s beams.

    technique: a registry name ('imrt-sns', 'imrt-sliding', 'vmat'; default
    :func:`default_technique`). machine: a shipped machine name, a YAML path or a
    Machine. fractions: the course's fractions (sets per-fraction MU and speed limits;
    default 1). reweight: afterwards choose the segment / control-point MU that best
    reproduce the ideal dose ``dij @ fluence`` (:func:`atp.sequencer.reweight.reweight_mu`;
    leaves unchanged; not for sliding window). jaw_tracking: jaws follow the open leaves
    at every control point (:func:`atp.sequencer.apertures.track_jaws`; default: the
    machine's ``jaws.tracking``), applied before the MU fit so the MU see the leakage they
    get. reference_dose: what the MU fit reproduces instead of ``dij @ fluence`` (Gy on
    ``dij.dose_grid``; e.g. the optimiser's dose with the leaf leakage it planned).
    params: passed to the sequencer's constructor (e.g. ``levels=10``).
    """
    m = machine if isinstance(machine, Machine) else load_machine(machine)
    fs = fluence_set(fluence_mu, dij.beamlets, m.leaf_edges_mm, fractions=fractions or 1)
    delivery = get(technique or default_technique(dij), **params).sequence(fs, m)
    if m.jaw_tracking if jaw_tracking is None else jaw_tracking:
        delivery = track_jaws(delivery)
    if reweight and delivery.technique in ("imrt-sns", "vmat", "vmat-sliding"):
        ref = dij.dose(fluence_mu) if reference_dose is None else reference_dose
        delivery = reweight_mu(delivery, dij, ref)
    return delivery
