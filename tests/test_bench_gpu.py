"""The prepared GPU check (``tools/bench_gpu.py --check``) runs end to end in its CPU form.

A GPU is lent to few sessions, so the code that one would run is exercised here: every memory
mode in strict fp32, TF32 and bf16 compute, its phases timed, one step profiled, the delta
compared with faithful's, and each run inside the TF32 flags its config states, restored after.
"""
from __future__ import annotations

import json
import sys

import torch

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))

import bench_gpu  # noqa: E402
from lipschitz_personalize.trainer.memory import ORDER  # noqa: E402
from lipschitz_personalize.trainer.precision import tf32_flags  # noqa: E402


def test_the_gpu_check_dry_run_measures_every_mode_and_compute(tmp_path):
    out = tmp_path / "check.jsonl"
    saved = tf32_flags()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, False  # a host's mix
    try:
        assert bench_gpu.main(["--dry-run", "--out", str(out)]) == 0
        assert tf32_flags() == (True, False)  # restored after every run
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    rows = {r["name"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {f"gpu_check_{m}_{c}" for m in ORDER for c in ("fp32", "tf32", "bf16")}
    for name, r in rows.items():
        assert r["status"] == "measured", (name, r["status"])
        assert r["step_s"]["min"] <= r["step_s"]["median"] <= r["step_s"]["max"]
        assert r["phase_s"]["forward"]["median"] > 0 and r["phase_s"]["backward"]["median"] > 0, name
        assert r["ops_per_step"] > 100, name
        assert r["tf32_flags"] == [r["compute"] == "tf32"] * 2, name
        assert 0.0 <= r["rel_diff_vs_faithful_fp32"] < 1.0, name
    assert rows["gpu_check_faithful_fp32"]["rel_diff_vs_faithful_fp32"] == 0.0
    # bf16 compute moves the delta off faithful's; the compact modes do too.
    assert rows["gpu_check_faithful_bf16"]["rel_diff_vs_faithful_fp32"] > 0
