"""optimizer stage of atp: objectives, problem building, backends, refinement.

Entry points: :func:`atp.optimizer.problem.build_problem`, :func:`atp.optimizer.solve.optimize`,
:func:`atp.optimizer.refine.refine`, :mod:`atp.optimizer.registry` (backends cpu, gpu, qp).
"""
