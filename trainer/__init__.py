"""Lipschitz-regularized personalization of diffusion models, in pure PyTorch.

Nothing in this package imports ComfyUI: the node layer (``nodes/``) adapts ComfyUI's
objects to these pieces.

* :mod:`trainer.objective` - the paper's objective ``L_denoise + lambda * L_lip`` and the
  closed-form gradient of ``L_lip``.
* :mod:`trainer.delta` - the trainable per-tensor delta ``theta = theta0 + delta`` and its
  injection into a module without writing the base weights.
* :mod:`trainer.lowrank` - the optional memory-light delta ``B A`` (rank r), ``L_lip`` on ``B A``.
* :mod:`trainer.optim` - Adam implementations (default/foreach/fused/8-bit) and Adam stepped
  inside backward.
* :mod:`trainer.loop` - one regularized training step and the step metrics (speed/memory
  options in :class:`~trainer.loop.TrainConfig`, all off by default).
* :mod:`trainer.job` - the background thread that runs the loop with progress, cancel and
  error reporting.
* :mod:`trainer.toy` - the 2-D toy reproduction of the paper's section 4.3.
"""
