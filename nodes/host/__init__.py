"""The ComfyUI side of the pack, under the node classes (everything here imports ComfyUI;
what needs no ComfyUI is in :mod:`trainer`).

* :mod:`.adapter` - ComfyUI's MODEL / CLIP / VAE -> what the trainer needs, and back.
* :mod:`.run` - one personalization (:class:`~.run.RunSpec`): validation, the cache of finished
  runs, resume, training in ComfyUI's worker thread, saving.
* :mod:`.folders` - ``models/lipschitz_deltas`` and the names of the files in it.
* :mod:`.eval_models` - the evaluation encoders in ComfyUI's model folders, and the device.
* :mod:`.progress`, :mod:`.routes` - progress bar, node text, websocket events, status route.
* :mod:`.types` - the pack's socket types.
"""
