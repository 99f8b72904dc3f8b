"""Memory modes (trainer/memory.py) and the compact Adam they use (trainer/compact_adam.py)."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lipschitz_personalize.trainer.compact_adam import BLOCK, FP8, CompactAdam, stochastic_round
from lipschitz_personalize.trainer.config import ConfigError, TrainConfig
from lipschitz_personalize.trainer.delta import ParameterDelta, buckets
from lipschitz_personalize.trainer.loop import CachedExamples, RegularizedTrainer
from lipschitz_personalize.trainer.memory import CHOICES, GB, MODES, ORDER, choose, configure, estimate, preflight

ABAR = torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 16)).requires_grad_(False)


def _train(mode: str, steps: int = 30, seed: int = 0, **over) -> tuple[ParameterDelta, RegularizedTrainer]:
    model = _model(seed)
    config = configure(TrainConfig(steps=max(steps, 1), lr=1e-3, lam=50.0, seed=seed), mode)
    for k, v in over.items():
        setattr(config, k, v)
    delta = ParameterDelta(model, dtype=config.delta_torch_dtype)
    g = torch.Generator().manual_seed(seed + 1)
    data = CachedExamples(torch.randn(6, 16, generator=g), torch.zeros(1, 1))
    trainer = RegularizedTrainer(lambda x, t, c: model(x), delta, ABAR, data, config)
    for _ in range(steps):
        trainer.step()
    return delta, trainer


def _flat(delta: ParameterDelta) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1) for t in delta.tensors()])


def _flat_params(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``values`` as the views of one delta's flat buffer, as CompactAdam updates them."""
    tensors = ParameterDelta(nn.ParameterList([nn.Parameter(v) for v in values])).tensors()
    with torch.no_grad():
        for t, v in zip(tensors, values):
            t.copy_(v)
    return tensors


@pytest.fixture(params=["whole", "chunked"])
def chunking(request, monkeypatch):
    """The update in one slice per tensor, or in slices of 512 values (SD1.5's big tensors are
    chunked at 16M on a GPU, 1M on the CPU; here the test tensors are, with a last partial block)."""
    if request.param == "chunked":
        monkeypatch.setattr("lipschitz_personalize.trainer.compact_adam.CHUNK", 2 * BLOCK)
        monkeypatch.setattr("lipschitz_personalize.trainer.compact_adam.CPU_CHUNK", 2 * BLOCK)
    return request.param


def test_compact_adam_with_fp32_state_is_torch_adam_bitwise(chunking):
    torch.manual_seed(3)
    ps = [torch.randn(300, 7), torch.randn(11), torch.randn(5, 5)]
    qs = _flat_params(ps)
    ref = torch.optim.Adam([{"params": ps[:2], "weight_decay": 0.3}, {"params": ps[2:]}], lr=1e-3, foreach=False)
    ours = CompactAdam([{"params": qs[:2], "weight_decay": 0.3}, {"params": qs[2:]}], lr=1e-3, moments="fp32")
    for _ in range(25):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ref.step()
        ours.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8])
def test_stochastic_rounding_is_unbiased_where_nearest_rounding_is_not(dtype):
    g = torch.Generator().manual_seed(0)
    # A value a quarter of the way between two neighbours: nearest rounding always goes down.
    lo, hi = (1.0, 1.0 + 2**-7) if dtype == torch.bfloat16 else (1.0, 1.125)
    x = torch.full((200_000,), lo + (hi - lo) / 4)
    rounded = stochastic_round(x, dtype, g).float()
    assert set(rounded.unique().tolist()) == {lo, hi}
    assert rounded.mean().item() == pytest.approx(x[0].item(), abs=(hi - lo) * 0.01)
    assert x.to(dtype).float()[0].item() == lo  # what round-to-nearest gives, every time


def test_fp8_rounding_never_overflows_to_nan():
    g = torch.Generator().manual_seed(0)
    x = torch.full((10_000,), 447.9)
    assert torch.isfinite(stochastic_round(x, FP8, g).float()).all()


def test_lean_is_bitwise_the_faithful_run_on_cpu():
    a, _ = _train("faithful")
    b, _ = _train("lean")
    assert torch.equal(_flat(a), _flat(b))


def test_faithful_fused_adam_equals_torch_default_adam():
    a, _ = _train("faithful")
    b, _ = _train("faithful", adam="default")
    assert (_flat(a) - _flat(b)).norm() / _flat(b).norm() < 1e-6


@pytest.mark.parametrize("mode, min_cosine", [("12gb", 0.999), ("8gb", 0.99)])
def test_compact_modes_train_nearly_the_faithful_delta(mode, min_cosine, chunking):
    ref, _ = _train("faithful", steps=60)
    got, _ = _train(mode, steps=60)
    a, b = _flat(ref), _flat(got)
    cosine = float(a @ b / (a.norm() * b.norm()))
    assert cosine > min_cosine, cosine
    assert float((a - b).norm() / a.norm()) < 0.2


def test_round_to_nearest_would_lose_the_bf16_delta_updates():
    """Why the 8gb mode needs stochastic rounding: tiny steps on a bf16 delta that is not
    small vanish with nearest rounding, and survive on average with stochastic rounding."""
    big = torch.full((50_000,), 1e-2, dtype=torch.bfloat16)
    step = torch.full_like(big, 1e-6, dtype=torch.float32)
    nearest = big.float()
    g = torch.Generator().manual_seed(0)
    sr = big.clone()
    for _ in range(100):
        nearest = (nearest + step).to(torch.bfloat16).float()
        sr = stochastic_round(sr.float() + step, torch.bfloat16, g)
    assert torch.equal(nearest, big.float())
    assert sr.float().mean().item() == pytest.approx(1e-2 + 1e-4, rel=2e-3)


@pytest.mark.parametrize("mode", ["12gb", "8gb"])
def test_compact_state_resumes_from_adams_layout(mode):
    """A stopped compact run saves its moments in torch Adam's layout and resumes from them."""
    straight, _ = _train(mode, steps=20)
    first, trainer = _train(mode, steps=10)
    state = trainer.state_dict()
    assert set(state["optimizer"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["optimizer"]["state"][0]["exp_avg"].dtype == torch.float32
    resumed, trainer2 = _train(mode, steps=0)
    trainer2.load_state_dict(state)
    for _ in range(10):
        trainer2.step()
    a, b = _flat(straight), _flat(resumed)
    assert float((a - b).norm() / a.norm()) < 0.02


@pytest.mark.parametrize("mode", ORDER)
def test_a_finished_trainer_frees_its_delta_and_adam_state(mode):
    """The step-in-backward hooks once held the update alive (a tensor's hooks are invisible
    to Python's cycle collector): every full-size run leaked ~14 GB of GPU memory."""
    delta, trainer = _train(mode, steps=2)
    ref = weakref.ref(delta.tensors()[0])
    del delta, trainer
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("mode", ORDER)
def test_estimate_counts_the_resident_state_exactly(mode):
    delta, trainer = _train(mode, steps=2)
    params = delta.numel()
    largest = max(t.numel() for t in delta.tensors())
    est = estimate(mode, params, largest, anchor_bytes=4, resolution=64)
    resident_delta = sum(t.numel() * t.element_size() for t in delta.tensors())
    moments = 0
    for s in trainer.update.optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            parts = s[key].values() if isinstance(s[key], dict) else [s[key]]
            moments += sum(t.numel() * t.element_size() for t in parts)
    assert est.parts["delta"] == resident_delta
    assert est.parts["anchor"] == params * 4
    per_value = {"fp32": 8, "bf16": 4, "fp8": 2}[MODES[mode].options["moments"]]
    # What the estimate adds to the moments (fp8 block scales and padding, Adam's temporaries)
    # covers what the optimizer holds beyond 2 values per parameter.
    assert params * per_value <= moments <= est.parts["adam"]


# A child process trains an MLP of 8 x 2048^2 weights (33.6M values: one 134 MB fp32 buffer) in
# each mode in turn, each layer checkpointed as the U-Net's blocks are, and reports the peak RSS
# two steps add over the state between steps.  glibc's mmap threshold is fixed so that a freed tensor leaves RSS.
# The trainer's classes come from the modules this file imports them from.
_PEAK_CHILD = """
import json, sys, torch
from torch import nn
from {config} import TrainConfig
from {delta} import ParameterDelta
from {loop} import CachedExamples, RegularizedTrainer
from {memory} import configure

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

def measure(mode):
    config = configure(TrainConfig(steps=3, lr=1e-3, lam=50.0, seed=0), mode)
    delta = ParameterDelta(model, dtype=config.delta_torch_dtype)
    trainer = RegularizedTrainer(lambda x, t, c: model(x), delta, abar, data, config, checkpoint=list(model))
    trainer.step()  # the first step allocates Adam's state and touches the kernels' code
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    between = status("VmRSS")
    for _ in range(2):
        trainer.step()
    update = trainer.update
    moments = sum(t.numel() * t.element_size() for opt in getattr(update, "optimizers", None) or [update.optimizer]
                  for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")
                  for t in (s[k].values() if isinstance(s[k], dict) else [s[k]]))
    return {{"transient": status("VmHWM") - between, "moments": moments, "params": delta.numel(),
            "delta": sum(t.numel() * t.element_size() for t in delta.tensors()),
            "largest": max(t.numel() for t in delta.tensors())}}

torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(*[nn.Sequential(nn.Linear(2048, 2048)) for _ in range(8)]).requires_grad_(False)
abar = torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64)
data = CachedExamples(torch.randn(2, 2048), torch.zeros(1, 1))
print(json.dumps({{mode: measure(mode) for mode in sys.argv[1:]}}))
"""


@pytest.fixture(scope="module")
def measured_peaks() -> dict[str, dict]:
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tools.pack_import import subprocess_env

    code = _PEAK_CHILD.format(config=TrainConfig.__module__, delta=ParameterDelta.__module__,
                              loop=RegularizedTrainer.__module__, memory=configure.__module__)
    root = Path(__file__).resolve().parent.parent
    env = {**subprocess_env(), "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code, *ORDER], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ORDER)
def test_the_estimate_is_at_least_the_peak_a_real_run_reaches(mode, measured_peaks):
    """The pre-flight check lets a run start only when its estimate fits, so the estimate must
    not be below what training really holds at its peak: the state (delta and Adam's moments,
    counted from the tensors) plus the transient of a step (gradients, Adam's temporaries, the
    per-layer sums, activations), measured as the RSS a step adds on this CPU."""
    got = measured_peaks[mode]
    est = estimate(mode, got["params"], got["largest"], anchor_bytes=0, resolution=0)  # the model is in RAM
    peak = got["delta"] + got["moments"] + got["transient"]
    print(f"\n[{mode}] measured peak {peak / 1e6:.0f} MB (transient {got['transient'] / 1e6:.0f}), "
          f"estimate {est.total / 1e6:.0f} MB ({est.describe()})")
    assert peak <= est.total, (f"{mode}: a real step peaks at {peak / 1e6:.0f} MB, "
                               f"the estimate says {est.total / 1e6:.0f}")


def test_auto_takes_the_most_faithful_mode_that_fits():
    ests = {m: estimate(m, 1_000_000_000, 10_000_000, 4 if MODES[m].anchor == "checkpoint" else 2, 512) for m in ORDER}
    assert choose(1e12, ests)[0] == "faithful"
    just_lean = ests["lean"].total + 1
    assert choose(just_lean, ests)[0] == "lean"
    mode, why = choose(ests["8gb"].total + 1, ests)
    assert mode == "8gb" and "faithful needs" in why
    assert choose(ests["8gb"].total - 1, ests)[0] is None


def test_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(ConfigError) as err:
        configure(TrainConfig(), "4gb")
    assert err.value.field == "memory" and all(c in str(err.value) for c in CHOICES)


def test_compact_state_needs_the_default_adam():
    with pytest.raises(ConfigError) as err:
        TrainConfig(moments="bf16", adam="fused").validate()
    assert err.value.field == "adam"


SD15 = dict(params=859_520_964, largest=1280 * 1280 * 9)


def _sd15_needs(anchor_bytes: int = 2, resolution: int = 512, batch: int = 1) -> dict:
    return {m: estimate(m, SD15["params"], SD15["largest"], anchor_bytes, resolution, batch) for m in ORDER}


@pytest.mark.parametrize("mode", ORDER)
def test_preflight_auto_picks_the_most_faithful_mode_the_free_memory_holds_and_says_why(mode):
    """Free memory just above a mode's estimate: auto takes that mode and names what the more
    faithful ones would need."""
    needs = _sd15_needs()
    free = needs[mode].total + 1
    picked, why = preflight("auto", free, needs)
    assert picked == mode
    assert why.startswith("auto: ") and f"{free / GB:.1f} GB are free" in why
    assert all(f"{m} needs {needs[m].total / GB:.1f} GB" in why for m in ORDER[:ORDER.index(mode)])


def test_preflight_refuses_a_mode_that_does_not_fit_and_names_one_that_does():
    needs = _sd15_needs()
    free = needs["12gb"].total + 1  # below lean's and faithful's estimates
    with pytest.raises(ConfigError) as err:
        preflight("faithful", free, needs, "cuda:0")
    e = err.value
    assert e.field == "memory" and "faithful needs about" in e.problem and f"{free / GB:.1f} GB are free" in e.problem
    assert e.fix == "Choose memory=12gb, a lower resolution or batch 1"


def test_preflight_on_the_cpu_refuses_what_no_mode_fits():
    """The same check guards RAM: the anchor already in RAM is not counted again (anchor 0)."""
    needs = _sd15_needs(anchor_bytes=0, resolution=2048, batch=16)
    with pytest.raises(ConfigError) as err:
        preflight("auto", 16 * GB, needs, "cpu")
    assert "8gb needs about" in err.value.problem and "on cpu" in err.value.problem
    assert err.value.fix.startswith("Choose a lower resolution or batch 1")
    assert preflight("auto", 32 * GB, _sd15_needs(anchor_bytes=0))[0] == "faithful"


def test_the_base_fingerprint_is_the_same_for_an_fp32_and_an_fp16_load(tiny_ckpt, tmp_path, comfy_in_process):
    """A delta trained where ComfyUI loads SD1.5 in fp32 (CPU) keys and applies the same where
    it loads it in fp16 (GPU): the fingerprint identifies the checkpoint, not the load dtype."""
    import comfy.sd
    from safetensors.torch import load_file, save_file

    from lipschitz_personalize.nodes.host import model as host_model
    # An fp32 file whose values fp16 cannot hold exactly, as v1-5-pruned-emaonly's.
    g = torch.Generator().manual_seed(0)
    fp32 = {k: (v.float() * (1 + 1e-4 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v)
            for k, v in load_file(str(tiny_ckpt)).items()}
    save_file(fp32, str(tmp_path / "fp32.safetensors"))
    unets = {}
    for dtype in (torch.float32, torch.float16):
        model = comfy.sd.load_checkpoint_guess_config(str(tmp_path / "fp32.safetensors"), output_vae=False,
                                                      output_clip=False, model_options={"dtype": dtype})[0]
        unets[dtype] = model.model.diffusion_model
    assert next(unets[torch.float16].parameters()).dtype == torch.float16
    assert next(unets[torch.float32].parameters()).dtype == torch.float32
    assert host_model.fingerprint(unets[torch.float32]) == host_model.fingerprint(unets[torch.float16])
    with torch.no_grad():  # and a changed weight changes it
        next(unets[torch.float16].parameters()).view(-1)[0] += 1.0
    assert host_model.fingerprint(unets[torch.float32]) != host_model.fingerprint(unets[torch.float16])


class _DeviceBytes(TorchDispatchMode):
    """The peak bytes of tensors the code under it creates and keeps, except its copies to the
    CPU: on a GPU, the device memory it needs beyond the state it started from."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: list[tuple[weakref.ref, int]] = []
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        to_cpu = func is torch.ops.aten._to_copy.default and torch.device(kwargs.get("device", "meta")).type == "cpu"
        aliases = any(r.alias_info is not None for r in func._schema.returns)  # a view or in place: no new memory
        if not to_cpu and not aliases:
            for t in (out if isinstance(out, (list, tuple)) else [out]):
                if isinstance(t, torch.Tensor):
                    self.alive.append((weakref.ref(t), t.untyped_storage().nbytes()))
        self.alive = [(r, n) for r, n in self.alive if r() is not None]
        self.peak = max(self.peak, sum(n for _, n in self.alive))
        return out


@pytest.mark.parametrize("mode", ["12gb", "8gb"])
def test_saving_a_compact_run_decodes_one_tensor_at_a_time(mode):
    """A stopped run's moments are decoded to fp32 for the file: all at once they were 6.9 GB
    on the device for SD1.5, enough to run an 8-12 GB card out of memory while saving."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(8)]).requires_grad_(False)
    config = configure(TrainConfig(steps=2, lr=1e-3, lam=50.0), mode)
    delta = ParameterDelta(model, dtype=config.delta_torch_dtype)
    data = CachedExamples(torch.randn(6, 32), torch.zeros(1, 1))
    trainer = RegularizedTrainer(lambda x, t, c: model(x), delta, ABAR, data, config)
    trainer.step()
    with _DeviceBytes() as device:
        state = trainer.update.state_dict()
    decoded = 32 * 32 * 4  # the largest tensor's moment in fp32
    total = sum(v.nbytes for s in state["state"].values() for k, v in s.items() if k != "step")
    assert total > 10 * decoded
    assert all(v.device.type == "cpu" for s in state["state"].values() for v in s.values())
    assert device.peak <= 3 * decoded, (device.peak, total)


def test_a_step_in_backward_run_holds_no_more_gradient_than_the_estimate_on_sd15(comfy_in_process):
    """On SD1.5's full U-Net (on the meta device: shapes only), the gradients waiting for their
    bucket to complete never exceed the estimate's gradient term: the delta is laid out in the
    order backward completes it, so a bucket steps soon after its first gradient arrives."""
    import bench_models

    from lipschitz_personalize.trainer.optim import BUCKET

    unet = bench_models.make_unet(tiny=False, device="meta", init=False)
    delta = ParameterDelta(unet)
    runs = buckets(delta.tensors(), BUCKET)
    bucket_of = {id(p): i for i, run in enumerate(runs) for p in run}
    waiting, held = [len(run) for run in runs], [0] * len(runs)
    peak = 0

    def arrived(t: torch.Tensor) -> None:
        nonlocal peak
        i = bucket_of[id(t)]
        waiting[i] -= 1
        held[i] += t.numel()
        peak = max(peak, sum(held))
        if waiting[i] == 0:  # the bucket steps and its gradients are freed
            held[i] = 0

    for t in delta.tensors():
        t.register_post_accumulate_grad_hook(arrived)
    x, c = torch.zeros(1, 4, 8, 8, device="meta"), torch.zeros(1, 77, 768, device="meta")
    with delta.applied(bench_models.checkpoint_units(unet)):
        bench_models.eps_fn(unet)(x, torch.tensor([500], device="meta"), c).float().square().mean().backward()
    assert all(w == 0 for w in waiting)
    largest = max(t.numel() for t in delta.tensors())
    held_bytes = peak * 4
    assert held_bytes <= estimate("lean", delta.numel(), largest, 4, 512).parts["gradients"], (peak, BUCKET, largest)


def test_the_op_count_arithmetic_in_the_performance_doc_is_sd15s_structure(comfy_in_process):
    """docs/performance.md explains the missed op-count targets with counts of SD1.5's update
    (weight-decay groups, buckets, group-bucket pairs, chunks, tensors); they follow from the
    code's constants and the U-Net's shapes, so a change to either must change the text."""
    import math
    from pathlib import Path

    import bench_models

    from lipschitz_personalize.trainer import compact_adam
    from lipschitz_personalize.trainer.delta import span
    from lipschitz_personalize.trainer.objective import Regularizer
    from lipschitz_personalize.trainer.optim import BUCKET

    delta = ParameterDelta(bench_models.make_unet(tiny=False, device="meta", init=False))
    decay = dict(zip(map(id, delta.tensors()), Regularizer().weight_decay(delta, 500.0)))
    runs = buckets(delta.tensors(), BUCKET)
    pairs = sum(len({decay[id(t)] for t in run}) for run in runs)
    chunks = sum(math.ceil((span(run[-1])[1] - span(run[0])[0]) / compact_adam.CHUNK) for run in runs)
    text = " ".join((Path(__file__).parent.parent / "docs" / "performance.md").read_text().split())
    for claim in (f"({len(set(decay.values()))} distinct tensor sizes)", f"{pairs} group-bucket pairs over its {len(runs)} buckets",
                  f"{chunks} chunks per step in {len(runs)} buckets", f"each of the {len(decay)} gradients"):
        assert claim in text, claim
