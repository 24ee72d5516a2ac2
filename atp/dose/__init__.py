"""Dose calculation: beam geometry, dose-influence matrices, engines behind a protocol."""

from atp.dose.influence import BeamletInfo, DoseInfluence

__all__ = ["BeamletInfo", "DoseInfluence"]
