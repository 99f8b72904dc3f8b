"""Lipschitz-regularized personalization of diffusion models, in pure PyTorch (the paper).

Nothing in this package imports ComfyUI or diffusers: the hosts adapt their objects to it.

* :mod:`trainer.config` - :class:`TrainConfig`: the paper's defaults and their validation.
* :mod:`trainer.objective` - ``L_denoise + lambda * L_lip`` and the closed-form gradient of
  ``L_lip``, for the full and the low-rank delta.
* :mod:`trainer.delta` - the trainable delta ``theta = theta0 + delta`` and its injection into
  a module without writing the base weights.
* :mod:`trainer.loop` - Algorithm 1: one regularized training step.
* :mod:`trainer.metrics` - what a step reports, and a run's log of it.
* :mod:`trainer.job` - the run in the caller's thread (ComfyUI's worker thread): progress,
  cancel, errors handed back.
* :mod:`trainer.persist` - atomic, checksummed safetensors files and the resume state.

Options, beside the main path: :mod:`trainer.optim` (Adam kernels, Adam stepped inside
backward), :mod:`trainer.lowrank` (a rank-r delta, not the paper's full fine-tune).
:mod:`trainer.toy` is the 2-D reproduction of the paper's section 4.3.
"""
