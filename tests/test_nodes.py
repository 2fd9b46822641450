"""The six nodes, in process, through ComfyUI's own registry: schema promises and whole graphs.

Graph: LLM Loader -> Text Encode (+ CLIP) -> Adapter Loader -> Apply -> comfy.sample -> latents,
on a tiny SD1.5-shaped U-Net, a tiny Llama and a tiny CLIP, all random weights made here.
"""

from __future__ import annotations

import pytest
import torch

import comfy.sample
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import nodes
from llmdiff_core.adapter_file import save_adapter
from llmdiff_core.errors import LLMDiffError
from conftest import run_node as run
from tiny_unets import SD15_CONTEXT_DIM, make_adapter, make_adapter_config, tiny_llm_spec, tiny_sd15

NODE_IDS = ["LLMDiffLLMLoader", "LLMDiffTextEncode", "LLMDiffAdapterLoader", "LLMDiffApply",
            "LLMDiffApplyAdvanced", "LLMDiffInspect"]
CORE_TYPES = {"MODEL", "CONDITIONING", "CLIP", "IMAGE", "STRING", "INT", "FLOAT", "BOOLEAN", "COMBO"}


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_schema_tooltips_and_namespaced_types(node_id):
    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    info = cls.GET_NODE_INFO_V1()
    assert info["name"] == node_id and info["category"].startswith("conditioning/llmdiff")
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
            kind = spec[0]
            if isinstance(kind, str) and kind not in CORE_TYPES:
                assert kind.startswith("LLMDIFF_"), f"{node_id}.{name}: custom type {kind} is not namespaced"
    for kind in info["output"]:
        assert kind in CORE_TYPES or kind.startswith("LLMDIFF_")


def test_llm_loader_lists_the_registered_folder(model_folders):
    loader = nodes.NODE_CLASS_MAPPINGS["LLMDiffLLMLoader"]
    assert "tiny-llama" in loader.GET_NODE_INFO_V1()["input"]["required"]["model_dir"][1]["options"]


@pytest.fixture(scope="module")
def clip():
    """A tiny SD1 CLIP (real BPE tokenizer from ComfyUI's tree) whose width fits the tiny U-Net."""
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    config = {"hidden_size": SD15_CONTEXT_DIM, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "projection_dim": SD15_CONTEXT_DIM}
    clip = comfy.sd.CLIP(target=target, model_options={"clip_l_model_config": config})
    torch.manual_seed(0)
    for p in clip.cond_stage_model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return clip


def _save_adapter(llm, model_folders, name: str, **overrides) -> str:
    unet = tiny_sd15()
    config = make_adapter_config(unet, llm.spec, **overrides)
    save_adapter(make_adapter(config, seed=3, trained=True, model_patcher=unet), model_folders / "llmdiff" / name)
    return name


def _sample(model, positive, negative, seed: int = 0) -> torch.Tensor:
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 3, 5.0, "euler", "normal", positive, negative, latent,
                               denoise=1.0, disable_pbar=True, seed=seed)


def test_llm_loader_gives_the_llm_spec(llm):
    assert llm.spec.family == "llama" and llm.spec.name == "tiny-llama"
    assert next(llm.loaded.model.parameters()).dtype == torch.float32  # auto on CPU = fp32


@pytest.mark.parametrize("mode", ["llm", "clip"])
def test_whole_graph_runs_and_the_adapter_changes_the_image(llm, clip, model_folders, mode):
    name = _save_adapter(llm, model_folders, f"tiny_{mode}.safetensors", original_path=mode)
    (adapter,) = run("LLMDiffAdapterLoader", adapter_name=name)
    clip_input = clip if mode == "clip" else None
    (pos,) = run("LLMDiffTextEncode", llm=llm, text="a (red:1.2) fox in the snow", max_tokens=16,
                 overflow="error", prompt_per_line=False, clip=clip_input)
    (neg,) = run("LLMDiffTextEncode", llm=llm, text="", max_tokens=16, overflow="error",
                 prompt_per_line=False, clip=clip_input)
    (patched,) = run("LLMDiffApply", model=tiny_sd15(), adapter=adapter, strength=1.0,
                     start_percent=0.0, end_percent=1.0)
    out = _sample(patched, pos, neg)
    assert torch.isfinite(out).all()
    (other,) = run("LLMDiffTextEncode", llm=llm, text="a blue boat", max_tokens=16, overflow="error",
                   prompt_per_line=False, clip=clip_input)
    assert not torch.equal(out, _sample(patched, other, neg))  # the prompt reaches the U-Net through the LLM
    if mode == "clip":
        (off,) = run("LLMDiffApplyAdvanced", model=tiny_sd15(), adapter=adapter, strength=1.0,
                     start_percent=0.0, end_percent=1.0, input_weight=0.0, middle_weight=0.0,
                     output_weight=0.0, layer_weights="")
        plain = _sample(tiny_sd15(), pos, neg)
        assert torch.equal(_sample(off, pos, neg), plain)  # all block weights 0 = the unpatched model
        assert not torch.equal(out, plain)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_adapter_loader_half_projections_sample_like_fp32(llm, clip, model_folders, dtype):
    """The loader's dtype: the projections (nearly all weights) in half, the gates and the encoder's own
    parameters kept float32; sampling matches the float32 adapter closely. auto on a CPU = float32."""
    name = _save_adapter(llm, model_folders, "tiny_dtype.safetensors", original_path="clip")
    (full,) = run("LLMDiffAdapterLoader", adapter_name=name, dtype="auto")  # CPU: fp32
    (half,) = run("LLMDiffAdapterLoader", adapter_name=name, dtype=dtype)
    assert all(p.dtype == torch.float32 for p in full.parameters())
    want = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert {p.dtype for p in half.sites.parameters()} == {want}
    assert {p.dtype for p in half.encoder.parameters()} == {torch.float32}
    assert half.a_orig.dtype == half.a_new.dtype == torch.float32
    assert torch.equal(half.gate_weights()[1], full.gate_weights()[1])
    (pos,) = run("LLMDiffTextEncode", llm=llm, text="a red fox in the snow", max_tokens=16, overflow="error",
                 prompt_per_line=False, clip=clip)
    (neg,) = run("LLMDiffTextEncode", llm=llm, text="", max_tokens=16, overflow="error", prompt_per_line=False,
                 clip=clip)
    outs = []
    for adapter in (full, half):
        (patched,) = run("LLMDiffApply", model=tiny_sd15(), adapter=adapter, strength=1.0, start_percent=0.0,
                         end_percent=1.0)
        outs.append(_sample(patched, pos, neg))
    plain = _sample(tiny_sd15(), pos, neg)
    effect = (outs[0] - plain).abs().max()
    assert effect > 1e-3  # the adapter does change the image, so the comparison below means something
    assert (outs[1] - outs[0]).abs().max() < 0.05 * effect


def test_adapter_dtype_names() -> None:
    from llmdiff_core.comfy_adapter import inference_dtype

    cpu = torch.device("cpu")
    assert inference_dtype("auto", cpu) == torch.float32
    assert inference_dtype("fp16", cpu) == torch.float16 and inference_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(LLMDiffError, match="unknown adapter dtype 'int8'"):
        inference_dtype("int8", cpu)


def test_llm_is_released_after_encoding_unless_kept(llm, model_folders):
    import comfy.model_management as mm

    def resident(managed) -> bool:
        return any(loaded.model is managed.patcher for loaded in mm.current_loaded_models)

    (first,) = run("LLMDiffTextEncode", llm=llm, text="a cat", max_tokens=8, overflow="error", prompt_per_line=False)
    assert not resident(llm)  # the default: offloaded right after the encode
    run("LLMDiffTextEncode", llm=llm, text="a dog", max_tokens=8, overflow="error", prompt_per_line=False)  # reloads
    (kept,) = run("LLMDiffLLMLoader", model_dir="tiny-llama", dtype="auto", device="default",
                  trust_remote_code=False, after_encoding="keep")
    try:
        (again,) = run("LLMDiffTextEncode", llm=kept, text="a cat", max_tokens=8, overflow="error",
                       prompt_per_line=False)
        assert resident(kept)  # left to ComfyUI's model management
        a, b = (c[0][1]["model_conds"]["llmdiff"].cond for c in (first, again))
        assert torch.equal(a.hidden, b.hidden) and torch.equal(a.scores, b.scores)
    finally:
        from llmdiff_core.comfy_llm import release
        release(kept.patcher)
    assert not resident(kept)


def test_prompt_per_line_makes_a_batch(llm, clip):
    (cond,) = run("LLMDiffTextEncode", llm=llm, text="one\ntwo two\n\nthree", max_tokens=16,
                  overflow="error", prompt_per_line=True, clip=clip)
    tensor, extras = cond[0]
    assert tensor.shape[0] == 3 and extras["pooled_output"].shape[0] == 3
    assert extras["model_conds"]["llmdiff"].cond.batch_size == 3


def test_text_encode_bad_prompts(llm):
    with pytest.raises(LLMDiffError, match="max_tokens=4"):
        run("LLMDiffTextEncode", llm=llm, text="far too many words for this tiny budget", max_tokens=4,
            overflow="error", prompt_per_line=False)
    (cut,) = run("LLMDiffTextEncode", llm=llm, text="far too many words for this tiny budget", max_tokens=4,
                 overflow="truncate", prompt_per_line=False)
    assert int(cut[0][1]["model_conds"]["llmdiff"].cond.mask.sum()) == 3  # BOS is not attended
    (empty,) = run("LLMDiffTextEncode", llm=llm, text="", max_tokens=8, overflow="error", prompt_per_line=False)
    assert int(empty[0][1]["model_conds"]["llmdiff"].cond.mask.sum()) == 1  # keeps its BOS
    (uni,) = run("LLMDiffTextEncode", llm=llm, text="café 東京 🐱", max_tokens=64, overflow="error",
                 prompt_per_line=False)
    assert torch.isfinite(uni[0][1]["model_conds"]["llmdiff"].cond.scores).all()


def test_adapter_for_another_llm_is_refused_at_sampling(llm, model_folders):
    name = "wide_llm.safetensors"
    unet = tiny_sd15()
    config = make_adapter_config(unet, tiny_llm_spec(hidden_size=2048, num_layers=2, name="wide-llm"),
                                 original_path="clip")
    save_adapter(make_adapter(config, seed=1), model_folders / "llmdiff" / name)
    (adapter,) = run("LLMDiffAdapterLoader", adapter_name=name)
    (cond,) = run("LLMDiffTextEncode", llm=llm, text="a cat", max_tokens=8, overflow="error",
                  prompt_per_line=False, clip=None)
    (patched,) = run("LLMDiffApply", model=unet, adapter=adapter, strength=1.0, start_percent=0.0,
                     end_percent=1.0)
    with pytest.raises(LLMDiffError, match="wide-llm.*tiny-llama|tiny-llama.*wide-llm"):
        _sample(patched, cond, cond)


def test_hybrid_adapter_without_clip_says_to_connect_clip(llm, model_folders):
    name = _save_adapter(llm, model_folders, "hybrid_noclip.safetensors", original_path="clip")
    (adapter,) = run("LLMDiffAdapterLoader", adapter_name=name)
    (cond,) = run("LLMDiffTextEncode", llm=llm, text="a cat", max_tokens=8, overflow="error",
                  prompt_per_line=False, clip=None)
    (patched,) = run("LLMDiffApply", model=tiny_sd15(), adapter=adapter, strength=1.0, start_percent=0.0,
                     end_percent=1.0)
    with pytest.raises(LLMDiffError, match="Connect the checkpoint's CLIP"):
        _sample(patched, cond, cond)


def test_adapter_loader_refuses_a_pickle(model_folders):
    bad = model_folders / "llmdiff" / "looks_fine.safetensors"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 64)  # a zip (torch.save) renamed to .safetensors
    with pytest.raises(LLMDiffError, match="looks_fine"):
        run("LLMDiffAdapterLoader", adapter_name="looks_fine.safetensors")


def test_inspect_node_plots_the_gates_and_says_what_the_adapter_needs(llm, model_folders):
    name = _save_adapter(llm, model_folders, "inspect_me.safetensors",
                         training={"steps": 1200, "lr": 1e-4, "data": "pets", "clip_stop_at_layer": -2})
    (adapter,) = run("LLMDiffAdapterLoader", adapter_name=name)
    image, notes = run("LLMDiffInspect", adapter=adapter, width=512, height=384)
    assert image.shape == (1, 384, 512, 3) and image.std() > 0
    assert "Base model: SD1.5 (16 cross-attention layers, context width 64)" in notes
    assert "LLM: tiny-llama (llama" in notes
    assert "Mode: hybrid (clip)" in notes and "up to 128 LLM tokens" in notes
    assert "CLIP Set Last Layer node set to -2" in notes
    assert "Training: steps 1200, lr 0.0001, data pets." in notes


def test_adapter_notes_follow_the_mode_and_what_training_recorded(llm):
    from llmdiff_core.adapter_notes import adapter_notes

    paper = make_adapter_config(tiny_sd15(), llm.spec, original_path="llm", max_tokens=77,
                                training={"clip_stop_at_layer": -2})
    text = adapter_notes(paper)
    assert "Mode: paper (llm): the LLM replaces CLIP;" in text and "up to 77 LLM tokens" in text
    assert "CLIP Set Last Layer" not in text  # paper mode reads no CLIP
    fresh = adapter_notes(make_adapter_config(tiny_sd15(), llm.spec))
    assert fresh.endswith("Training: none recorded (an untrained or converted adapter).")
