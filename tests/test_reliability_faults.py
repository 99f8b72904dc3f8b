"""Faults through a real ComfyUI server: interrupts, NaN, exceptions, resume, back-to-back runs.

The module's own server has the test-only fault pack linked in (tests/fault_pack): a hook that
raises or returns NaN inside the training step, the base U-Net hash, and the process's
resident memory and live Python threads.  The pack trains in ComfyUI's worker thread and
starts no thread of its own; while it trains, that thread carries the OS name
``lipschitz-train`` (``trainer/job.py``), which it must give back however the run ends.
Nothing of the fault pack ships with the pack.
"""
from __future__ import annotations

import random
import shutil
import statistics
import time

import pytest
import torch

from fault_pack.harness import check_prompt, file_unet_hash, make_server, process_info
from tools.graphs import CKPT, DATA, RES, personalize_inputs
from lipschitz_personalize.trainer.persist import load_verified, read_metadata

RESUME_TOLERANCE = 0.05  # compact resume (fp16 delta, 8-bit moments): relative distance to the straight run


pytestmark = pytest.mark.server  # starts its own ComfyUI (skipped by -m "not server")


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_ckpt):
    base = tmp_path_factory.mktemp("rel_faults")
    server = make_server(base / "comfy", tiny_ckpt)
    (server.input_dir / "dog").mkdir()
    for f in sorted((DATA / "dog").glob("*.jpg"))[:2]:
        shutil.copy(f, server.input_dir / "dog" / f.name)
    server.expected_hash = file_unet_hash(tiny_ckpt)
    server.deltas = server.base_dir / "models" / "lipschitz_deltas"
    with server:
        # After one prompt has run: the threads a server has before any training.
        server.threads = sorted(t for t in check_prompt(server.client, CKPT)["threads"] if t != "tqdm_monitor")
        yield server


def _graph(seed: int, steps: int, fault: dict | None = None, **overrides) -> dict:
    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
             "refs": {"class_type": "LipschitzLoadReferenceImages", "inputs": {"folder": "dog", "resolution": RES, "crop": "center"}},
             "train": {"class_type": "LipschitzPersonalize",
                       "inputs": personalize_inputs(steps=steps, seed=seed, gradient_checkpointing=False, **overrides)},
             "sink": {"class_type": "LipschitzTestSink", "inputs": {"delta": ["train", 1]}}}
    if fault is not None:
        graph["fault"] = {"class_type": "LipschitzTestFaultHook", "inputs": {"model": ["ckpt", 0], "module": "out.2", **fault}}
        graph["train"]["inputs"]["model"] = ["fault", 0]
    return graph


def _files(server, prefix: str) -> set:
    return set(server.deltas.glob(f"{prefix}_*.safetensors"))


def _delta_tensors(path) -> dict[str, torch.Tensor]:
    tensors, _ = load_verified(path)
    return {k: v for k, v in tensors.items() if k.startswith("diffusion_model.")}


def _check_resume_state(path, steps_done: int) -> None:
    """The partial file holds the delta, Adam's moments for every tensor and the generator."""
    tensors, meta = load_verified(path)
    deltas = [k for k in tensors if k.startswith("diffusion_model.")]
    assert deltas and int(meta["steps_done"]) == steps_done
    for moment in ("exp_avg", "exp_avg_sq", "step"):
        stored = [k for k in tensors if k.startswith(f"adam.{moment}.") and not k.endswith(".scale")]
        assert len(stored) == len(deltas), moment
        if moment != "step":  # the default fp16 delta keeps its moments in 8 bits, block-scaled
            assert all(tensors[k].dtype == torch.float8_e4m3fn and k + ".scale" in tensors for k in stored)
    assert "generator" in tensors and int(meta["step"]) == steps_done
    assert all(torch.isfinite(tensors[k]).all() for k in deltas)


def _after_run(server, rss_before: int | None = None, label: str = "", tolerance: float = 0.10) -> dict:
    check = check_prompt(server.client, CKPT)  # also: the next prompt works
    assert check["hash"] == server.expected_hash, "the base U-Net changed"
    # tqdm's monitor thread starts with the first sampler progress bar and lives for the process.
    threads = sorted(t for t in check["threads"] if t != "tqdm_monitor")
    assert threads == server.threads, f"the run left Python threads behind: {check['threads']}"
    from fault_pack.harness import training_threads  # (kept off the import lines: another branch edits them)

    named = training_threads(server.proc.pid, settle_s=0)
    assert not named, f"the worker thread still carries the training name after the run: {named}"
    if rss_before is not None:
        assert check["rss"] <= rss_before * (1 + tolerance), (
            f"{label}: memory did not come back: {rss_before / 2**20:.0f} -> {check['rss'] / 2**20:.0f} MiB")
    return check


def _interrupted_run(server, graph: dict, at_step: int):
    seen: list[int] = []

    def on_message(msg):
        if msg.get("type") == "lipschitz.progress":
            seen.append(msg["data"]["step"])
            if msg["data"]["step"] == at_step:
                server.client.interrupt()

    result = server.client.run(graph, timeout=600, on_message=on_message)
    return result, seen


def test_interrupts_at_random_steps(srv):
    rng = random.Random(2025)
    warm = srv.client.run(_graph(seed=1, steps=1), timeout=600)  # first load, allocator warm-up
    assert warm.status == "success", warm.error
    baseline = _after_run(srv)["rss"]
    runs = []
    for i in range(10):
        k = rng.randint(1, 4)
        before_files = _files(srv, "partial")
        rss_before = runs[-1][3] if runs else baseline  # measured by the check after the previous run
        result, seen = _interrupted_run(srv, _graph(seed=100 + i, steps=500), k)
        assert result.status == "interrupted", (result.status, result.error)
        assert seen and max(seen) <= k + 2, f"run {i}: interrupt at {k}, trained to {max(seen)}"
        (partial,) = _files(srv, "partial") - before_files
        meta = read_metadata(partial)
        done = int(meta["steps_done"])
        assert meta["status"] == "interrupted" and k <= done <= k + 2, (k, meta["status"], done)
        _check_resume_state(partial, done)
        check = _after_run(srv, rss_before, f"interrupted run {i}", tolerance=0.20)
        runs.append((k, done, rss_before, check["rss"]))
        partial.unlink()
    print("\n[interrupts] (k, steps_done, rss_before_MiB, rss_after_MiB):",
          [(k, d, b >> 20, a >> 20) for k, d, b, a in runs])
    # A transient peak comes back at the next run; a leak (a stopped run's state kept) grows:
    after = [a for _, _, _, a in runs]
    assert sum(after[-3:]) / 3 <= sum(after[:3]) / 3 * 1.05, f"memory creeps up over the interrupts: {after}"


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_delta(srv):
    before = _files(srv, "partial")
    result = srv.client.run(_graph(seed=41, steps=50, fault={"mode": "nan", "at_call": 3}), timeout=600)
    assert result.status == "error"
    message = result.error["exception_message"]
    assert "diverged" in message and "step 3" in message and "lower the learning rate" in message, message
    assert [e["step"] for e in result.events("lipschitz.progress")] == [1, 2]
    (partial,) = _files(srv, "partial") - before
    assert partial.name in message
    meta = read_metadata(partial)
    assert meta["status"] == "diverged" and meta["steps_done"] == "2"
    _check_resume_state(partial, 2)
    _after_run(srv)
    # The kept delta is exactly the one two clean steps give.
    done_before = _files(srv, "auto")
    clean = srv.client.run(_graph(seed=41, steps=2), timeout=600)
    assert clean.status == "success", clean.error
    (auto,) = _files(srv, "auto") - done_before
    kept, reference = _delta_tensors(partial), _delta_tensors(auto)
    assert kept.keys() == reference.keys() and all(torch.equal(kept[k], reference[k]) for k in kept)
    partial.unlink()


def test_an_exception_during_training_reaches_the_ui_with_its_cause(srv):
    before = _files(srv, "partial")
    result = srv.client.run(_graph(seed=42, steps=50, fault={"mode": "raise", "at_call": 3}), timeout=600)
    assert result.status == "error"
    err = result.error
    assert err["exception_type"].endswith("RuntimeError"), err["exception_type"]
    assert "injected fault at training forward call 3" in err["exception_message"]
    assert any("fault_pack" in frame for frame in err["traceback"]), "the worker's traceback is lost"
    assert err["node_type"] == "LipschitzPersonalize"
    (partial,) = _files(srv, "partial") - before
    meta = read_metadata(partial)
    assert meta["status"] == "failed" and meta["steps_done"] == "2"
    _check_resume_state(partial, 2)
    _after_run(srv)
    partial.unlink()


@pytest.mark.parametrize("delta_dtype", ["fp32", "fp16"])
def test_resume_after_an_interrupt_continues_the_uninterrupted_run(srv, delta_dtype):
    """fp32: the stopped run keeps everything, and the resumed run is bitwise the straight one.
    fp16 (the default): the stopped run keeps the fp16 delta and 8-bit moments, and the
    resumed run ends close to the straight one (how close is printed and bounded)."""
    steps, seed = 6, 43
    graph = _graph(seed=seed, steps=steps, delta_dtype=delta_dtype)
    before = _files(srv, "auto")
    straight = srv.client.run(graph, timeout=600)
    assert straight.status == "success", straight.error
    (auto,) = _files(srv, "auto") - before
    reference = _delta_tensors(auto)
    auto.unlink()  # else the finished run would be loaded from disk instead of retrained
    check_prompt(srv.client, CKPT)  # and the in-memory cache forgets it

    partials = _files(srv, "partial")
    result, seen = _interrupted_run(srv, graph, at_step=2)
    assert result.status == "interrupted"
    (partial,) = _files(srv, "partial") - partials
    done = int(read_metadata(partial)["steps_done"])
    assert 2 <= done < steps

    resumed = srv.client.run(_graph(seed=seed, steps=steps, resume=True, delta_dtype=delta_dtype), timeout=600)
    assert resumed.status == "success", (resumed.error or {}).get("exception_message")
    assert [e["step"] for e in resumed.events("lipschitz.progress")] == list(range(done + 1, steps + 1))
    again = _delta_tensors(auto)
    assert again.keys() == reference.keys()
    if delta_dtype == "fp32":
        assert all(torch.equal(again[k], reference[k]) for k in reference), "resume is not bitwise the straight run"
    else:
        diff = torch.cat([(again[k].float() - reference[k].float()).flatten() for k in reference]).norm()
        size = torch.cat([reference[k].float().flatten() for k in reference]).norm()
        print(f"\n[resume {delta_dtype}] ||resumed - straight|| / ||straight|| = {diff / size:.2e} "
              f"(stopped at step {done} of {steps})")
        assert 0 < diff / size < RESUME_TOLERANCE
    assert not partial.exists(), "the partial file is removed once the run completes"
    assert read_metadata(auto)["steps_done"] == str(steps)
    _after_run(srv)


def test_twenty_personalizations_queued_back_to_back_with_sampling_between(srv):
    client = srv.client
    # A short sampling job of the base model (one text encode, one KSampler step), then the
    # server's resident memory.
    sampler = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
               "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a photo of a dog"}},
               "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": RES, "height": RES, "batch_size": 1}},
               "ks": {"class_type": "KSampler", "inputs": {
                   "model": ["ckpt", 0], "positive": ["text", 0], "negative": ["text", 0], "latent_image": ["lat", 0],
                   "seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
               "proc": {"class_type": "LipschitzTestProcess", "inputs": {"after": ["ks", 0]}}}
    before = _files(srv, "auto")
    start = time.monotonic()
    ids = []
    # The first two pairs warm up: the second run still takes a one-time ~6% step (seen here:
    # 1936 -> 2055 MiB, then flat within 5 MiB over 19 runs), so the baseline is after it.
    for i in range(21):
        ids.append(("train", client.queue(_graph(seed=300 + i, steps=2))))
        ids.append(("sample", client.queue(sampler)))
    histories = {}
    deadline = time.monotonic() + 900
    while len(histories) < len(ids):
        assert time.monotonic() < deadline, f"only {len(histories)}/{len(ids)} prompts finished"
        for _, pid in ids:
            if pid not in histories:
                h = client.history(pid)
                if h.get("status", {}).get("completed") is not None or h.get("status", {}).get("status_str"):
                    histories[pid] = h
        time.sleep(0.5)
    elapsed = time.monotonic() - start
    failed = [(kind, h["status"]) for kind, pid in ids if (h := histories[pid])["status"]["status_str"] != "success"]
    assert not failed, failed
    steps = [int(histories[pid]["outputs"]["sink"]["text"][0]) for kind, pid in ids if kind == "train"]
    assert steps == [2] * 21
    assert len(_files(srv, "auto") - before) == 21
    rss = [process_info(histories[pid]["outputs"]["proc"]["text"])["rss"] for kind, pid in ids if kind == "sample"]
    print(f"\n[back-to-back] {len(ids)} prompts in {elapsed:.0f}s; RSS MiB after each sampling job "
          f"(two warm-ups first): {[r >> 20 for r in rss]}")
    mib = [r >> 20 for r in rss]
    # A leak grows with every run; a transient peak (an allocator holding a freed buffer when the
    # sampling job reads RSS) comes back at the next run. Seen on a clean run: single peaks of
    # +10% over the warmed-up level between runs at +0%. One run's delta here is ~50 MB, so a
    # leaked delta per run would add ~1 GB over the 20 runs and fail all three checks.
    assert statistics.median(rss[2:]) <= rss[1] * 1.05, f"memory grew over the warmed-up level: {mib} MiB"
    assert max(rss[2:]) <= rss[1] * 1.25, f"a run kept >25% more memory than the warmed-up level: {mib} MiB"
    first, last = sum(rss[2:7]) / 5, sum(rss[-5:]) / 5
    assert last <= first * 1.05, f"memory creeps up over the 20 runs (a leak): {mib} MiB"
    for path in _files(srv, "auto") - before:
        _delta_tensors(path)
        path.unlink()
    _after_run(srv)
