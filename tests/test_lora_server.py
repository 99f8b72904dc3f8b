"""``LipschitzExtractLoRA`` on a real server: the file it writes loads in stock
``LoraLoaderModelOnly``, every key applied, and samples like the trained MODEL (at full rank),
or within its stated error of it (at a low rank)."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors import safe_open

from graphs import install_subject, personalize_graph, sample
from test_server_nodes import _pixels, _run_ok

FULL_RANK = 4096  # above every SD1.5 weight's smaller dimension: the LoRA is the weights' delta
LOW_RANK = 16


@pytest.fixture(scope="module")
def server(comfy_server):
    install_subject(comfy_server.input_dir)
    return comfy_server


def _export(graph: dict, node: str, prefix: str, **inputs) -> None:
    graph[node] = {"class_type": "LipschitzExtractLoRA",
                   "inputs": {"delta": ["train", 1], "rank": FULL_RANK, "filename_prefix": prefix, **inputs}}


def test_full_rank_lora_through_stock_loader_samples_like_the_trained_model(server):
    client = server.client
    graph = personalize_graph("lora", steps=3, seed=21)
    sample(graph, ["train", 0], "lora_trained")
    sample(graph, ["ckpt", 0], "lora_base")
    _export(graph, "kept", "subject_kept", biases_and_norms="keep (ComfyUI only)")
    _export(graph, "dropped", "subject")
    _export(graph, "low", "subject_low", rank=LOW_RANK)
    trained = _run_ok(client, graph)
    names = {n: trained.outputs[n]["text"][0].split(":")[0].split("/")[-1] for n in ("kept", "dropped", "low")}
    assert "relative error" in trained.outputs["dropped"]["text"][0]
    with safe_open(str(server.base_dir / "models" / "loras" / names["dropped"]), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["rank"] == str(FULL_RANK) and meta["base_fingerprint"] and meta["source"].startswith("run ")
    assert keys and all(k.startswith("lora_unet_") and k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha"))
                        for k in keys)

    log_start = len(server.log_tail(10**7))
    apply = {"ckpt": graph["ckpt"]}
    for node, name in names.items():
        apply[f"load_{node}"] = {"class_type": "LoraLoaderModelOnly",
                                 "inputs": {"model": ["ckpt", 0], "lora_name": name, "strength_model": 1.0}}
        sample(apply, [f"load_{node}", 0], f"lora_{node}")
    applied = _run_ok(client, apply)
    assert "lora key not loaded" not in server.log_tail(10**7)[log_start:]

    pixels = lambda result, node: _pixels(server, result, node).astype(np.float64)  # noqa: E731
    tuned, base = pixels(trained, "lora_trained_save"), pixels(trained, "lora_base_save")
    kept, dropped, low = (pixels(applied, f"lora_{n}_save") for n in ("kept", "dropped", "low"))
    training_change = np.abs(tuned - base).mean()
    assert training_change > 1.0  # the run changed the sample: the comparison below means something
    # With biases and norms the full-rank LoRA is the delta up to fp16 rounding of the factors.
    assert np.abs(kept - tuned).max() <= 2
    # Without them (the default, which every loader reads) it keeps most of the change.
    assert np.abs(dropped - tuned).mean() < 0.25 * training_change
    # A low rank keeps what its measured error says: the sample moves from the trained one by
    # about that share of what training changed.
    with safe_open(str(server.base_dir / "models" / "loras" / names["low"]), framework="pt") as f:
        error = float(f.metadata()["rel_frobenius_error"])
    assert error > 0.1  # a truncation that drops something
    assert np.abs(low - tuned).mean() <= error * training_change  # measured: 0.29 of it at error 0.57
