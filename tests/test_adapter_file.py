"""The adapter file format (save/load/refusals) and adapter-vs-MODEL/LLM validation."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import os
import pickle
import random
import types
from pathlib import Path

import pytest
import safetensors.torch
import torch

import llmdiff_core.adapter_file as adapter_file
from llmdiff_core.adapter_file import load_adapter, read_adapter_config, save_adapter
from llmdiff_core.config import FORMAT_VERSION, AdapterConfig
from llmdiff_core.errors import AdapterMismatchError, LLMDiffError
from llmdiff_core.validation import check_adapter_matches_llm, check_adapter_matches_model, check_features_match
from tiny_unets import make_adapter, make_adapter_config, tiny_llm_spec, tiny_sd15, tiny_sd15_minimal, tiny_sdxl

BUILDERS = {"sd15": tiny_sd15, "sdxl": tiny_sdxl}


@pytest.fixture(autouse=True)
def _no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in these tests may unpickle: torch.load fails the test if anything calls it."""
    def forbidden(*args: object, **kwargs: object) -> None:
        pytest.fail("torch.load was called")
    monkeypatch.setattr(torch, "load", forbidden)


def _config(base: str = "sd15", **overrides: object) -> AdapterConfig:
    return make_adapter_config(BUILDERS[base](), tiny_llm_spec(), **overrides)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A valid SD1.5 adapter file."""
    return save_adapter(make_adapter(_config(), seed=3, trained=True), tmp_path / "good.safetensors")


def _rewrite(src: Path, dst: Path, metadata: dict[str, str] | None = None,
             edit: dict[str, torch.Tensor | None] | None = None) -> Path:
    """Copy an adapter file with other metadata and/or tensors (None deletes one)."""
    tensors = safetensors.torch.load_file(src)
    for k, v in (edit or {}).items():
        if v is None:
            del tensors[k]
        else:
            tensors[k] = v
    if metadata is None:
        with safetensors.safe_open(src, "pt") as f:
            metadata = f.metadata()
    safetensors.torch.save_file(tensors, dst, metadata=metadata)
    return dst


def _raises(path: Path, *needles: str) -> str:
    """Both readers refuse the file with an LLMDiffError naming it and containing every needle."""
    for reader in (read_adapter_config, load_adapter):
        with pytest.raises(LLMDiffError) as info:
            reader(path)
        msg = str(info.value)
        assert str(path) in msg
        for needle in needles:
            assert needle in msg, msg
    return msg


# --- round trip ---------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["sd15", "sdxl"])
@pytest.mark.parametrize("original_path", ["clip", "llm"])
def test_round_trip_bit_exact(tmp_path: Path, base: str, original_path: str) -> None:
    config = _config(base, original_path=original_path, encoding="layer:2", c0="zeros",
                     training={"steps": 1200, "data": "tiny"})
    adapter = make_adapter(config, seed=7, trained=True)
    assert (adapter.phi is not None) == (original_path == "llm")
    assert (adapter.phi_pool is not None) == (original_path == "llm" and base == "sdxl")
    path = save_adapter(adapter, tmp_path / "a.safetensors")

    assert read_adapter_config(path) == config
    loaded = load_adapter(path)
    assert loaded.config == config
    want, got = adapter.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    params = list(loaded.parameters())
    assert len(params) == len(want) and not any(p.is_meta for p in params)
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in params)  # resumable


def test_dtype_kept_or_cast(tmp_path: Path) -> None:
    adapter = make_adapter(_config(), seed=1, trained=True).to(torch.bfloat16)
    path = save_adapter(adapter, tmp_path / "bf16.safetensors")
    assert {p.dtype for p in load_adapter(path).parameters()} == {torch.bfloat16}
    as_fp32 = load_adapter(path, dtype=torch.float32)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    assert torch.equal(as_fp32.a_new, adapter.a_new.float())


def test_read_config_reads_no_tensor_data(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_data(*args: object, **kwargs: object) -> None:
        pytest.fail("tensor data was read")
    monkeypatch.setattr(safetensors.torch, "load_file", no_data)
    monkeypatch.setattr(safetensors.torch, "load", no_data)
    assert read_adapter_config(saved).base == "sd15"
    with pytest.raises(pytest.fail.Exception):
        load_adapter(saved)  # the guard itself works


def test_metadata_names_format_and_version(saved: Path) -> None:
    with safetensors.safe_open(saved, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "llmdiff-adapter" and meta["version"] == str(FORMAT_VERSION)
    assert AdapterConfig.from_json(meta["llmdiff_config"]) == read_adapter_config(saved)


# --- atomic write -------------------------------------------------------------------------------
def test_save_leaves_no_temp_file(tmp_path: Path) -> None:
    save_adapter(make_adapter(_config(), seed=0), tmp_path / "sub" / "a.safetensors")
    save_adapter(make_adapter(_config(), seed=1), tmp_path / "sub" / "a.safetensors")  # overwrite
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.safetensors"]


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_saved_file_has_the_usual_mode(tmp_path: Path) -> None:
    """Like any new file (umask applies), not private like a mkstemp file: shared model folders."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    saved = save_adapter(make_adapter(_config(), seed=0), tmp_path / "a.safetensors")
    assert saved.stat().st_mode == plain.stat().st_mode


def test_failed_save_keeps_old_file(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = saved.read_bytes()

    def half_write_then_fail(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError("No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", half_write_then_fail)
    with pytest.raises(OSError, match="No space"):
        save_adapter(make_adapter(_config(), seed=9), saved)
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_save_syncs_before_replacing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Data reaches the disk before the rename makes it visible (else a crash could leave an empty file)."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    save_adapter(make_adapter(_config(), seed=0), tmp_path / "a.safetensors")
    assert events[:2] == ["fsync", "replace"]


def test_save_refuses_other_suffix(tmp_path: Path) -> None:
    with pytest.raises(LLMDiffError, match="safetensors"):
        save_adapter(make_adapter(_config(), seed=0), tmp_path / "a.pt")
    assert not list(tmp_path.iterdir())


# --- damaged files ------------------------------------------------------------------------------
def test_truncated_file(saved: Path, tmp_path: Path) -> None:
    data = saved.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    cuts = [0, 3, 8, 9, 40, header_end // 2, header_end - 1, header_end, header_end + 7, len(data) - 1]
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        msg = _raises(bad, "damaged or incomplete", "Download it again")
        if 9 <= cut < header_end:  # says why in words, before safetensors parses anything
            assert f"the header announces {header_end - 8} bytes but the file has only {cut}" in msg


def test_random_bytes(tmp_path: Path) -> None:
    rng = random.Random(0)
    noise = bytes(rng.getrandbits(8) for _ in range(4096))
    plausible = (200).to_bytes(8, "little") + b"{" + noise  # sane length, then not JSON
    not_json_object = (2).to_bytes(8, "little") + b"[]" + noise[:10]
    for i, data in enumerate([noise, plausible, not_json_object]):
        bad = tmp_path / f"rand{i}.safetensors"
        bad.write_bytes(data)
        msg = _raises(bad, "damaged or incomplete")
    assert "does not start like a safetensors file" in msg


def test_broken_config_json(saved: Path, tmp_path: Path) -> None:
    meta = {"llmdiff_config": '{"format": "llmdiff-adapter", "version": 1, "base": ', "version": "1"}
    _raises(_rewrite(saved, tmp_path / "b.safetensors", meta), "damaged", "config")


def test_config_without_version(saved: Path, tmp_path: Path) -> None:
    meta = {"llmdiff_config": read_adapter_config(saved).to_json()}
    _raises(_rewrite(saved, tmp_path / "nov.safetensors", meta), "damaged", "format version '' is not a number")


def test_missing_file(tmp_path: Path) -> None:
    _raises(tmp_path / "nope.safetensors", "not found")


def test_other_file_types_and_unreadable_paths(saved: Path, tmp_path: Path) -> None:
    for name in ("adapter.gguf", "adapter.safetensors.txt"):
        (tmp_path / name).write_bytes(saved.read_bytes())  # an adapter's bytes under another name: still refused
        _raises(tmp_path / name, "is not an adapter file", ".safetensors files")
    (tmp_path / "folder.safetensors").mkdir()
    _raises(tmp_path / "folder.safetensors", "cannot read the adapter file")


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("base", "sd3", "unknown base model family 'sd3'"),
    ("encoding", "layer:99", "layer index out of range"),
    ("format", "someone-elses-adapter", "not an LLMDiff adapter config"),
])
def test_a_config_that_reads_but_makes_no_sense(saved: Path, tmp_path: Path, field: str, value: str,
                                               needle: str) -> None:
    with safetensors.safe_open(saved, "pt") as f:
        meta = f.metadata()
    config = {**json.loads(meta["llmdiff_config"]), field: value}
    msg = _raises(_rewrite(saved, tmp_path / "odd.safetensors", {**meta, "llmdiff_config": json.dumps(config)}),
                  needle)
    assert "damaged" not in msg  # (it names what is wrong instead)


# --- pickles are never loaded -------------------------------------------------------------------
class _Booby:
    """Unpickling this creates a marker file: proof that nobody unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickles_refused_by_name_and_by_content(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "was_unpickled"
    state = {"a_new": torch.zeros(3), "trap": _Booby(marker)}
    pt = tmp_path / "adapter.pt"
    torch.save(state, pt, _use_new_zipfile_serialization=zip_format)
    for suffix in (".bin", ".ckpt"):
        (tmp_path / f"adapter{suffix}").write_bytes(pt.read_bytes())
        _raises(tmp_path / f"adapter{suffix}", "never unpickles")
    _raises(pt, "never unpickles", "convert", "save_adapter")
    disguised = tmp_path / "adapter.safetensors"
    disguised.write_bytes(pt.read_bytes())
    _raises(disguised, "really a pickled", "never unpickles")
    assert not marker.exists()


def test_plain_pickle_protocol_detected(tmp_path: Path) -> None:
    bad = tmp_path / "p.safetensors"
    bad.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    _raises(bad, "pickled")


# --- not ours / not for us ----------------------------------------------------------------------
@pytest.mark.parametrize(("keys", "kind"), [
    (["lora_unet_down_blocks_0_attn2_to_k.lora_down.weight", "lora_unet_down_blocks_0_attn2_to_k.alpha"], "LoRA"),
    (["image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight"], "IP-Adapter"),
    (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"], "model checkpoint"),
])
def test_foreign_safetensors(tmp_path: Path, keys: list[str], kind: str) -> None:
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({k: torch.zeros(2, 2) for k in keys}, path, metadata={"ss_network_dim": "4"})
    _raises(path, "not an LLMDiff adapter", kind)


def test_no_metadata_at_all(tmp_path: Path) -> None:
    path = tmp_path / "bare.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, path)
    msg = _raises(path, "not an LLMDiff adapter")
    assert "looks like" not in msg


def test_newer_format_version(saved: Path, tmp_path: Path) -> None:
    with safetensors.safe_open(saved, "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["llmdiff_config"])
    config["version"] = FORMAT_VERSION + 1
    meta = {**meta, "version": str(FORMAT_VERSION + 1), "llmdiff_config": json.dumps(config)}
    _raises(_rewrite(saved, tmp_path / "new.safetensors", meta),
            f"version {FORMAT_VERSION + 1}", "update ComfyUI-LLMDiff")
    # A newer format may store its config differently (here: not even JSON): "update", never "damaged".
    meta["llmdiff_config"] = "zstd:KLUv/QBYAQAA"
    msg = _raises(_rewrite(saved, tmp_path / "newer.safetensors", meta), "update ComfyUI-LLMDiff")
    assert "damaged" not in msg


def test_wrong_missing_extra_tensors(saved: Path, tmp_path: Path) -> None:
    edit = {"sites.0.to_k.weight": torch.zeros(5, 5), "a_new": None, "encoder.extra": torch.zeros(1)}
    msg = _raises(_rewrite(saved, tmp_path / "edited.safetensors", edit=edit),
                  "does not match its own config", "sites.0.to_k.weight [5, 5]", "1 missing tensor(s): a_new",
                  "1 unexpected tensor(s): encoder.extra")
    assert "more" not in msg


def test_many_mismatches_are_summarised(saved: Path, tmp_path: Path) -> None:
    n = len(_config().sites)
    edit = {f"sites.{i}.to_v.weight": torch.zeros(1, 1) for i in range(n)}
    _raises(_rewrite(saved, tmp_path / "edited.safetensors", edit=edit),
            f"{n} wrong tensor(s)", f"and {n - 5} more")


def test_integer_tensor_refused(saved: Path, tmp_path: Path) -> None:
    edit = {"b_new": torch.zeros(len(_config().sites), dtype=torch.int32)}
    _raises(_rewrite(saved, tmp_path / "int.safetensors", edit=edit), "b_new has dtype I32")


# --- adapter vs MODEL ---------------------------------------------------------------------------
SD15_WORDS = "SD1.5 (16 cross-attention layers, context width 64)"
SDXL_WORDS = "SDXL (70 cross-attention layers, context width 80)"


def test_adapter_matches_its_model() -> None:
    check_adapter_matches_model(_config("sd15"), tiny_sd15())
    check_adapter_matches_model(_config("sdxl"), tiny_sdxl().model)  # a BaseModel works too


@pytest.mark.parametrize(("adapter_base", "model", "trained", "given"), [
    ("sdxl", tiny_sd15, SDXL_WORDS, SD15_WORDS),
    ("sd15", tiny_sdxl, SD15_WORDS, SDXL_WORDS),
])
def test_adapter_for_other_family(adapter_base: str, model: object, trained: str, given: str) -> None:
    with pytest.raises(AdapterMismatchError) as info:
        check_adapter_matches_model(_config(adapter_base), model())
    assert str(info.value) == (f"This adapter was trained for {trained}, but the MODEL is {given}. Load the "
                               "base model the adapter was made for, or an adapter for this model.")


def test_adapter_same_family_other_dims() -> None:
    with pytest.raises(AdapterMismatchError) as info:
        check_adapter_matches_model(_config("sd15"), tiny_sd15_minimal())
    msg = str(info.value)
    assert "different cross-attention layers" in msg
    assert "SD1.5 (7 cross-attention layers" in msg and SD15_WORDS in msg
    assert "layer 1 (input block 2, transformer block 0): query width 32" in msg
    assert "layer 1 (input block 3, transformer block 0): query width 64" in msg


def test_adapter_same_family_one_layer_differs() -> None:
    config = _config("sd15")
    config.sites[5] = dataclasses.replace(config.sites[5], context_dim=768)
    with pytest.raises(AdapterMismatchError) as info:
        check_adapter_matches_model(config, tiny_sd15())
    assert "first difference at layer 5 (input block 8, transformer block 0)" in str(info.value)
    assert "context width 768 in the adapter" in str(info.value)


def test_adapter_same_family_fewer_layers() -> None:
    config = _config("sd15")
    config.sites = config.sites[:10]
    with pytest.raises(AdapterMismatchError, match="the adapter has 10 cross-attention layers, the MODEL 16"):
        check_adapter_matches_model(config, tiny_sd15())


def test_adapter_on_a_model_without_unet() -> None:
    not_a_unet = types.SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2))
    with pytest.raises(AdapterMismatchError, match="without SD-style cross-attention layers"):
        check_adapter_matches_model(_config("sd15"), types.SimpleNamespace(model=not_a_unet))


# --- adapter vs LLM / features ------------------------------------------------------------------
def test_llm_of_another_width_refused() -> None:
    config = _config(llm=tiny_llm_spec(2048, 16, "gemma2", "gemma-2-2b"))
    wide = tiny_llm_spec(4096, 32, "llama", "Meta-Llama-3-8B")
    with pytest.raises(AdapterMismatchError) as info:
        check_adapter_matches_llm(config, wide)
    msg = str(info.value)
    assert config.llm.describe() in msg and wide.describe() in msg and "Load the LLM" in msg
    with pytest.raises(AdapterMismatchError) as info:
        check_features_match(config, wide)
    assert "text features were encoded with the LLM " + wide.describe() in str(info.value)


def test_llm_of_another_depth_refused() -> None:
    config = _config(llm=tiny_llm_spec(2048, 16))
    with pytest.raises(AdapterMismatchError):
        check_adapter_matches_llm(config, tiny_llm_spec(2048, 18))


def test_same_shape_other_llm_only_warns(caplog: pytest.LogCaptureFixture) -> None:
    config = _config(llm=tiny_llm_spec(32, 4, "llama", "base-llm"))
    assert check_adapter_matches_llm(config, config.llm) is None
    assert check_features_match(config, config.llm) is None
    finetune = tiny_llm_spec(32, 4, "llama", "my-finetune")
    with caplog.at_level(logging.WARNING):
        warning = check_adapter_matches_llm(config, finetune)
    assert warning is not None and "my-finetune" in warning and "base-llm" in warning
    assert warning in caplog.text
    assert check_features_match(config, tiny_llm_spec(32, 4, "qwen2", "base-llm")) is not None


def test_adapter_file_code_has_no_pickle_loader() -> None:
    """No torch.load / pickle in the module's code (its messages may mention torch.load)."""
    tree = ast.parse(Path(adapter_file.__file__).read_text())
    attrs = {(n.value.id, n.attr) for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    imports = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert ("safetensors", "safe_open") in attrs  # the walk does see the module's calls
    assert ("torch", "load") not in attrs and not imports & {"pickle", "load", "dill"}
