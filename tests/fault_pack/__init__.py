"""Test-only ComfyUI custom node pack: fault injection and a base-weight hash.

Linked into the custom_nodes of the reliability tests' own server only (see
``tests/fault_pack/harness.py``); it never ships with the product.

* ``LipschitzTestFaultHook`` passes its MODEL through after registering a forward hook on one
  U-Net sub-module.  The hook counts only training calls (grad enabled: ComfyUI samples and
  encodes under inference mode, in the same worker thread) and at the N-th one raises ``RuntimeError("injected fault ...")`` or
  turns the output into NaN.  It removes itself once it has fired, and every execution of the
  node first removes whatever an earlier one left, so nothing leaks into later prompts.
* ``LipschitzTestUNetHash`` loads the MODEL as sampling would and reports the SHA-256 of all
  its U-Net parameters (float32 bytes, sorted by name) as UI text.
"""
from __future__ import annotations

import hashlib
import threading

import torch

TRAIN_THREAD = "lipschitz-train"
_handles: list = []
_lock = threading.Lock()


def _clear() -> None:
    with _lock:
        while _handles:
            _handles.pop().remove()


def unet_hash(named_tensors) -> str:
    """SHA-256 over ``name|shape|float32 bytes`` in name order (shared with the tests)."""
    h = hashlib.sha256()
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        t = t.detach().float().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class _OutputNode:
    """What every test-only output node declares (V1 node API)."""

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing/lipschitz"


class LipschitzTestFaultHook:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "mode": (["raise", "nan", "off"],),
            "at_call": ("INT", {"default": 3, "min": 1, "max": 100000}),
            "module": ("STRING", {"default": "out.2"}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "testing/lipschitz"

    @classmethod
    def IS_CHANGED(cls, **_kwargs):
        return float("nan")  # never cached: the hook must be (re)armed by every prompt

    def run(self, model, mode, at_call, module):
        _clear()
        if mode == "off":
            return (model,)
        target = model.model.diffusion_model.get_submodule(module)
        state = {"calls": 0}

        def hook(_mod, _args, output):
            if not torch.is_grad_enabled():
                return None
            state["calls"] += 1
            if state["calls"] < at_call:
                return None
            _clear()
            if mode == "raise":
                raise RuntimeError(f"injected fault at training forward call {state['calls']}")
            return output * float("nan")

        with _lock:
            _handles.append(target.register_forward_hook(hook))
        return (model,)


class LipschitzTestUNetHash(_OutputNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}


    @classmethod
    def IS_CHANGED(cls, **_kwargs):
        return float("nan")

    def run(self, model):
        import comfy.model_management

        comfy.model_management.load_models_gpu([model])
        digest = unet_hash(model.model.diffusion_model.named_parameters())
        return {"ui": {"text": [digest]}}


NODE_CLASS_MAPPINGS = {
    "LipschitzTestFaultHook": LipschitzTestFaultHook,
    "LipschitzTestUNetHash": LipschitzTestUNetHash,
}


class LipschitzTestProcess(_OutputNode):
    """The server process's resident memory and live Python thread names, as UI text."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {"after": ("LATENT",)}}


    @classmethod
    def IS_CHANGED(cls, **_kwargs):
        return float("nan")

    def run(self, after=None):
        import gc

        gc.collect()
        rss = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        return {"ui": {"text": [f"rss={rss}", *[t.name for t in threading.enumerate()]]}}


NODE_CLASS_MAPPINGS["LipschitzTestProcess"] = LipschitzTestProcess


class LipschitzTestSink(_OutputNode):
    """Output node for graphs that only train: reports the DELTA's steps and status."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"delta": ("DELTA",)}}


    def run(self, delta):
        return {"ui": {"text": [str(delta.steps_done), delta.meta.get("status", "")]}}


NODE_CLASS_MAPPINGS["LipschitzTestSink"] = LipschitzTestSink


class LipschitzTestDynamicVram:
    """Its MODEL reports ``is_dynamic()`` like current ComfyUI's ``ModelPatcherDynamic`` (dynamic
    VRAM, on by default there), on a 0.3.x patcher whose ``clone`` cannot disable it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "testing/lipschitz"

    def run(self, model):
        dynamic = model.clone()
        dynamic.is_dynamic = lambda: True
        return (dynamic,)


NODE_CLASS_MAPPINGS["LipschitzTestDynamicVram"] = LipschitzTestDynamicVram
