"""The paper's 2-D toy experiment (section 4.3, appendix C and F, Fig. 14), on the real trainer.

Five base classes of 2-D Gaussians (std 0.5) sit on the vertices of a regular pentagon of
radius 3; a conditional eps-predicting MLP is pre-trained on them, then fine-tuned on a new
class 5 at the origin under ``L_denoise + lambda * L_lip`` for several ``lambda``, and under a
DreamBooth-style objective (``lambda = 0``, class-0 data as a prior term with weight 100).
Pre-training and every fine-tune run through the pack's ``RegularizedTrainer`` with a
``ParameterDelta`` - the very step the SD1.5 trainer takes - so the toy checks the shipped
objective, not a re-implementation of it.  A research tool, not part of the shipped pack:

* :mod:`.data` - the classes, their points, the epoch batches;
* :mod:`.model` - the noise schedule, the eps-MLP, the ``sum_sq`` matched scale;
* :mod:`.sampler` - ancestral DDPM sampling and the preservation / adaptation scores;
* :mod:`.experiment` - :class:`~.experiment.ToyConfig`, :func:`~.experiment.run_toy` (pre-train,
  fine-tune every setting, per seed, in a process pool) and the summary over seeds;
* :mod:`.figure`, :mod:`.tables` - ``toy.png`` and the markdown tables of ``docs/toy.md``;
* :mod:`.cli` - ``python -m tools.toy --seeds 0-7 --out DIR``.

The pack is imported as ``lipschitz_personalize`` (:mod:`tools.pack_import`).
"""
from ..pack_import import add_to_sys_path

add_to_sys_path()
