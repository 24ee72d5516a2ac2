"""AIRT-style fast path: differentiable dose feedback from a predicted dose to fluence.

One module per step, each usable alone (PyTorch, CPU or CUDA through the tensors' device):

* :mod:`.torch_dose`     dose-influence matrix x fluence as a differentiable op;
* :mod:`.error_map`      error map E = grad_D J(D) (asymmetric PTV term + OAR sliders);
* :mod:`.bev`            parameter-free BEV projection of a 3-D dose per control point;
* :mod:`.initial_fluence` exact non-learned initial fluence (back-projection + steps);
* :mod:`.smoothness`     deliverability regulariser: fluence smoothness along leaf travel
                          and between neighbouring control points;
* :mod:`.correction`     fluence correction by K unrolled exact gradient steps (diagonal
                          row-sum step, no power iteration).
"""
