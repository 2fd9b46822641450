"""Loading Hugging Face LLM folders: local files only, safetensors only, errors that say what to do."""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_llms import FAMILIES, MULTIMODAL_FAMILIES, make_tiny_llm

from llmdiff_core.errors import LLMDiffError
from llmdiff_core.llm import choose_dtype, find_llm_folders, load_llm

TEXT_FAMILY = {"gemma3": "gemma3_text", "gemma3_mm": "gemma3_text"}  # HF model_type of the text config


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    return make_tiny_llm("llama", tmp_path / "tiny-llama")


@pytest.mark.parametrize("family", FAMILIES + MULTIMODAL_FAMILIES)
def test_loads_every_family_offline(tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = make_tiny_llm(family, tmp_path / f"my-{family}")
    loaded = load_llm(str(folder))
    text = loaded.text_config
    assert loaded.spec.family == TEXT_FAMILY.get(family, family)
    assert loaded.spec.name == f"my-{family}"
    assert loaded.spec.hidden_size == 64 and loaded.spec.num_layers == text.num_hidden_layers
    assert len(loaded.decoder_blocks()) == loaded.spec.num_layers
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert not loaded.model.training
    # sdpa where the family has it; Gemma 2 soft-caps attention logits, which only eager does.
    assert text._attn_implementation == ("eager" if family == "gemma2" else "sdpa")
    assert len(loaded.tokenizer("café 🍜", add_special_tokens=False)["input_ids"]) > 0


def test_multimodal_gemma3_uses_its_text_decoder(tmp_path: Path) -> None:
    loaded = load_llm(str(make_tiny_llm("gemma3_mm", tmp_path / "g3")))
    assert type(loaded.model).__name__ == "Gemma3Model"  # the base model: no LM head loaded
    assert type(loaded.decoder()).__name__ == "Gemma3TextModel"
    assert loaded.text_config.model_type == "gemma3_text"


def test_explicit_torch_dtype_and_bf16(llama: Path) -> None:
    assert next(load_llm(str(llama), dtype=torch.bfloat16).model.parameters()).dtype == torch.bfloat16
    assert load_llm(str(llama), dtype="bf16").dtype == torch.bfloat16


def test_pickle_only_folder_refused(llama: Path) -> None:
    (llama / "model.safetensors").unlink()
    (llama / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(LLMDiffError) as err:
        load_llm(str(llama))
    msg = str(err.value)
    assert str(llama) in msg and "pytorch_model.bin" in msg and "safetensors" in msg.lower()


def test_missing_folder_config_and_weights(tmp_path: Path, llama: Path) -> None:
    with pytest.raises(LLMDiffError, match="not found.*models/LLM"):
        load_llm(str(tmp_path / "nope"))
    (llama / "model.safetensors").unlink()
    with pytest.raises(LLMDiffError, match="no \\*.safetensors"):
        load_llm(str(llama))
    (llama / "config.json").unlink()
    with pytest.raises(LLMDiffError, match="no config.json"):
        load_llm(str(llama))


def test_missing_tokenizer(llama: Path) -> None:
    (llama / "tokenizer.json").unlink()
    with pytest.raises(LLMDiffError) as err:
        load_llm(str(llama))
    assert str(llama) in str(err.value) and "tokenizer" in str(err.value)


def test_corrupt_safetensors(llama: Path) -> None:
    weights = llama / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    with pytest.raises(LLMDiffError, match="corrupt or incomplete.*download it again") as err:
        load_llm(str(llama))
    assert str(weights) in str(err.value)


def test_missing_weights_refused_not_left_random(llama: Path) -> None:
    weights = llama / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(LLMDiffError, match=r"lacks weights for (model\.)?layers\.1\.mlp\.up_proj\.weight"):
        load_llm(str(llama))


def test_lm_head_is_not_loaded(llama: Path) -> None:
    loaded = load_llm(str(llama))
    assert not any("lm_head" in name for name, _ in loaded.model.named_parameters())


def test_lm_head_may_be_missing(llama: Path) -> None:
    """A base-model checkpoint has no LM head; the encoder never runs it, so that is fine."""
    weights = llama / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["lm_head.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert load_llm(str(llama)).spec.num_layers == 2


def test_sharded_weights(tmp_path: Path, llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(llama).save_pretrained(sharded, max_shard_size="150KB")
    for f in llama.glob("tokenizer*"):
        shutil.copy(f, sharded / f.name)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").exists()
    a, b = load_llm(str(sharded)).model, load_llm(str(llama)).model
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    shards[-1].unlink()
    with pytest.raises(LLMDiffError, match=f"lacks weight shards {shards[-1].name}"):
        load_llm(str(sharded))


def test_damaged_config_index_or_weight_shape_says_what_to_do(tmp_path: Path, llama: Path) -> None:
    config = llama / "config.json"
    good = config.read_text()
    config.write_text(good[: len(good) // 2])  # an interrupted download
    with pytest.raises(LLMDiffError, match="(?s)config.json in LLM folder .* is not readable JSON .*download it again"):
        load_llm(str(llama))
    config.write_text(good)
    weights = llama / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])  # another model's shape
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(LLMDiffError, match="(?s)the weights do not load .*Download the folder again"):
        load_llm(str(llama))
    (llama / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(LLMDiffError, match="(?s)model.safetensors.index.json in LLM folder .* is unreadable"):
        load_llm(str(llama))

def _remote_code_folder(folder: Path, auto_map: bool) -> Path:
    """An architecture transformers does not know, optionally shipping (booby-trapped) model code."""
    folder.mkdir()
    config = {"model_type": "brand_new_llm", "architectures": ["BrandNewForCausalLM"], "hidden_size": 64}
    if auto_map:
        config["auto_map"] = {"AutoConfig": "configuration_brand_new.BrandNewConfig",
                              "AutoModelForCausalLM": "modeling_brand_new.BrandNewForCausalLM"}
        marker = folder / "CODE_RAN"
        (folder / "configuration_brand_new.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_trust_remote_code_off_by_default(tmp_path: Path) -> None:
    assert inspect.signature(load_llm).parameters["trust_remote_code"].default is False
    folder = _remote_code_folder(tmp_path / "remote", auto_map=True)
    with pytest.raises(LLMDiffError, match="brand_new_llm.*trust_remote_code") as err:
        load_llm(str(folder))
    assert str(folder) in str(err.value)
    assert not (folder / "CODE_RAN").exists()


def test_unknown_architecture_without_remote_code(tmp_path: Path) -> None:
    folder = _remote_code_folder(tmp_path / "unknown", auto_map=False)
    with pytest.raises(LLMDiffError, match="unknown architecture 'brand_new_llm'.*update transformers"):
        load_llm(str(folder))


def test_choose_dtype_table(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert choose_dtype("auto", cpu) == torch.float32
    assert choose_dtype("auto", "cpu") == torch.float32
    assert choose_dtype("fp32", cpu) == torch.float32
    assert choose_dtype("bf16", cpu) == torch.bfloat16
    assert choose_dtype("fp16", cpu) == torch.float32  # never fp16 on CPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_dtype("auto", "cuda") == torch.bfloat16
    assert choose_dtype("fp16", "cuda:0") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_dtype("auto", "cuda") == torch.float16  # pre-Ampere GPUs
    with pytest.raises(LLMDiffError, match="unknown LLM dtype 'int8'"):
        choose_dtype("int8", cpu)


def _touch(path: Path, text: str = "{}") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_find_llm_folders_nested(tmp_path: Path) -> None:
    root, other = tmp_path / "LLM", tmp_path / "more"
    _touch(root / "plain" / "config.json")
    _touch(root / "plain" / "model.safetensors")
    _touch(root / "plain" / "original" / "config.json")  # inside a model folder: not a second model
    _touch(root / "plain" / "original" / "model.safetensors")
    _touch(root / "org" / "sharded" / "config.json")
    _touch(root / "org" / "sharded" / "model-00001-of-00002.safetensors")
    _touch(root / "org" / "sharded" / "model-00002-of-00002.safetensors")
    _touch(root / "org" / "sharded" / "model.safetensors.index.json")
    _touch(root / "config-only" / "config.json")
    _touch(root / "weights-only" / "model.safetensors")
    _touch(root / "pickles" / "config.json")
    _touch(root / "pickles" / "pytorch_model.bin")
    _touch(root / ".cache" / "hidden" / "config.json")
    _touch(root / ".cache" / "hidden" / "model.safetensors")
    _touch(other / "deep" / "a" / "b" / "config.json")
    _touch(other / "deep" / "a" / "b" / "model.safetensors")
    os.symlink(root, root / "org" / "loop")  # a symlink loop must not hang the walk
    found = find_llm_folders([str(root), str(other), str(tmp_path / "missing")])
    assert found == ["deep/a/b", "org/sharded", "plain"]
