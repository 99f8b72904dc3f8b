"""Export as LoRA (``trainer/lora.py``): the truncation maths, the keys both loaders read (on the
full-size SD1.5 layout, without its weights), and diffusers' ``load_lora_weights`` on the tiny
U-Net.  The stock ComfyUI loader on a real server: ``tests/test_lora_server.py``."""
from __future__ import annotations

import types

import pytest
import torch

import bench_models
from lipschitz_personalize.trainer.lora import UNetLayout, delta_from_file, extract_lora, factorize, lora_name, lora_nbytes

SHAPES = [(48, 24), (24, 48), (32, 16, 3, 3), (16, 32, 1, 1)]


@pytest.fixture(autouse=True)
def one_thread():
    """LAPACK's eigensolver with two OpenMP threads on a busy 2-core machine runs 10-20x slower
    than with one (spin-waits); these tests are small, one thread is enough."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ldm_shapes(tiny: bool) -> dict[str, torch.Size]:
    """ComfyUI's SD1.5 U-Net parameter names and shapes, built on the meta device (no weights)."""
    bench_models.comfy_ready(cpu=True)
    return {n: p.shape for n, p in bench_models.make_unet(tiny=tiny, device="meta", init=False).named_parameters()}


def _random_delta(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * 1e-3 for n, s in shapes.items()}


@pytest.mark.parametrize("shape", SHAPES)
def test_truncation_error_is_the_discarded_singular_values(shape):
    d = torch.randn(shape)
    matrix = d.reshape(shape[0], -1)
    s = torch.linalg.svdvals(matrix.double())
    for rank in (1, 3, len(s) // 2):
        up, down = factorize(d, rank)
        assert down.shape == (rank, *shape[1:]) and up.shape == (shape[0], rank, *[1] * (len(shape) - 2))
        err_sq = (matrix - up.flatten(1) @ down.flatten(1)).double().square().sum()
        torch.testing.assert_close(err_sq, s[rank:].square().sum(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_rank_at_or_above_the_smaller_dimension_is_the_delta_itself(shape):
    d = torch.randn(shape)
    full = min(shape[0], d[0].numel())
    for rank in (full, full + 7):
        up, down = factorize(d, rank)
        assert down.shape[0] == full
        torch.testing.assert_close(up.flatten(1) @ down.flatten(1), d.reshape(shape[0], -1), rtol=0, atol=1e-5)


def test_extract_reports_the_error_it_stores_and_drops_or_keeps_the_1d_tensors():
    # One attention block, the first conv and the time embedding: linear and 3x3 weights, biases, norms.
    shapes = {n: s for n, s in _ldm_shapes(tiny=True).items()
              if n.startswith(("input_blocks.0.", "input_blocks.1.1.", "time_embed."))}
    delta = _random_delta(shapes, seed=len(shapes))
    rank = 8
    lora, stats = extract_lora(delta, rank, torch.float32)
    weights = [n for n, s in shapes.items() if len(s) >= 2]
    ones = [n for n, s in shapes.items() if len(s) < 2]
    assert stats.factored == len(weights) and sorted(stats.dropped) == sorted(ones)
    assert len(lora) == 3 * len(weights) and all(k.startswith("lora_unet_") for k in lora)
    # The error is the discarded singular values plus the dropped tensors, against torch.linalg.
    discarded = sum(float(torch.linalg.svdvals(delta[n].reshape(shapes[n][0], -1).double())[rank:].square().sum())
                    for n in weights)
    dropped = sum(float(delta[n].double().square().sum()) for n in ones)
    total = sum(float(t.double().square().sum()) for t in delta.values())
    assert stats.rel_error == pytest.approx(((discarded + dropped) / total) ** 0.5, rel=1e-4)
    assert stats.dropped_fraction == pytest.approx((dropped / total) ** 0.5, rel=1e-4)
    assert stats.nbytes == lora_nbytes(shapes.values(), rank, torch.float32)

    kept, kept_stats = extract_lora(delta, 10_000, torch.float32, keep_1d=True)
    assert kept_stats.rel_error < 1e-5 and kept_stats.kept_1d == len(ones) and not kept_stats.dropped
    layout = UNetLayout.of(shapes)
    assert all(torch.equal(kept[f"{lora_name(n, layout)}.{'diff' if n.endswith('.weight') else 'diff_b'}"], delta[n])
               for n in ones)


def test_a_delta_file_reads_back_as_parameter_names():
    file_tensors = {"diffusion_model.out.2.diff": torch.ones(4, 320, 3, 3), "diffusion_model.out.2.diff_b": torch.ones(4),
                    "adam.exp_avg.out.2.weight": torch.ones(1), "generator": torch.ones(1)}
    assert sorted(delta_from_file(file_tensors)) == ["out.2.bias", "out.2.weight"]
    with pytest.raises(ValueError, match="not a delta file"):
        delta_from_file({"model.diffusion_model.out.2.weight": torch.ones(1)})


def _factored_zeros(shapes: dict) -> dict[str, torch.Tensor]:
    """Rank-1 factors in :func:`extract_lora`'s keys and shapes: small even at full size."""
    layout = UNetLayout.of(shapes)
    out = {}
    for n, s in shapes.items():
        if len(s) >= 2:
            key = lora_name(n, layout)
            out[f"{key}.lora_up.weight"] = torch.zeros(s[0], 1, *[1] * (len(s) - 2))
            out[f"{key}.lora_down.weight"] = torch.zeros(1, *s[1:])
            out[f"{key}.alpha"] = torch.tensor(1.0)
    return out


@pytest.fixture(scope="module")
def full_size_lora():
    shapes = _ldm_shapes(tiny=False)
    assert len(shapes) == 686
    return shapes, _factored_zeros(shapes)


def test_every_full_size_weight_is_a_key_comfyui_applies_to_that_weight(full_size_lora):
    import comfy.lora

    shapes, lora = full_size_lora
    state = {f"diffusion_model.{n}": torch.empty(s, device="meta") for n, s in shapes.items()}
    model = types.SimpleNamespace(state_dict=lambda: state,
                                  model_config=types.SimpleNamespace(unet_config=bench_models.SD15_FULL))
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    patches = comfy.lora.load_lora(dict(lora), key_map, log_missing=False)
    weights = {f"diffusion_model.{n}" for n, s in shapes.items() if len(s) >= 2}
    assert set(patches) == weights  # 282 weights, each patched, and nothing else
    for target, patch in patches.items():
        up, down = patch.weights[0], patch.weights[1]
        assert (up.shape[0], *down.shape[1:]) == tuple(shapes[target[len("diffusion_model."):]])


def test_every_full_size_weight_is_a_key_diffusers_maps_to_that_module(full_size_lora):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    shapes, lora = full_size_lora
    converted, alphas = StableDiffusionPipeline.lora_state_dict(dict(lora))  # raises on a key it cannot name
    peft_sd = convert_unet_state_dict_to_peft(converted)
    with torch.device("meta"):
        modules = dict(UNet2DConditionModel(cross_attention_dim=768).named_modules())
    targets = {k[len("unet."):-len(".lora_A.weight")] for k in peft_sd if k.endswith(".lora_A.weight")}
    assert len(targets) == len(alphas) == sum(len(s) >= 2 for s in shapes.values())
    for t in targets:
        down, up = peft_sd[f"unet.{t}.lora_A.weight"], peft_sd[f"unet.{t}.lora_B.weight"]
        assert tuple(modules[t].weight.shape) == (up.shape[0], *down.shape[1:]), t


@pytest.fixture(scope="module")
def tiny_diffusers(tiny_ckpt):
    """The tiny checkpoint's U-Net in diffusers' layout (ComfyUI's key map), and its LDM weights."""
    import comfy.sd
    import comfy.utils
    from tools.benchmark import make_tiny_diffusers

    model = comfy.sd.load_checkpoint_guess_config(str(tiny_ckpt), output_vae=False, output_clip=False)[0]
    ldm = {k: v.float() for k, v in model.model.diffusion_model.state_dict().items()}
    key_map = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return ldm, key_map, make_tiny_diffusers.unet


def test_diffusers_load_lora_weights_changes_the_output_as_the_delta_does(tiny_diffusers, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    ldm, key_map, make_unet = tiny_diffusers
    delta = {n: t * 0.05 for n, t in _random_delta({n: t.shape for n, t in ldm.items()}, seed=len(ldm)).items()}
    lora, stats = extract_lora(delta, 4096, torch.float32)
    save_file(lora, tmp_path / "subject.safetensors")

    def unet(with_delta: bool):
        net = make_unet()
        net.load_state_dict({k: ldm[key_map[k]] + (delta[key_map[k]] if with_delta and delta[key_map[k]].dim() >= 2 else 0)
                             for k in net.state_dict()})
        return net.eval()

    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet(False), scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(len(lora))
    x, t, context = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        base = pipe.unet(x, t, context).sample
        pipe.load_lora_weights(str(tmp_path / "subject.safetensors"))
        loaded = pipe.unet(x, t, context).sample
        reference = unet(True)(x, t, context).sample  # the delta's weights added by hand (biases/norms: dropped)
    change = (reference - base).abs().max()
    assert change > 1e-3
    assert (loaded - reference).abs().max() <= 1e-3 * change


def test_headless_command_writes_a_verified_kohya_file(tmp_path):
    from safetensors.torch import load_file

    from tools import extract_lora as command
    from lipschitz_personalize.trainer.persist import load_verified, save_verified

    shapes = {n: s for n, s in _ldm_shapes(tiny=True).items() if n.startswith(("input_blocks.0.", "input_blocks.1.1.proj"))}
    delta = _random_delta(shapes, seed=len(shapes))
    file_keys = {f"diffusion_model.{n.rsplit('.', 1)[0]}.{'diff' if n.endswith('.weight') else 'diff_b'}": t
                 for n, t in delta.items()}
    save_verified(tmp_path / "delta.safetensors", file_keys, {"base_fingerprint": "abc"})
    assert command.main([str(tmp_path / "delta.safetensors"), "--rank", "2", "--out", str(tmp_path / "lora.safetensors")]) == 0
    tensors, meta = load_verified(tmp_path / "lora.safetensors")
    assert meta["rank"] == "2" and meta["base_fingerprint"] == "abc" and meta["source"] == "delta.safetensors"
    assert float(meta["rel_frobenius_error"]) > 0
    assert load_file(tmp_path / "lora.safetensors")["lora_unet_conv_in.alpha"].item() == 2.0
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (2, 320, 1, 1)
