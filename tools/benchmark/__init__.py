"""The paper's DreamBooth benchmark, headless, on diffusers (``python -m tools.benchmark``).

* :mod:`.diffusers_host` - diffusers' SD1.5 -> what the trainer needs (as ``nodes/host/`` for ComfyUI).
* :mod:`.train` - one personalization with the unchanged :mod:`trainer`.
* :mod:`.protocol` - subjects, prompts, seeds and drift prompts from the benchmark folder.
* :mod:`.job` - one (subject, lambda): train, sample, score with :mod:`trainer.evaluation`.
* :mod:`.runner` - the jobs, resume, results.csv / summary.md / plot; :mod:`.ray_jobs` - the same on Ray.
* :mod:`.make_tiny_diffusers` - tiny random diffusers SD1.5 for the smoke run and the tests.

The pack is imported as ``lipschitz_personalize`` (:mod:`tools.pack_import`), whatever the
checkout's folder is called.
"""
from ..pack_import import add_to_sys_path

add_to_sys_path()
