"""Files we write: atomic, checksummed, refused when damaged; no pickle; safe names and folders.

Unit tests of :mod:`trainer.persist` and of the file checks in ``trainer/files/delta_file.py``,
``trainer/render/images.py`` and ``nodes/host/folders.py`` (the last with ComfyUI in-process, no server).
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lipschitz_personalize.trainer import persist
from lipschitz_personalize.trainer.errors import NodeInputError
from lipschitz_personalize.trainer.files import delta_file
from lipschitz_personalize.trainer.render import images
from tools.pack_import import subprocess_env

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path, monkeypatch, comfy_in_process):
    """``nodes.host.folders`` with ``models/lipschitz_deltas`` under ``tmp_path``."""
    import folder_paths

    from lipschitz_personalize.nodes.host import folders as mod
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, mod.FOLDER,
                        ([str(tmp_path / "models" / mod.FOLDER)], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return mod


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(16, 8, generator=g), "a.bias": torch.randn(16, generator=g),
            "b": torch.arange(10, dtype=torch.int64), "empty": torch.zeros(0)}


# -- round trip and checksum ----------------------------------------------------------------
def test_round_trip_is_exact_and_carries_a_checksum(tmp_path):
    t = _tensors()
    path = persist.save_verified(tmp_path / "x.safetensors", t, {"k": "v"})
    loaded, meta = persist.load_verified(path)
    assert loaded.keys() == t.keys() and all(torch.equal(loaded[k], t[k]) for k in t)
    assert meta["k"] == "v" and re.fullmatch(r"[0-9a-f]{64}", meta[persist.CHECKSUM_KEY])
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"], "no temporary file may remain"


def test_trainer_state_survives_flatten_save_load_unflatten(tmp_path):
    model = torch.nn.Linear(4, 3)
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    torch.randn(3, generator=gen)
    state = {"delta": {n: p.detach().clone() for n, p in model.named_parameters()},
             "optimizer": opt.state_dict(), "generator": gen.get_state(), "step": 1}
    tensors, meta = persist.flatten_trainer_state(state, names)
    back = persist.unflatten_trainer_state(*persist.load_verified(
        persist.save_verified(tmp_path / "s.safetensors", tensors, meta)), names)
    assert back["step"] == 1 and torch.equal(back["generator"], state["generator"])
    for i, n in enumerate(names):
        assert torch.equal(back["delta"][n], state["delta"][n])
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(back["optimizer"]["state"][i][k], state["optimizer"]["state"][i][k])
    assert back["optimizer"]["param_groups"] == json.loads(json.dumps(state["optimizer"]["param_groups"]))


# -- damaged files are refused -----------------------------------------------------------------
def _damaged_variants(good: bytes) -> dict[str, bytes]:
    header_len = struct.unpack("<Q", good[:8])[0]
    data_start = 8 + header_len
    flipped = bytearray(good)
    flipped[data_start + 5] ^= 0x01  # one bit in the first tensor's bytes
    flipped_last = bytearray(good)
    flipped_last[-1] ^= 0x80
    variants = {
        "empty": b"",
        "7 bytes": good[:7],
        "header cut": good[: 8 + header_len // 2],
        "data cut in half": good[: data_start + (len(good) - data_start) // 2],
        "last byte missing": good[:-1],
        "one bit flipped": bytes(flipped),
        "last bit flipped": bytes(flipped_last),
        "huge header length": struct.pack("<Q", 2**62) + good[8:],
        "random bytes": random.Random(0).randbytes(4096),
        "json": b'{"a": 1}',
        "pickle": b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s.",
        "zip (torch.save)": b"PK\x03\x04" + bytes(200),
    }
    return variants


def test_every_damaged_variant_is_detected(tmp_path):
    good = persist.save_verified(tmp_path / "good.safetensors", _tensors(), {"k": "v"}).read_bytes()
    variants = _damaged_variants(good)
    for label, data in variants.items():
        path = tmp_path / f"bad_{label.replace(' ', '_')}.safetensors"
        path.write_bytes(data)
        with pytest.raises(persist.CorruptFileError):
            persist.load_verified(path)


def test_a_file_without_our_checksum_is_refused(tmp_path):
    save_file(_tensors(), str(tmp_path / "foreign.safetensors"), metadata={"k": "v"})
    with pytest.raises(persist.CorruptFileError, match="checksum"):
        persist.load_verified(tmp_path / "foreign.safetensors")


def test_a_changed_tensor_with_the_old_checksum_is_refused(tmp_path):
    path = persist.save_verified(tmp_path / "x.safetensors", _tensors(), {})
    meta = persist.read_metadata(path)
    changed = _tensors()
    changed["a.bias"][3] += 1e-6
    save_file(changed, str(path), metadata=meta)
    with pytest.raises(persist.CorruptFileError, match="corrupted"):
        persist.load_verified(path)


def test_edited_metadata_is_refused(tmp_path):
    path = persist.save_verified(tmp_path / "x.safetensors", _tensors(), {"steps_done": "3"})
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"steps_done":"3"', b'"steps_done":"7"', 1))
    with pytest.raises(persist.CorruptFileError):
        persist.load_verified(path)


# -- a crash while writing never leaves a file that loads ---------------------------------------
def test_a_failing_write_keeps_the_previous_file_and_leaves_nothing_behind(tmp_path, monkeypatch):
    path = persist.save_verified(tmp_path / "x.safetensors", _tensors(1), {"v": "1"})

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # some bytes reached the disk, then the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persist, "save_file", broken)
    with pytest.raises(OSError):
        persist.save_verified(path, _tensors(2), {"v": "2"})
    monkeypatch.undo()
    tensors, meta = persist.load_verified(path)
    assert meta["v"] == "1" and torch.equal(tensors["a.weight"], _tensors(1)["a.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]

    def failing_rename(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(persist.os, "replace", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        persist.save_verified(path, _tensors(3), {"v": "3"})
    monkeypatch.undo()
    assert persist.load_verified(path)[1]["v"] == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


WRITER = textwrap.dedent(r"""
    import os, signal, sys
    import torch
    from lipschitz_personalize.trainer import persist
    path, mode = sys.argv[1], sys.argv[2]
    real = persist.save_file
    if mode == "die-mid-write":
        def save_file(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            size = os.path.getsize(filename)
            with open(filename, "r+b") as f:   # the disk holds only part of the file ...
                f.truncate(size // 2)
            os.kill(os.getpid(), signal.SIGKILL)   # ... when the process dies
        persist.save_file = save_file
        persist.save_verified(path, {"x": torch.full((1 << 20,), 7.0)}, {"i": "7"})
    else:  # write forever, a new version each time, until killed
        i = 0
        while True:
            i += 1
            persist.save_verified(path, {"x": torch.full((1 << 20,), float(i))}, {"i": str(i)})
            print(i, flush=True)
""")


def _writer(tmp_path: Path, target: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(target), mode], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_process_killed_mid_write_leaves_the_old_file_and_only_an_unloadable_temp(tmp_path, store):
    folder = store.delta_dir()
    target = folder / "auto_0123456789abcdef01234567.safetensors"
    persist.save_verified(target, {"x": torch.full((1 << 20,), 1.0)}, {"i": "1"})
    proc = _writer(tmp_path, target, "die-mid-write")
    proc.wait(120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    tensors, meta = persist.load_verified(target)  # the previous version, intact
    assert meta["i"] == "1" and torch.equal(tensors["x"], torch.full((1 << 20,), 1.0))
    leftovers = [p for p in folder.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".") and leftovers[0].suffix == ".tmp"
    with pytest.raises(persist.CorruptFileError):
        persist.load_verified(leftovers[0])
    assert store.delta_files() == [target.name], "a temporary file must never be offered as a delta"


def test_kills_at_random_moments_always_leave_a_complete_verified_file(tmp_path):
    target = tmp_path / "x.safetensors"
    rng = random.Random(1234)
    for _ in range(6):
        proc = _writer(tmp_path, target, "loop")
        try:
            assert proc.stdout.readline().strip(), proc.stderr.read()[-2000:]  # one full version exists
            time.sleep(rng.uniform(0.0, 0.25))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(60)
        tensors, meta = persist.load_verified(target)
        assert torch.equal(tensors["x"], torch.full((1 << 20,), float(meta["i"]))), "mixed versions"
        for tmp in tmp_path.glob(".x.safetensors.*.tmp"):
            assert not tmp.name.endswith(".safetensors")
            tmp.unlink()


# -- delta files: wrong keys or shapes, damaged files -------------------------------------------
def _names_shapes() -> dict[str, tuple[int, ...]]:
    return {"input_blocks.0.0.weight": (4, 4, 3, 3), "input_blocks.0.0.bias": (4,), "out.2.weight": (4, 4, 3, 3)}


def _good_delta(delta_file, value: float = 0.5):
    return delta_file.TrainedDelta({n: torch.full(s, value) for n, s in _names_shapes().items()}, {"steps_done": "3"})


def test_delta_file_round_trip_and_refusals(tmp_path, store):
    from safetensors.torch import save_file as raw_save

    shapes = _names_shapes()
    written = _good_delta(delta_file)
    good = delta_file.save_delta_file(store.delta_dir() / "good.safetensors", written)
    delta, _, extra = delta_file.load_delta_file(good, shapes)
    assert delta.tensors.keys() == shapes.keys() and not extra and delta.steps_done == 3
    assert all(torch.equal(delta.tensors[n], written.tensors[n]) for n in shapes)

    cases = {}
    wrong_keys = {"diffusion_model.nonexistent.diff": torch.zeros(3)}
    cases["wrong keys"] = persist.save_verified(store.delta_dir() / "wrong_keys.safetensors", wrong_keys, {})
    no_delta = {"lora_unet_down.weight": torch.zeros(3)}
    cases["no U-Net key"] = persist.save_verified(store.delta_dir() / "no_delta.safetensors", no_delta, {})
    bad_shape = _good_delta(delta_file)
    bad_shape.tensors["input_blocks.0.0.bias"] = torch.zeros(5)
    cases["wrong shape"] = delta_file.save_delta_file(store.delta_dir() / "wrong_shape.safetensors", bad_shape)
    data = good.read_bytes()
    cases["truncated"] = store.delta_dir() / "truncated.safetensors"
    cases["truncated"].write_bytes(data[: len(data) - 10])
    cases["not safetensors"] = store.delta_dir() / "not_safetensors.safetensors"
    cases["not safetensors"].write_bytes(b"\x80\x04K\x01.")
    cases["no checksum"] = store.delta_dir() / "foreign.safetensors"
    raw_save({delta_file.file_key(n): t for n, t in _good_delta(delta_file).tensors.items()},
             str(cases["no checksum"]))
    for label, path in cases.items():
        with pytest.raises(NodeInputError) as info:
            delta_file.load_delta_file(path, shapes)
        assert info.value.input_name == "delta_file", label
        assert path.name in str(info.value) or "checksum" in str(info.value), label


def test_user_file_names_are_reduced_to_one_safe_component(store):
    folder = store.delta_dir()
    hostile = ["../../../etc/passwd", "/etc/cron.d/x", "a/../../b", "..", ".", "", "   ", "~root",
               "x\x00y", "evil\\..\\..\\win", "name with spaces;rm -rf", "ünï/çødé", "a" * 500, ".hidden",
               "con", "-rf", "$(reboot)", "%2e%2e%2fup"]
    for prefix in hostile:
        name = store.safe_filename(prefix)
        assert name and "/" not in name and "\\" not in name and "\x00" not in name, prefix
        assert not name.startswith(".") and name not in (".", "..") and len(name) <= 80, prefix
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name), prefix
        path = store.next_free(prefix)
        assert path.parent == folder and path.suffix == ".safetensors", prefix


def test_reference_folders_outside_the_input_directory_are_refused(tmp_path):
    root = tmp_path / "input"
    (root / "ok" / "nested").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "escape").symlink_to(tmp_path / "secret", target_is_directory=True)
    (root / "inside").symlink_to(root / "ok", target_is_directory=True)
    (root / "ok" / "up").symlink_to(tmp_path, target_is_directory=True)
    assert images.resolve_folder(str(root), "ok") == (root / "ok").resolve()
    assert images.resolve_folder(str(root), "ok/nested/..") == (root / "ok").resolve()
    assert images.resolve_folder(str(root), "inside") == (root / "ok").resolve()
    refused = ["..", "../secret", "ok/../../secret", str(tmp_path / "secret"), "/etc", "escape",
               "ok/up", "ok/up/secret", "", "  ", "missing"]
    for folder in refused:
        with pytest.raises(NodeInputError) as info:
            images.resolve_folder(str(root), folder)
        assert info.value.input_name == "folder", folder


# -- no pickle, no open routes, one writer ------------------------------------------------------
def _product_python_files() -> list[Path]:
    skip = {".venv", ".comfyui", "tests", ".git", "build", "__pycache__", ".pytest_cache"}
    return [p for p in REPO_ROOT.rglob("*.py") if not skip & set(p.relative_to(REPO_ROOT).parts)]


def _code(path: Path) -> list[tuple[int, str]]:
    """``(line number, code)`` with comments and string literals (docstrings) left out."""
    import io
    import tokenize

    skip = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)}
    lines: dict[int, list[str]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in skip or not tok.string.strip():
            continue
        lines.setdefault(tok.start[0], []).append(tok.string)
    return sorted((n, " ".join(parts)) for n, parts in lines.items())


UNSAFE = re.compile(r"\btorch \. (load|save)\b|\b(c?pickle|cloudpickle|dill|joblib|marshal|shelve)\b|"
                    r"allow_pickle = True|weights_only = False|(?<!\. )\b(eval|exec) \(")
# (the lookbehind: ``module.eval()`` switches a torch module to inference behaviour; only the
# builtins evaluate code)


def test_no_pickle_or_eval_in_the_product():
    files = _product_python_files()
    assert len(files) >= 15
    hits = [f"{p.relative_to(REPO_ROOT)}:{n}: {code}" for p in files for n, code in _code(p) if UNSAFE.search(code)]
    assert not hits, "pickle-capable loading/saving or eval in shipped code:\n" + "\n".join(hits)


def test_the_unsafe_pattern_catches_what_it_should(tmp_path):
    sample = tmp_path / "s.py"
    sample.write_text('import pickle\nx = torch.load(p, weights_only=False)\n"""torch.load in a docstring"""\n'
                      "# torch.save in a comment\ny = np.load(f, allow_pickle=True)\nz = eval(s)\nm = model.eval()\n"
                      "exec(code)\n")
    assert [n for n, code in _code(sample) if UNSAFE.search(code)] == [1, 2, 5, 6, 8]


ROUTE = re.compile(r"\. routes\b|\b(add_route|add_get|add_post|add_static|RouteTableDef)\b|"
                   r"\bweb \. (get|post|put|patch|delete|route|static)\b|\. router\b")
# Every file of the pack that registers an HTTP route, with the routes it may register. Each
# has its input-validation test (tests/test_reliability_inputs.py) and its entry in
# the threat model in docs/reliability.md; a new route must get both before it is listed here.
ALLOWED_ROUTES: dict[str, set[str]] = {"nodes/host/routes.py": {"GET /lipschitz/status"}}


def test_the_pack_registers_no_unreviewed_http_route(comfy_in_process):
    found: dict[str, list[str]] = {}
    for p in _product_python_files():
        rel = p.relative_to(REPO_ROOT).as_posix()
        calls = [code for _, code in _code(p) if ROUTE.search(code)]
        if calls and not rel.startswith("tools/"):
            found[rel] = calls
    unreviewed = {f: c for f, c in found.items() if f not in ALLOWED_ROUTES}
    assert not unreviewed, ("new HTTP route(s): validate every input, read/write no user-given path, add a test and "
                            f"an entry in docs/reliability.md's threat model, then list it in ALLOWED_ROUTES: {unreviewed}")
    from lipschitz_personalize.nodes.host import routes

    assert {f"GET {routes.PATH}"} == ALLOWED_ROUTES["nodes/host/routes.py"]
    assert sum(len(c) for c in found.values()) == 1, found  # one registration call


def test_every_file_the_product_writes_goes_through_the_atomic_writer():
    """Temp file + fsync + rename with a checksum: only trainer/persist.py writes files."""
    # disk_usage reads, never writes; a save into ``buffer`` (an io.BytesIO: the previews' PNGs) is no file.
    writers = re.compile(r"\bsave_file \(|\. write_(bytes|text) \(|\bopen \(.*['\"][wax]|\. save \((?! buffer ,)|"
                         r"\bos \. (rename|replace)\b|\bshutil \. (?!disk_usage\b)")
    # tools/ are developer scripts (the toy experiment's figures and report among them).
    hits = [f"{p.relative_to(REPO_ROOT)}:{n}: {code}" for p in _product_python_files()
            if p.relative_to(REPO_ROOT).parts[0] != "tools"
            for n, code in _code(p) if writers.search(code)]
    assert hits and all(h.startswith("trainer/persist.py:") for h in hits), hits


# -- disk: the cap on auto-saved runs, compact resume state ---------------------------------------
def _file_of(folder: Path, name: str, nbytes: int, age_s: float) -> Path:
    path = folder / name
    path.write_bytes(b"\0" * nbytes)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_auto_saved_runs_are_evicted_least_recently_used_first(store, monkeypatch):
    folder = store.delta_dir()
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv(store.AUTO_CACHE_ENV, str(2500 / 1e9))  # a 2500-byte cap
    oldest = _file_of(folder, "auto_a.safetensors", 1000, age_s=300)
    used = _file_of(folder, "auto_b.safetensors", 1000, age_s=200)
    middle = _file_of(folder, "auto_c.safetensors", 1000, age_s=100)
    mine = _file_of(folder, "my_dog_00001.safetensors", 5000, age_s=400)  # Save Delta's: never evicted
    store.mark_used(used)  # reloaded just now
    new = _file_of(folder, "auto_new.safetensors", 1000, age_s=0)
    evicted = store.evict_auto(keep=new)
    assert [name for name, _ in evicted] == ["auto_a.safetensors", "auto_c.safetensors"]
    assert not oldest.exists() and not middle.exists()
    assert used.exists() and new.exists() and mine.exists()
    # The run just written is kept even when it alone is over the cap.
    monkeypatch.setenv(store.AUTO_CACHE_ENV, "0")
    assert [n for n, _ in store.evict_auto(keep=new)] == ["auto_b.safetensors"] and new.exists()


def test_a_bad_cache_cap_falls_back_to_the_default(store, monkeypatch):
    monkeypatch.setenv(store.AUTO_CACHE_ENV, "lots")
    assert store.auto_cache_cap() == int(store.DEFAULT_AUTO_CACHE_GB * 1e9)
    monkeypatch.setenv(store.AUTO_CACHE_ENV, "-1")
    assert store.auto_cache_cap() == int(store.DEFAULT_AUTO_CACHE_GB * 1e9)


def test_compact_moments_round_trip_close_and_never_zero_the_second_moment():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(37, 300, generator=g) * torch.logspace(-9, -5, 300)  # decades apart within a block
    v = (torch.randn(37, 300, generator=g) * torch.logspace(-8, -4, 300)) ** 2
    # A harsh case: four decades inside every block of 256.  fp8 keeps each value to a few
    # percent (3 mantissa bits), small ones too: the int8 absmax format this replaced zeroed most
    # of them (median error 100% for m, 41% for v) while its norm error was lower (1.3%, 0.3%).
    for key, t in (("exp_avg", m), ("exp_avg_sq", v)):
        codes, scale = persist.compact_moment(t, key)
        assert codes.element_size() == 1 and scale.numel() == -(-t.numel() // persist.BLOCK)
        back = persist.expand_moment(codes, scale, key, tuple(t.shape))
        assert back.shape == t.shape and ((back - t).norm() / t.norm()) < 0.05, key
        assert ((back - t).abs() / t.abs()).median() < 0.05, key
    # Adam divides by sqrt(v): a tiny v next to a large one must not come back as 0.
    tiny = v.clone()
    tiny[:, :10] *= 1e-12
    back_v = persist.expand_moment(*persist.compact_moment(tiny, "exp_avg_sq"), "exp_avg_sq", tuple(v.shape))
    assert (back_v > 0).all()


def test_compact_trainer_state_is_a_quarter_of_the_moments_and_resumes(tmp_path):
    model = torch.nn.Linear(256, 128)
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randn(2, 256)).square().sum().backward()
        opt.step()
    state = {"delta": {}, "optimizer": opt.state_dict(), "generator": torch.Generator().get_state(), "step": 3}
    full, _ = persist.flatten_trainer_state(state, names, "fp32")
    compact, meta = persist.flatten_trainer_state(state, names, "fp8")
    size = lambda ts: sum(t.numel() * t.element_size() for k, t in ts.items() if k.startswith("adam."))  # noqa: E731
    assert size(compact) < 0.27 * size(full)
    back = persist.unflatten_trainer_state(
        {**compact, **{f"delta.{n}": p.detach() for n, p in model.named_parameters()}}, meta, names)
    for i in range(len(names)):
        for k in ("exp_avg", "exp_avg_sq"):
            ref = state["optimizer"]["state"][i][k]
            assert back["optimizer"]["state"][i][k].dtype == torch.float32
            # e4m3 keeps 3 mantissa bits: to nearest, each value within 1/16 (about 2.5% in norm),
            # and exp_avg_sq is stored as its square root (twice that).
            assert ((back["optimizer"]["state"][i][k] - ref).norm() / ref.norm()) < {"exp_avg": 0.04}.get(k, 0.07)
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])  # a plain Adam takes it as its own


def test_moments_in_a_format_this_version_does_not_read_are_refused_by_name():
    state = {"delta": {}, "optimizer": {"state": {}, "param_groups": []}, "generator": torch.Generator().get_state(),
             "step": 3}
    tensors, meta = persist.flatten_trainer_state(state, [], "fp32")
    with pytest.raises(ValueError, match="'int8' by an earlier version"):
        persist.unflatten_trainer_state(tensors, {**meta, "moments": "int8"}, [])
