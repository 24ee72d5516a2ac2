"""sequencer stage of atp (see ARCHITECTURE.md): MLC/machine models as data, IMRT
(step-and-shoot, sliding window) and VMAT leaf sequencing, deliverable dose.

Typical use (one call: ``sequencer.sequence(weights_mu, dij, "vmat", fractions=35)``,
which also re-fits the MU, see ``atp.sequencer.reweight``)::

    from atp.sequencer import load_machine, fluence_set, get_sequencer, deliverable_dose
    machine = load_machine("millennium120")
    fl = fluence_set(weights_mu, dij.beamlets, machine.leaf_edges_mm, fractions=35)
    delivery = get_sequencer("vmat").sequence(fl, machine)
    dose_gy = deliverable_dose(delivery, dij)
"""

from atp.sequencer.deliverable import deliverable_dose, delivered_weights
from atp.sequencer.delivery import BeamDelivery, Delivery, check_delivery
from atp.sequencer.fluence import BeamFluence, FluenceSet, fluence_set
from atp.sequencer.machine import Machine, available_machines, load_machine
from atp.sequencer.registry import get as get_sequencer
from atp.sequencer.registry import names as sequencer_names

__all__ = [
           "BeamDelivery",
           "BeamFluence",
           "Delivery",
           "FluenceSet",
           "Machine",
           "available_machines",
           "check_delivery",
           "default_technique",
           "deliverable_dose",
           "delivered_weights",
           "fluence_set",
           "get_sequencer",
           "load_machine",
           "sequence",
           "sequencer_names",
]


def __getattr__(name):
    if name in ("default_technique", "sequence"):
        # lazy: CLI start-up -- atp.sequencer.api re-fits the MU (atp.sequencer.reweight:
        # scipy.optimize, ~0.2 s), which the registry and the machines (`atp list`) do
        # not need
        from atp.sequencer.api import default_technique, sequence
        return {"default_technique": default_technique, "sequence": sequence}[name]
    raise AttributeError(f"module 'atp.sequencer' has no attribute {name!r}")
