"""The ComfyUI side of the pack, under the node classes (everything here imports ComfyUI;
what needs no ComfyUI is in :mod:`trainer`).

* :mod:`.model` - the MODEL as training loads it: SD1.5 guard, fingerprint, dynamic VRAM, device memory.
* :mod:`.attention` - PyTorch's attention for training, whatever kernel ComfyUI samples with.
* :mod:`.anchor` - theta0: the checkpoint file's values or the model as held, found and read.
* :mod:`.encode` - the prompt and photos encoded once (CLIP conditioning, VAE latents).
* :mod:`.patches` - the MODEL clone carrying the delta, and what ComfyUI's fp16 patch loses of it.
* :mod:`.run` - one personalization (:class:`~.run.RunSpec`): validation, the cache of finished
  runs, resume, training in ComfyUI's worker thread, saving.
* :mod:`.folders` - ``models/lipschitz_deltas`` and the names of the files in it.
* :mod:`.eval_models` - the evaluation encoders in ComfyUI's model folders, and the device.
* :mod:`.progress`, :mod:`.routes` - progress bar, node text, websocket events, status route.
* :mod:`.types` - the pack's socket types.
"""
