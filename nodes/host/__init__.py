"""The ComfyUI side of the pack, under the node classes.

* :mod:`.adapter` - ComfyUI's MODEL / CLIP / VAE -> what the trainer needs, and back.
* :mod:`.run` - one personalization (:class:`~.run.RunSpec`): validation, the cache of finished
  runs, resume, training in ComfyUI's worker thread, saving.  The seam: the only module that imports
  both ComfyUI and :mod:`trainer`.
* :mod:`.delta_file` - the delta file format (diff keys, metadata, the resume state).
* :mod:`.folders` - ``models/lipschitz_deltas`` and the names of the files in it.
* :mod:`.progress`, :mod:`.routes` - progress bar, node text, websocket events, status route.
* :mod:`.images`, :mod:`.plot`, :mod:`.grid` - photos in, report and grid images out.
* :mod:`.errors`, :mod:`.types` - the user-facing input error, the pack's socket types.
"""
