"""Offline scripts of the fast path's networks (Bev2Fluence initial fluence, fluence
correction), run from the repository root:

* ``python -m training.fastpath.gen_data``: Bev2Fluence training data (BEV inputs +
  optimised fluence maps, one npz per patient);
* ``python -m training.fastpath.gen_correction_data``: correction-network training data;
* ``python -m training.fastpath.train_bev2fluence``: train either network (``--kind``),
  write its weights and model card;
* ``python -m training.fastpath.eval_bev2fluence``: dose-domain check of weights against
  the exact fallback.

They import the library (``atp``, ``atp.optimizer.fastpath``, ``atp.predictor``); no
library module imports them. Commands and data: ``optimizer/fastpath/MODEL_CARD*.md``.
"""
