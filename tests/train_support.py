"""Shared builders for the training tests (no tests here): a tiny dataset in every format, a tiny
single-file checkpoint that ComfyUI's real checkpoint loader accepts, tiny in-process components.

The checkpoint: ComfyUI detects SD1.5 only at model_channels 320 / context_dim 768, so the U-Net
keeps those widths but has one level (1 res block + 1 transformer per stage: 4 cross-attention
sites, 25.8M parameters, saved in fp16: ~60 MB); the VAE is TAESD (detected by its key names) under
first_stage_model.; no CLIP, so the CLI tests train in paper mode (--original-path llm). Hybrid
(CLIP) mode is trained in process with tiny_unets.tiny_sd15 + a 64-wide CLIP.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from seeded_weights import seeded_init

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red square on blue", "a green circle", "two yellow stripes", "a purple dot in the corner",
            "a black and white checkerboard", "an orange gradient", "a cyan cross", "a pink frame"]


def make_images(n: int = 8, size: int = 40, seed: int = 0) -> list[tuple[str, bytes, str]]:
    """(key, PNG bytes, caption): simple coloured patterns that differ clearly from each other."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = rng.integers(0, 255, size=3)
        img = np.zeros((size, size + 8 * (i % 3), 3), dtype=np.uint8) + base.astype(np.uint8)
        img[i * 3 % size: i * 3 % size + 10, :, :] = 255 - base
        img[:, (i * 5) % size: (i * 5) % size + 6, i % 3] = 255
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append((f"img_{i:03d}", buf.getvalue(), CAPTIONS[i % len(CAPTIONS)]))
    return out


def make_shaped_images(sizes: list[tuple[int, int]]) -> list[tuple[str, bytes, str]]:
    """(key, PNG bytes, caption) of the given (width, height) each, every pixel different."""
    out = []
    for i, (w, h) in enumerate(sizes):
        x, y = np.meshgrid(np.arange(w), np.arange(h))
        rgb = np.stack([x * 7 + i, y * 5, (x + y + 31 * i) % 256], axis=-1) % 256
        buf = io.BytesIO()
        Image.fromarray(rgb.astype(np.uint8), "RGB").save(buf, format="PNG")
        out.append((f"img_{i:03d}", buf.getvalue(), CAPTIONS[i % len(CAPTIONS)]))
    return out


def write_folder(root: Path, samples: list[tuple[str, bytes, str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for key, png, cap in samples:
        (root / f"{key}.png").write_bytes(png)
        (root / f"{key}.txt").write_text(cap, encoding="utf-8")
    return root


def write_jsonl(root: Path, samples: list[tuple[str, bytes, str]]) -> Path:
    """Images in root/images, paths relative to it: use image_root=root/images (--image-root)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    with open(root / "train.jsonl", "w", encoding="utf-8") as fh:
        for key, png, cap in samples:
            (images / f"{key}.png").write_bytes(png)
            fh.write(json.dumps({"image": f"{key}.png", "caption": cap}) + "\n")
    return root / "train.jsonl"


def write_csv(root: Path, samples: list[tuple[str, bytes, str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "train.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file_name", "text"])
        for key, png, cap in samples:
            (root / f"{key}.png").write_bytes(png)
            w.writerow([f"{key}.png", cap])
    return root / "train.csv"


def write_tars(root: Path, samples: list[tuple[str, bytes, str]], per_shard: int = 3, json_captions: bool = False,
               caption_first: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(samples), per_shard):
        with tarfile.open(root / f"shard-{s // per_shard:03d}.tar", "w") as tf:
            for key, png, cap in samples[s:s + per_shard]:
                payload = json.dumps({"caption": cap}).encode() if json_captions else cap.encode()
                members = [(f"{key}.png", png), (f"{key}.json" if json_captions else f"{key}.txt", payload)]
                for name, data in members[::-1] if caption_first else members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return root


# --- models ---------------------------------------------------------------------------------------

CKPT_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [1], "transformer_depth": [1], "channel_mult": [1], "transformer_depth_middle": 1,
             "use_linear_in_transformer": False, "context_dim": 768, "transformer_depth_output": [1, 1],
             "use_temporal_attention": False, "use_temporal_resblock": False}


def make_checkpoint(path: Path) -> Path:
    """A single-file SD1.5 checkpoint (tiny one-level U-Net + TAESD VAE) for comfy's real loader."""
    import comfy.supported_models
    import comfy.taesd.taesd
    import safetensors.torch

    if path.exists():
        return path
    cfg = comfy.supported_models.SD15(dict(CKPT_UNET, dtype=torch.float32))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "", device="cpu")
    seeded_init(model.diffusion_model, 1234)
    sd = {"model.diffusion_model." + k: v.half() for k, v in model.diffusion_model.state_dict().items()}
    torch.manual_seed(0)
    taesd = comfy.taesd.taesd.TAESD()
    seeded_init(taesd, 99)
    sd.update({"first_stage_model." + k: v for k, v in taesd.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path))
    return path


@functools.lru_cache(maxsize=None)
def shared_assets(root: str) -> dict[str, Path]:
    """The checkpoint, a tiny LLM and the dataset formats, built once per test session."""
    from tiny_llms import make_tiny_llm

    r = Path(root)
    samples = make_images(8)
    assets = {
        "ckpt": make_checkpoint(r / "tiny_sd15.safetensors"),
        "llm": make_tiny_llm("llama", r / "tiny-llama"),
        "folder": write_folder(r / "data_folder", samples),
        "jsonl": write_jsonl(r / "data_jsonl", samples),
        "csv": write_csv(r / "data_csv", samples),
        "tar": write_tars(r / "data_tar", samples),
    }
    return assets


def tiny_clip() -> Any:
    """A 64-wide SD1 CLIP with the real tokenizer (no download), for hybrid mode in process."""
    import comfy.sd
    import comfy.sd1_clip

    clip = comfy.sd.CLIP(target=_clip_target(), model_options={"clip_l_model_config": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "projection_dim": 64}})
    seeded_init(clip.cond_stage_model, 7)
    return clip


def _clip_target() -> Any:
    import comfy.sd1_clip
    import comfy.supported_models_base

    return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)


def tiny_vae() -> Any:
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD()
    seeded_init(taesd, 99)
    return comfy.sd.VAE(sd=taesd.state_dict())


def cli_args(assets: dict[str, Path], out: Path, data: str = "folder", **extra: Any) -> list[str]:
    """Flags for a tiny CLI run (paper mode, 32 px, 2 samples per step, no workers)."""
    args = {"base-model": assets["ckpt"], "llm": assets["llm"], "data": assets[data] if data in assets else data,
            "output-dir": out, "original-path": "llm", "resolution": 32, "batch-size": 2, "max-steps": 4,
            "lr": 1e-3, "warmup-steps": 0, "num-workers": 0, "log-every": 1, "checkpoint-every": 2,
            "mixed-precision": "no", "max-tokens": 16, "seed": 0}
    args.update({k.replace("_", "-"): v for k, v in extra.items()})
    argv = []
    for k, v in args.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is False:
            argv.append(f"--no-{k}")
        elif v is not None:
            argv += [f"--{k}", str(v)]
    return argv


def run_script(argv: list[str], launcher: list[str] | None = None, timeout: int = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run llmdiff_core/train.py as a user would, from the repository root."""
    cmd = (launcher or [sys.executable]) + [str(REPO / "llmdiff_core" / "train.py")] + [str(a) for a in argv]
    full_env = dict(os.environ)
    full_env.update({"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    full_env.update(env or {})
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
