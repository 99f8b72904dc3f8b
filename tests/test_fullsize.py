"""The full-size SD1.5 stand-in through a real server on the CPU (`make test` includes it).

``tools/make_tiny_checkpoint.py --arch sd15-full-fp16`` writes a random-weight file with the
layout, shapes and dtype of ``v1-5-pruned-emaonly-fp16.safetensors`` (859.5M-parameter U-Net,
full VAE, 12-layer CLIP-L).  ComfyUI loads it as SD15 without missing keys; the node trains it
for 2 steps at 64 px (latents 8x8, which the three downsamplings take to 1x1: every block
runs) in the ``12gb`` memory mode, so the server stays under 16 GB of RSS on this 23 GB
machine.  Checked: the peak RSS, the pre-flight estimate against the measured training peak,
the base weights after training, the saved delta's key set and stock ``LoraLoaderModelOnly``.
"""
from __future__ import annotations

import re
import threading
import time

import pytest
from safetensors import safe_open

from conftest import _ensure_ckpt
from fault_pack import TRAIN_THREAD
from fault_pack.harness import check_prompt, file_unet_hash, make_server, rss_bytes, thread_names
from tools.graphs import install_subject, loader, personalize_inputs

FULL = "fullsize_sd15_fp16.safetensors"
GB = 1e9
RSS_LIMIT = 16 * GB
UNET = "model.diffusion_model."


class RssSampler:
    """Samples the server's RSS every 50 ms, and whether the training thread is alive."""

    def __init__(self, pid: int) -> None:
        self.pid, self.samples = pid, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                training = any(n.startswith(TRAIN_THREAD[:15]) for n in thread_names(self.pid))
                self.samples.append((rss_bytes(self.pid), training))
            except (OSError, RuntimeError):
                return
            time.sleep(0.05)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def peak(self, training_only: bool = False) -> int:
        return max(r for r, t in self.samples if t or not training_only)


@pytest.fixture(scope="module")
def full_ckpt(comfyui_root):
    return _ensure_ckpt(FULL, "sd15-full-fp16")


def test_fullsize_sd15_trains_in_a_real_server_within_16gb(tmp_path_factory, full_ckpt, tiny_ckpt):
    expected_hash = file_unet_hash(full_ckpt)
    with safe_open(str(full_ckpt), framework="pt") as f:
        unet_keys = {k[len(UNET):] for k in f.keys() if k.startswith(UNET)}
    server = make_server(tmp_path_factory.mktemp("fullsize") / "comfy", tiny_ckpt, (full_ckpt,))
    install_subject(server.input_dir)
    with server, RssSampler(server.proc.pid) as rss:
        # The checkpoint loaded (and cached by ComfyUI for the next prompt): the baseline.
        before = check_prompt(server.client, FULL)
        assert before["hash"] == expected_hash
        baseline = rss_bytes(server.proc.pid)
        graph = loader(ckpt=FULL)
        graph["train"] = {"class_type": "LipschitzPersonalize",
                          "inputs": personalize_inputs(steps=2, memory="12gb", learning_rate=1e-4)}
        graph["save"] = {"class_type": "LipschitzSaveDelta", "inputs": {"delta": ["train", 1],
                                                                         "filename_prefix": "fullsize"}}
        result = server.client.run(graph, timeout=1500)
        assert result.status == "success", (result.error, server.log_tail())
        texts = result.texts_for("train")
        # No "clip missing: ...", "unet missing", "Missing VAE keys", "unexpected" from the loader.
        loader_warnings = [ln for ln in server.log_tail(200_000).splitlines()
                           if re.search(r"(clip|unet) (missing|unexpected)|(Missing|Leftover) VAE keys", ln)]
        assert not loader_warnings, loader_warnings

        # The pre-flight figure against what training added to the server's RSS.
        plan = next(t for t in texts if t.startswith("memory: "))
        estimate = float(re.search(r"needs about ([\d.]+) GB", plan).group(1)) * GB
        measured = rss.peak(training_only=True) - baseline
        print(f"\n[fullsize] baseline {baseline / GB:.2f} GB, training peak +{measured / GB:.2f} GB, "
              f"pre-flight estimate {estimate / GB:.2f} GB, server peak {rss.peak() / GB:.2f} GB")
        assert abs(estimate - measured) <= 0.15 * measured, (estimate, measured)

        # The saved delta: every U-Net tensor, as stock LoraLoaderModelOnly reads it.
        saved = result.outputs["save"]["text"][0]
        delta_path = server.base_dir / "models" / saved
        with safe_open(str(delta_path), framework="pt") as f:
            keys = set(f.keys())
        wanted = {f"{UNET[6:]}{n.rsplit('.', 1)[0]}.{'diff' if n.endswith('weight') else 'diff_b'}"
                  for n in unet_keys}
        assert keys == wanted
        (server.base_dir / "models" / "loras").mkdir(parents=True, exist_ok=True)
        (server.base_dir / "models" / "loras" / "fullsize_delta.safetensors").symlink_to(delta_path)
        apply = {"ckpt": loader(ckpt=FULL)["ckpt"],
                 "lora": {"class_type": "LoraLoaderModelOnly",
                          "inputs": {"model": ["ckpt", 0], "lora_name": "fullsize_delta.safetensors",
                                     "strength_model": 1.0}},
                 "hash": {"class_type": "LipschitzTestUNetHash", "inputs": {"model": ["lora", 0]}}}
        applied = server.client.run(apply, timeout=600)
        assert applied.status == "success", applied.error
        assert applied.outputs["hash"]["text"][0] != expected_hash  # the delta changed the weights
        assert "lora key not loaded" not in server.log_tail(200_000)

        # The base the other nodes hold is bit-identical after all of it.
        assert check_prompt(server.client, FULL)["hash"] == expected_hash
    assert rss.peak() < RSS_LIMIT, f"server peak RSS {rss.peak() / GB:.2f} GB"
