"""Lipschitz-regularized personalization of diffusion models, in pure PyTorch (the paper).

Nothing in this package imports ComfyUI or diffusers: the hosts adapt their objects to it.

* :mod:`trainer.config` - :class:`TrainConfig`: the paper's defaults and their validation.
* :mod:`trainer.objective` - ``L_denoise + lambda * L_lip`` and the closed-form gradient of
  ``L_lip``.
* :mod:`trainer.delta` - the trainable delta ``theta = theta0 + delta`` and its injection into
  a module without writing the base weights.
* :mod:`trainer.loop` - Algorithm 1: one regularized training step.
* :mod:`trainer.metrics` - what a step reports, and a run's log of it.
* :mod:`trainer.job` - a run to its end in the caller's thread: progress, cancel, errors.
* :mod:`trainer.persist` - atomic, checksummed safetensors files and the resume state.

Options, beside the main path: :mod:`trainer.optim` (Adam kernels, Adam stepped inside
backward), :mod:`trainer.compact_adam` and :mod:`trainer.memory` (the memory modes).
:mod:`trainer.toy` is the 2-D reproduction of the paper's section 4.3.
"""
