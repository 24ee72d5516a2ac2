"""Optimiser backends, one file each (cpu, gpu, qp); see :mod:`atp.optimizer.registry`."""
