"""SDXL + a hybrid (original_path "clip") adapter through the real SDXL CLIP path, in process.

A tiny real comfy SDXL CLIP (SDXLTokenizer + SDXLClipModel: CLIP-L and CLIP-G, pooled from CLIP-G)
whose widths add up to the tiny SDXL U-Net's context width, the tiny Llama, and the 70-site tiny
SDXL U-Net:
- nodes: Text Encode (+ SDXL CLIP) -> Adapter Loader -> Apply -> comfy.sample; the pooled CLIP-G
  vector reaches the U-Net's y;
- training: runner.run_with with the same CLIP, SDXL size conditioning, a few steps.

ComfyUI's CLIP text_projection is square (hidden -> hidden), so a CLIP-G narrow enough to fit the
80-wide tiny U-Net would pool to 48, not the 1280 SDXL's ADM expects. The tiny CLIP-G therefore gets
a hidden -> 1280 text_projection (the same comfy op, only wider): everything else is comfy's own code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import comfy.sample
import comfy.sd
import comfy.sdxl_clip
import comfy.supported_models_base
from llmdiff_core.adapter_file import load_adapter, save_adapter
from llmdiff_core.llm import load_llm
from llmdiff_core.training import runner
from llmdiff_core.training.options import TrainOptions
from conftest import run_node as run
from tiny_unets import SDXL_CONTEXT_DIM, make_adapter, make_adapter_config, tiny_sdxl
from seeded_weights import seeded_init
from train_support import CAPTIONS, make_images, tiny_vae, write_folder

CLIP_L_WIDTH = 32
CLIP_G_WIDTH = SDXL_CONTEXT_DIM - CLIP_L_WIDTH  # 48: [CLIP-L | CLIP-G] is the U-Net's context
POOLED = 1280  # SDXL's ADM: pooled CLIP-G 1280 + 6 x 256 size/crop embeddings
LATENT = 8  # 64 px


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_sdxl_clip(seed: int = 11):
    """comfy.sd.CLIP around SDXLClipModel: CLIP-L 32 + CLIP-G 48 wide, pooled 1280, 3 layers each
    (both read the penultimate layer)."""
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    small = {"intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
    clip = comfy.sd.CLIP(target=target, model_options={
        "clip_l_model_config": {**small, "hidden_size": CLIP_L_WIDTH, "projection_dim": CLIP_L_WIDTH},
        "clip_g_model_config": {**small, "hidden_size": CLIP_G_WIDTH, "projection_dim": POOLED}})
    g = clip.cond_stage_model.clip_g.transformer
    old = g.text_projection
    g.text_projection = type(old)(CLIP_G_WIDTH, POOLED, bias=False, dtype=old.weight.dtype, device=old.weight.device)
    seeded_init(clip.cond_stage_model, seed)  # variance-preserving: a pooled vector of order 1
    return clip


@pytest.fixture(scope="module")
def clip():
    return tiny_sdxl_clip()


def encode(llm, clip, text: str):
    (cond,) = run("LLMDiffTextEncode", llm=llm, text=text, max_tokens=16, overflow="error",
                  prompt_per_line=False, clip=clip)
    return cond


def save_hybrid(llm, model_folders, name: str, trained: bool) -> object:
    unet = tiny_sdxl()
    config = make_adapter_config(unet, llm.spec, original_path="clip")
    save_adapter(make_adapter(config, seed=5, trained=trained, model_patcher=unet), model_folders / "llmdiff" / name)
    (adapter,) = run("LLMDiffAdapterLoader", adapter_name=name)
    return adapter


def apply(adapter, strength: float = 1.0):
    (patched,) = run("LLMDiffApply", model=tiny_sdxl(), adapter=adapter, strength=strength,
                     start_percent=0.0, end_percent=1.0)
    return patched


def sample(model, positive, negative, seed: int = 0) -> torch.Tensor:
    latent = torch.zeros(1, 4, LATENT, LATENT)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", positive, negative, latent,
                               denoise=1.0, disable_pbar=True, seed=seed)


class CaptureY:
    """Records the y (ADM input) of every U-Net call: a pre-hook on the shared label_emb."""

    def __init__(self, model_patcher) -> None:
        self.ys: list[torch.Tensor] = []
        self.module = model_patcher.model.diffusion_model.label_emb

    def __enter__(self) -> CaptureY:
        self.handle = self.module.register_forward_pre_hook(lambda m, args: self.ys.append(args[0].detach().clone()))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.fixture(scope="module")
def prompts(llm, clip):
    return {"pos": encode(llm, clip, "a (red:1.2) fox in the snow"), "neg": encode(llm, clip, ""),
            "other": encode(llm, clip, "a blue boat")}


def test_sdxl_clip_conditioning_has_the_unet_width_and_a_1280_pooled_vector(prompts):
    tensor, extras = prompts["pos"][0]
    assert tensor.shape == (1, 77, SDXL_CONTEXT_DIM)
    assert extras["pooled_output"].shape == (1, POOLED) and extras["pooled_output"].abs().max() > 0
    assert "llmdiff" in extras["model_conds"]


def test_trained_hybrid_adapter_changes_the_sdxl_image_and_strength_0_does_not(llm, clip, model_folders, prompts):
    adapter = save_hybrid(llm, model_folders, "sdxl_hybrid_trained.safetensors", trained=True)
    pos, neg = prompts["pos"], prompts["neg"]
    plain = sample(tiny_sdxl(), pos, neg)
    out = sample(apply(adapter), pos, neg)
    assert torch.isfinite(out).all() and torch.isfinite(plain).all()
    assert (out - plain).abs().max() > 1e-3
    assert torch.equal(sample(apply(adapter, strength=0.0), pos, neg), plain)
    # the prompt reaches the U-Net (through the LLM and CLIP)
    assert not torch.equal(sample(apply(adapter), prompts["other"], neg), out)


def test_fresh_hybrid_adapter_samples_like_the_unpatched_sdxl(llm, model_folders, prompts):
    adapter = save_hybrid(llm, model_folders, "sdxl_hybrid_fresh.safetensors", trained=False)
    calls = []
    encode_features = adapter.encode
    adapter.encode = lambda *a, **k: calls.append(1) or encode_features(*a, **k)
    pos, neg = prompts["pos"], prompts["neg"]
    out = sample(apply(adapter), pos, neg)
    assert calls  # the features did reach the patch
    assert (out - sample(tiny_sdxl(), pos, neg)).abs().max() <= 1e-6


def test_pooled_clip_g_vector_reaches_the_unet_y(llm, clip, model_folders, prompts):
    adapter = save_hybrid(llm, model_folders, "sdxl_hybrid_pooled.safetensors", trained=True)
    pos, neg, other = prompts["pos"], prompts["neg"], prompts["other"]
    patched = apply(adapter)
    with CaptureY(patched) as cap:
        out = sample(patched, pos, neg)
    assert cap.ys and all(y.shape[-1] == 2816 for y in cap.ys)
    pooled = {name: prompts[name][0][1]["pooled_output"][0] for name in ("pos", "neg")}
    assert (pooled["pos"] - pooled["neg"]).abs().max() > 0.1 and pooled["pos"].abs().mean() > 0.1
    for y in cap.ys:  # every row's first 1280 values are the positive's or the negative's CLIP-G pooled
        for row in y:
            assert any(torch.allclose(row[:POOLED].float(), p, atol=1e-6) for p in pooled.values())
    rows = torch.cat(cap.ys)[:, :POOLED].float()
    for p in pooled.values():
        assert any(torch.allclose(r, p, atol=1e-6) for r in rows)
    # only the pooled vector changed (CLIP context and LLM features kept): the image changes
    swapped = [[pos[0][0], {**pos[0][1], "pooled_output": other[0][1]["pooled_output"]}]]
    assert (sample(patched, swapped, neg) - out).abs().max() > 1e-4
    # only the CLIP text changed (same LLM features): the image changes
    clip_only = [[other[0][0], {**pos[0][1], "pooled_output": other[0][1]["pooled_output"]}]]
    assert (sample(patched, clip_only, neg) - out).abs().max() > 1e-4


# --- training -----------------------------------------------------------------------------------------

def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_sdxl_hybrid_trains_with_the_sdxl_clip_and_size_conditioning(tmp_path: Path, clip, model_folders):
    data = write_folder(tmp_path / "data", make_images(2, size=40))
    loaded = load_llm(str(model_folders / "LLM" / "tiny-llama"), dtype=torch.float32)
    comps = runner.Components(tiny_sdxl(), clip, tiny_vae(), loaded, "tiny_sdxl", "tiny-llama")
    opts = TrainOptions(base_model="", llm="tiny-llama", data=str(data), output_dir=str(tmp_path / "out"),
                        original_path="clip", resolution=32, batch_size=2, max_steps=2, lr=2e-3, warmup_steps=0,
                        num_workers=0, mixed_precision="no", progress=False, tensorboard=False, log_every=1,
                        checkpoint_every=0, max_tokens=16, seed=0, caption_dropout=0.0)
    unet_before = state(comps.model_patcher.model)
    clip_before = state(clip.cond_stage_model)
    fresh = runner.build_adapter(opts, comps, torch.device("cpu"))
    with CaptureY(comps.model_patcher) as cap:
        assert runner.run_with(opts, comps) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    trained = load_adapter(tmp_path / "out" / opts.export_name)
    assert trained.config.base == "sdxl" and trained.config.original_path == "clip"
    assert len(trained.config.sites) == 70 and trained.phi is None and trained.phi_pool is None
    changed = {k for k, v in trained.state_dict().items() if not torch.equal(v, fresh.state_dict()[k].cpu())}
    for key in ("a_new", "a_orig", "encoder.norm.weight", "sites.0.to_k.weight", "sites.69.to_q.weight"):
        assert key in changed, key
    for k, v in state(comps.model_patcher.model).items():
        assert torch.equal(v, unet_before[k]), ("unet", k)
    for k, v in state(clip.cond_stage_model).items():
        assert torch.equal(v, clip_before[k]), ("clip", k)
    # the U-Net saw y = [CLIP-G pooled of the caption | size embeddings]
    pooled = [clip.encode_from_tokens(clip.tokenize(c), return_pooled=True)[1][0] for c in CAPTIONS[:2]]
    assert (pooled[0] - pooled[1]).abs().max() > 0.1 and min(p.abs().mean() for p in pooled) > 0.1
    ys = torch.cat(cap.ys)
    assert ys.shape[-1] == 2816
    for row in ys:
        assert any(torch.allclose(row[:POOLED].float(), p.float(), atol=1e-5) for p in pooled)
    assert ys[:, POOLED:].abs().max() > 0  # size / crop / target embeddings


def test_sdxl_size_conditioning_passes_each_image_s_size_and_crop_by_name():
    """Non-square sizes (the test run above trains on squares, where height and width could be swapped unseen):
    y is the pooled vector + ComfyUI's own embedding of (original height, width, crop top, left, target)."""
    from llmdiff_core.training.encoders import Conditioning
    from llmdiff_core.training.loop import sdxl_adm

    model = tiny_sdxl().model
    pooled = torch.randn(2, POOLED, generator=torch.Generator().manual_seed(0))
    sizes = [(100, 150, 3, 20), (64, 48, 0, 7)]  # (original height, original width, crop top, crop left)
    cond = Conditioning(["a", "b"], torch.zeros(2, 4, 4, 4), None, None, pooled, sizes)
    y = sdxl_adm(model, cond)
    for i, (h, w, top, left) in enumerate(sizes):
        want = model.encode_adm(pooled_output=pooled[i:i + 1], height=h, width=w, crop_h=top, crop_w=left,
                                target_height=32, target_width=32)
        assert torch.equal(y[i:i + 1], want), i
    assert not torch.equal(y[0], sdxl_adm(model, Conditioning(["a"], torch.zeros(1, 4, 4, 4), None, None, pooled[:1],
                                                               [(150, 100, 20, 3)]))[0])
    # the target is the batch's size (its aspect-ratio bucket): from its latents, height and width by name
    wide = sdxl_adm(model, Conditioning(["a"], torch.zeros(1, 4, 4, 6), None, None, pooled[:1], sizes[:1]))
    assert torch.equal(wide, model.encode_adm(pooled_output=pooled[:1], height=100, width=150, crop_h=3, crop_w=20,
                                              target_height=32, target_width=48))
    assert not torch.equal(wide, model.encode_adm(pooled_output=pooled[:1], height=100, width=150, crop_h=3,
                                                  crop_w=20, target_height=48, target_width=32))
