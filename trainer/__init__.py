"""Lipschitz-regularized personalization of diffusion models, in pure PyTorch (the paper).

Everything that needs no ComfyUI; nothing here imports ComfyUI or diffusers (the hosts adapt
their objects to it; ``tests/test_architecture.py`` enforces it).

* :mod:`trainer.config` - :class:`TrainConfig`: the paper's defaults and their validation.
* :mod:`trainer.objective` - ``L_denoise + lambda * L_lip`` and the closed-form gradient of
  ``L_lip``.
* :mod:`trainer.delta` - the trainable delta ``theta = theta0 + delta`` and its injection into
  a module without writing the base weights.
* :mod:`trainer.loop` - Algorithm 1: one regularized training step.
* :mod:`trainer.metrics` - what a step reports, and a run's log of it.
* :mod:`trainer.job` - the run in the caller's thread (ComfyUI's worker thread): progress,
  cancel, errors handed back.
* :mod:`trainer.persist` - atomic, checksummed safetensors files and the resume state.
* :mod:`trainer.files` - the delta file format (diff keys, metadata, the resume state).
* :mod:`trainer.evaluation` - the paper's DINO, CLIP-I, CLIP-T and drift scores, and the
  metrics rows and tables the nodes show.
* :mod:`trainer.render` - photos in; the report's charts, grids and tables out (Pillow).
* :mod:`trainer.errors` - the user-facing input error: which input, what is wrong, the fix.

Options, beside the main path: :mod:`trainer.optim` (Adam kernels, Adam stepped inside
backward), :mod:`trainer.compact_adam` and :mod:`trainer.memory` (the memory modes).
"""
