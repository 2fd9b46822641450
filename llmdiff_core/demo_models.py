"""Stand-in model files, so that every example workflow in workflows/ runs end to end offline.

    python -m llmdiff_core.demo_models COMFY_ROOT [--force] [--models-dir DIR] [--no-sdxl]

(run from the repository root; `./run.sh --demo` does it for you). Writes, under COMFY_ROOT/models
(or --models-dir), only the files that are absent (--force rewrites them):

    checkpoints/llmdiff_demo_sd15.safetensors      SD1.5-format checkpoint: U-Net + CLIP-L + VAE (~640 MB)
    checkpoints/llmdiff_demo_sdxl.safetensors      SDXL-format checkpoint: U-Net + VAE, no CLIP (~730 MB)
    LLM/llmdiff-demo-llama/                        tiny Llama-style LLM, real Llama-3 tokenizer (~50 MB)
    llmdiff/llmdiff_demo_sd15_paper.safetensors    adapter, paper mode (CLIP unused)     for sd15 + LLM
    llmdiff/llmdiff_demo_sd15_hybrid.safetensors   adapter, hybrid mode (CLIP kept)      for sd15 + LLM
    llmdiff/llmdiff_demo_sdxl_paper.safetensors    adapter, paper mode                   for sdxl + LLM

**These are random weights: every image they make is noise, not art.** They exist so that the
workflows, the nodes and ComfyUI's own loaders can be tried and tested without downloading
gigabytes. For real pictures put real files in the same folders and pick them in the loader
nodes (see docs/demo.md): an SD1.5 or SDXL checkpoint in models/checkpoints/, a Hugging Face LLM
folder (config.json, tokenizer, *.safetensors) in models/LLM/, and an adapter trained for exactly
that checkpoint family + LLM in models/llmdiff/. A demo adapter does not fit a real checkpoint (the
adapter loader says so): the demo U-Nets are narrower than the real ones.

How the stand-ins are made, and why they look the way they do:
- The checkpoints are built from ComfyUI's own model classes (supported_models.SD15 / SDXL,
  sd1_clip.SD1ClipModel, the AutoencoderKL VAE) and saved with the same key conversion ComfyUI's
  "Save Checkpoint" uses (BaseModel.state_dict_for_saving), in fp16. CheckpointLoaderSimple
  detects them with its real model detection: that needs model_channels 320 and context width
  768 (SD1.5) / 2048 + transformer depths [0,0,2,2,10,10] (SDXL). Every other width is shrunk by
  channel_mult = 1 at all levels, which keeps the real block layout and so the real
  cross-attention sites: SD1.5 16 (input 1,2,4,5,7,8 / middle 0 / output 3-11), SDXL 70.
  U-Nets: SD1.5 111.5M parameters (real: 860M), SDXL 283M (real: 2.6B). Sampling 64x64 on a CPU
  takes seconds.
- CLIP-L is full size (123M): ComfyUI builds the SD1.5 text encoder from a fixed config, not from
  the checkpoint, so a smaller one would not load. The SDXL stand-in has no text encoders (CLIP-L
  + CLIP-G would add 820M parameters): its workflow uses a paper-mode adapter, which replaces CLIP
  (context and pooled vector) by the LLM, so no CLIP is needed. CheckpointLoaderSimple logs
  "no CLIP/text encoder weights in checkpoint" for it; that is expected.
- The LLM is a LlamaForCausalLM with hidden size 64 and 4 blocks; its tokenizer is the real
  Llama-3 BPE that ships inside ComfyUI (comfy/text_encoders/llama_tokenizer), so prompts are
  tokenized exactly as a Llama-3 model would tokenize them.
- The adapters are made for these U-Nets and this LLM; tau_q starts from each site's frozen q
  projection and the fusion weights are set to smooth, non-zero values, so the LLM path really
  acts and the "inspect adapter" plot shows something.
All weights come from fixed seeds: the same ComfyUI + torch versions write the same files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic_files import replacing, write_safetensors

log = logging.getLogger("llmdiff.demo")

# --- names the example workflows expect ------------------------------------------------------------
SD15_CHECKPOINT = "llmdiff_demo_sd15.safetensors"
SDXL_CHECKPOINT = "llmdiff_demo_sdxl.safetensors"
LLM_FOLDER = "llmdiff-demo-llama"
SD15_PAPER_ADAPTER = "llmdiff_demo_sd15_paper.safetensors"
SD15_HYBRID_ADAPTER = "llmdiff_demo_sd15_hybrid.safetensors"
SDXL_PAPER_ADAPTER = "llmdiff_demo_sdxl_paper.safetensors"

DEMO_NOTE = "ComfyUI-LLMDiff demo stand-in: random weights, produces noise, not art"
SEED = 20240214  # every random draw below derives from this

# LLM shape (hidden 64, 4 blocks, GQA like Llama 3); vocab covers the Llama-3 tokenizer's 128259 ids
LLM_HIDDEN, LLM_LAYERS, LLM_HEADS, LLM_KV_HEADS, LLM_FF = 64, 4, 4, 2, 176
LLM_VOCAB = 128320  # len(tokenizer) = 128259, rounded up to a multiple of 64

# U-Net configs: ComfyUI's SD15 / SDXL dicts (comfy/model_detection.py, unet_config_from_diffusers_unet)
# with channel_mult 1 at every level; everything detection reads is left as in the real models.
_UNET_COMMON: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "in_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "model_channels": 320, "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD15_UNET: dict[str, Any] = {
    **_UNET_COMMON, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 1, 1, 1],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8,
}
SDXL_UNET: dict[str, Any] = {
    **_UNET_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 1, 1], "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64,
}
# The SD VAE (same architecture for SD1.5 and SDXL); comfy.sd.VAE builds exactly this for these keys.
VAE_DDCONFIG: dict[str, Any] = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}


@dataclass(frozen=True)
class DemoFile:
    folder: str  # ComfyUI model folder name (subfolder of models/)
    name: str  # file name, or folder name for the LLM
    what: str

    def path(self, models_dir: Path) -> Path:
        return models_dir / self.folder / self.name


DEMO_FILES: dict[str, DemoFile] = {
    "sd15": DemoFile("checkpoints", SD15_CHECKPOINT, "SD1.5-format checkpoint (U-Net, CLIP-L, VAE)"),
    "sdxl": DemoFile("checkpoints", SDXL_CHECKPOINT, "SDXL-format checkpoint (U-Net, VAE; no CLIP)"),
    "llm": DemoFile("LLM", LLM_FOLDER, "Llama-style LLM folder with the Llama-3 tokenizer"),
    "sd15_paper": DemoFile("llmdiff", SD15_PAPER_ADAPTER, "adapter: SD1.5 demo + demo LLM, paper mode"),
    "sd15_hybrid": DemoFile("llmdiff", SD15_HYBRID_ADAPTER, "adapter: SD1.5 demo + demo LLM, hybrid mode"),
    "sdxl_paper": DemoFile("llmdiff", SDXL_PAPER_ADAPTER, "adapter: SDXL demo + demo LLM, paper mode"),
}
SDXL_KEYS = ("sdxl", "sdxl_paper")


# --- ComfyUI access ---------------------------------------------------------------------------------
def ensure_comfy_importable(comfy_root: str | os.PathLike[str] | None) -> None:
    """Make `import comfy` work (CPU mode) unless this process already runs inside ComfyUI."""
    if "comfy" in sys.modules:
        return
    if comfy_root is None:
        raise RuntimeError("ComfyUI is not imported and no ComfyUI root was given")
    root = str(Path(comfy_root).resolve())
    if not (Path(root) / "comfy").is_dir():
        raise SystemExit(f"demo_models: {root} is not a ComfyUI root (no comfy/ folder in it)")
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args  # parses [] when imported as a library

    args.cpu = True  # generation runs on the CPU; must be set before comfy.model_management loads


# --- deterministic random weights ---------------------------------------------------------------
def _seed_for(tag: str) -> int:
    return SEED + sum(ord(c) * 131 ** i for i, c in enumerate(tag)) % 1_000_003


def randomize_(module: nn.Module, tag: str, matrix_gain: float = 1.0) -> None:
    """Seeded random values on every parameter (ComfyUI's ops leave weights uninitialised).

    Matrices get a variance-preserving scale (1/sqrt(fan_in)), norm gains ~1, biases ~0: activations
    stay bounded through deep stacks, so the stand-ins never produce NaN or Inf.
    """
    gen = torch.Generator().manual_seed(_seed_for(tag))
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(noise * (matrix_gain / p[0].numel() ** 0.5))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.05 * noise)
            else:
                p.copy_(0.02 * noise)


# --- checkpoints -------------------------------------------------------------------------------------
def _model_config(family: str) -> Any:
    import comfy.supported_models

    cls, unet = (comfy.supported_models.SD15, SD15_UNET) if family == "sd15" else (comfy.supported_models.SDXL, SDXL_UNET)
    config = cls(dict(unet))
    config.unet_config.update(unet)  # SDXL's extra config must not override the head width above
    config.set_inference_dtype(torch.float32, None)
    return config


@contextmanager
def _quiet_comfy() -> Iterator[None]:
    """ComfyUI logs every model it builds at INFO; keep the demo's own output readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def build_unet_model(family: str) -> Any:
    """The demo U-Net as a comfy BaseModel / SDXL, float32 on the CPU, seeded weights."""
    with _quiet_comfy():
        model = _model_config(family).get_model({}, "", device=torch.device("cpu"))
    randomize_(model.diffusion_model, f"{family}-unet")
    return model


def _clip_l_state_dict(model_config: Any) -> dict[str, torch.Tensor]:
    target = model_config.clip_target()
    with _quiet_comfy():
        clip = target.clip(**target.params, device=torch.device("cpu"), dtype=torch.float32, model_options={})
    randomize_(clip, "sd15-clip-l")
    return clip.state_dict()


def _vae_state_dict(tag: str) -> dict[str, torch.Tensor]:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    vae = AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=VAE_DDCONFIG["z_channels"])
    randomize_(vae, tag)
    return vae.state_dict()


def write_checkpoint(family: str, path: Path, model: Any | None = None) -> Path:
    """Save the demo checkpoint of `family` ("sd15" | "sdxl") with ComfyUI's own key conversion."""
    model = model if model is not None else build_unet_model(family)
    clip_sd = _clip_l_state_dict(model.model_config) if family == "sd15" else None
    vae_sd = _vae_state_dict(f"{family}-vae")
    sd = model.state_dict_for_saving(clip_sd, vae_sd)
    sd = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    metadata = {"llmdiff_demo": DEMO_NOTE, "modelspec.architecture":
                "stable-diffusion-v1" if family == "sd15" else "stable-diffusion-xl-v1-base"}
    write_safetensors(path, sd, metadata)
    return path


# --- LLM -----------------------------------------------------------------------------------------------
def llama3_tokenizer_dir() -> Path:
    import comfy.utils  # `comfy` itself is a namespace package (no __file__)

    return Path(comfy.utils.__file__).resolve().parent / "text_encoders" / "llama_tokenizer"


def write_llm(folder: Path) -> Path:
    """A tiny random LlamaForCausalLM + the Llama-3 tokenizer from ComfyUI's tree, as a HF folder."""
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    transformers.logging.set_verbosity_error()  # the shipped tokenizer_config names a slow class: harmless
    transformers.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir()), local_files_only=True)
    if len(tokenizer) > LLM_VOCAB:
        raise RuntimeError(f"the Llama-3 tokenizer has {len(tokenizer)} tokens, more than LLM_VOCAB={LLM_VOCAB}")
    config = LlamaConfig(
        vocab_size=LLM_VOCAB, hidden_size=LLM_HIDDEN, intermediate_size=LLM_FF, num_hidden_layers=LLM_LAYERS,
        num_attention_heads=LLM_HEADS, num_key_value_heads=LLM_KV_HEADS, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(_seed_for("llm"))
    model = LlamaForCausalLM(config)
    # HF's init (std 0.02) makes each block's residual update ~0; larger weights give the
    # per-block context contributions (the "scores") a visible size.
    randomize_(model, "llm", matrix_gain=2.0)

    with replacing(folder) as tmp:
        tmp.unlink()
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _tidy_tokenizer_config(tmp / "tokenizer_config.json")
        (tmp / "README.md").write_text(
            f"# {LLM_FOLDER}\n\n{DEMO_NOTE}.\n\nA {LLM_LAYERS}-block LlamaForCausalLM (hidden size {LLM_HIDDEN}) with "
            "random weights and the real Llama-3 tokenizer, written by `python -m llmdiff_core.demo_models`.\n"
            "Replace it with a real Hugging Face LLM folder and an adapter trained for that LLM.\n")
        if folder.exists():  # (the old one stays until the new one is complete)
            shutil.rmtree(folder)
    return folder


def _tidy_tokenizer_config(path: Path) -> None:
    """Drop what describes the source folder rather than the tokenizer: ComfyUI's copy names a
    LlavaProcessor, and transformers records how it was loaded (is_local, local_files_only)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("processor_class", "is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def demo_llm_spec() -> Any:
    from .features import LLMSpec

    return LLMSpec(family="llama", name=LLM_FOLDER, hidden_size=LLM_HIDDEN, num_layers=LLM_LAYERS)


# --- adapters ----------------------------------------------------------------------------------------
def make_demo_adapter(model: Any, original_path: str, tag: str) -> Any:
    """An adapter for `model` (a comfy BaseModel/SDXL) + the demo LLM with smooth, non-zero gates."""
    from .adapter import LLMDiffAdapter
    from .config import AdapterConfig
    from .unet_sites import base_family, find_sites

    sites, attn2 = find_sites(model.diffusion_model)
    config = AdapterConfig(base=base_family(model), sites=sites, llm=demo_llm_spec(), original_path=original_path,
                           training={"demo": DEMO_NOTE, "steps": 0})
    adapter = LLMDiffAdapter(config)
    with torch.random.fork_rng(devices=[]):  # reset_parameters draws from the global RNG
        torch.manual_seed(_seed_for(tag))
        adapter.reset_parameters([m.to_q.weight for m in attn2])
    gen = torch.Generator().manual_seed(_seed_for(tag + "-gates"))
    n, layers = len(sites), config.llm.num_layers
    depth = torch.linspace(0.0, 1.0, n)
    with torch.no_grad():
        # A shape like the paper's Figure 5: the LLM path weighs more in the middle of the U-Net.
        bump = torch.exp(-((depth - 0.5) ** 2) / 0.08)
        adapter.a_orig.copy_(1.0 - 0.3 * bump + 0.05 * torch.randn(n, generator=gen))
        adapter.a_new.copy_(0.3 + 0.5 * bump + 0.05 * torch.randn(n, generator=gen))
        adapter.encoder.gate.copy_(torch.linspace(0.6, 1.2, layers) + 0.05 * torch.randn(layers, generator=gen))
        for proj in (adapter.phi, adapter.phi_pool):
            if proj is not None:
                randomize_(proj, tag + "-" + ("phi" if proj is adapter.phi else "phi_pool"))
    return adapter


def write_adapter(model: Any, original_path: str, path: Path, tag: str) -> Path:
    from .adapter_file import save_adapter

    return save_adapter(make_demo_adapter(model, original_path, tag), path)


# --- the whole set -------------------------------------------------------------------------------------
def missing_files(models_dir: Path, keys: list[str] | None = None) -> list[str]:
    return [k for k in (keys or list(DEMO_FILES)) if not DEMO_FILES[k].path(models_dir).exists()]


def create_demo_models(models_dir: str | os.PathLike[str], force: bool = False, include_sdxl: bool = True,
                       comfy_root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Write the demo files that are absent (all of them with force=True). Returns what was written."""
    ensure_comfy_importable(comfy_root)
    models_dir = Path(models_dir)
    keys = [k for k in DEMO_FILES if include_sdxl or k not in SDXL_KEYS]
    todo = keys if force else missing_files(models_dir, keys)
    written: list[Path] = []

    def step(key: str, make: Callable[[Path], Path]) -> None:
        if key in todo:
            t0 = time.monotonic()
            path = make(DEMO_FILES[key].path(models_dir))
            written.append(path)
            log.warning("demo_models: wrote %s (%s) in %.1f s", path, DEMO_FILES[key].what, time.monotonic() - t0)

    step("llm", write_llm)
    for family, adapters in (("sd15", (("sd15_paper", "llm"), ("sd15_hybrid", "clip"))),
                             ("sdxl", (("sdxl_paper", "llm"),))):
        if family not in keys or not any(k in todo for k in (family, *(a for a, _ in adapters))):
            continue
        model = build_unet_model(family)  # deterministic: adapters match a checkpoint written earlier
        step(family, lambda p, f=family, m=model: write_checkpoint(f, p, m))
        for key, mode in adapters:
            step(key, lambda p, m=model, mode=mode, key=key: write_adapter(m, mode, p, key))
        del model
    return written


def describe(models_dir: Path) -> str:
    lines = [f"  {'ok ' if d.path(models_dir).exists() else '-- '} {d.folder}/{d.name}: {d.what}"
             for d in DEMO_FILES.values()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmdiff_core.demo_models",
        description="Write random-weight stand-in models (noise, not art) under COMFY_ROOT/models so the "
                    "example workflows run. Existing files are left alone unless --force.")
    parser.add_argument("comfy_root", help="ComfyUI root (the folder with main.py and comfy/)")
    parser.add_argument("--models-dir", help="model folder to fill (default: COMFY_ROOT/models)")
    parser.add_argument("--force", action="store_true", help="rewrite the demo files even if they exist")
    parser.add_argument("--no-sdxl", action="store_true", help="skip the SDXL stand-in and its adapter (~730 MB)")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    models_dir = Path(ns.models_dir) if ns.models_dir else Path(ns.comfy_root) / "models"
    t0 = time.monotonic()
    written = create_demo_models(models_dir, force=ns.force, include_sdxl=not ns.no_sdxl, comfy_root=ns.comfy_root)
    print(f"demo_models: {len(written)} file(s) written in {time.monotonic() - t0:.0f} s under {models_dir}:")
    print(describe(models_dir))
    print("demo_models: these stand-ins have random weights: they make noise, not art. "
          "See docs/demo.md to use real models.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
