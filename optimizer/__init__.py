"""optimizer stage of atp: objectives, problem building, backends, refinement.

Entry points: :func:`optimizer.problem.build_problem`, :func:`optimizer.solve.optimize`,
:func:`optimizer.refine.refine`, :mod:`optimizer.registry` (backends cpu, gpu, qp).
"""
