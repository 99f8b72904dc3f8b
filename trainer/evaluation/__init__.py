"""Evaluation of a personalization: the paper's DINO, CLIP-I, CLIP-T and drift scores.

Pure torch/numpy/transformers (no ComfyUI, no diffusers), so the nodes and the headless
benchmark runner compute the same numbers: :mod:`.encoders` turns image batches and prompts
into feature vectors with locally stored CLIP / DINO models, :mod:`.scores` turns features into
scores.
"""
