"""Training options: one dataclass is the single source of flags, YAML keys, defaults and help.

Precedence: command-line flag > YAML file (--config) > the defaults below. YAML keys are the
option names with '_' or '-' (base_model or base-model); an unknown key is an error, not ignored,
so a typo cannot silently train with a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import C0_MODES, ORIGINAL_PATH_MODES
from .sdpa_backends import parse_backends


def _opt(default: Any, help: str, *, choices: Sequence[Any] | None = None, group: str = "training",
         metavar: str | None = None, required: bool = False) -> Any:
    meta = {"help": help, "choices": choices, "group": group, "metavar": metavar, "required": required}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainOptions:
    # --- models ---------------------------------------------------------------------------------
    base_model: str = _opt("", "SD1.5 or SDXL single-file checkpoint (.safetensors), loaded by ComfyUI's own "
                           "checkpoint loader so the trained layers map 1:1 onto what the nodes patch",
                           group="models", metavar="FILE", required=True)
    llm: str = _opt("", "Hugging Face LLM folder (config.json, tokenizer, *.safetensors); local files only",
                    group="models", metavar="DIR", required=True)
    llm_dtype: str = _opt("auto", "LLM weight dtype; auto = bf16 on GPUs that do it well, else fp16 on GPU, "
                          "fp32 on CPU", choices=("auto", "bf16", "fp16", "fp32"), group="models")
    trust_remote_code: bool = _opt(False, "allow the LLM folder's own Python code (only for folders you trust)",
                                   group="models")
    comfyui_root: str = _opt(os.environ.get("LLMDIFF_COMFYUI_ROOT", ""),
                             "ComfyUI folder (the one with main.py and comfy/); default $LLMDIFF_COMFYUI_ROOT",
                             group="models", metavar="DIR")
    # --- adapter --------------------------------------------------------------------------------
    encoding: str = _opt("score", "text encoding: score (the paper's, all layers), last, mean or layer:k",
                         group="adapter")
    original_path: str = _opt("clip", "context of the frozen original cross-attention: clip = hybrid (CLIP "
                              "conditioning kept, LoRA trigger words work), llm = the paper (phi(c), CLIP unused)",
                              choices=ORIGINAL_PATH_MODES, group="adapter")
    c0: str = _opt("embeddings", "c_0 of the score encoding: the token embeddings H_0 or zeros", choices=C0_MODES,
                   group="adapter")
    gate_init: float = _opt(1.0, "initial per-LLM-layer weight g_l", group="adapter")
    rho_init: float = _opt(-9.0, "initial rho_l; Langevin noise scale h_l = softplus(rho_l)", group="adapter")
    langevin_noise: bool = _opt(True, "add the score encoding's Langevin noise sqrt(2 h_l) eps while training "
                                "(never at inference)", group="adapter")
    init_adapter: str = _opt("", "start from this adapter .safetensors instead of a fresh one (fine-tuning)",
                             group="adapter", metavar="FILE")
    max_tokens: int = _opt(128, "LLM token bucket per caption, BOS included (the nodes' max_tokens)", group="adapter")
    clip_stop_at_layer: int = _opt(0, "CLIP's last layer as ComfyUI's 'CLIP Set Last Layer' node sets it (-1 the last, "
                                   "-2 the one before: 'clip skip 2'); 0 = the checkpoint's own, as in a graph without "
                                   "that node. Hybrid mode: train with what your graphs use", group="adapter")
    # --- data -----------------------------------------------------------------------------------
    data: str = _opt("", "dataset: a folder of images with same-name .txt captions, a .jsonl or .csv manifest, "
                     "a .tar shard, a folder of .tar shards, or a shard pattern like 'shards/{000..099}.tar'",
                     group="data", metavar="PATH", required=True)
    data_format: str = _opt("auto", "dataset format; auto guesses from the path",
                            choices=("auto", "folder", "jsonl", "csv", "tar"), group="data")
    image_root: str = _opt("", "folder that relative image paths in a manifest start from (default: the "
                           "manifest's folder)", group="data", metavar="DIR")
    image_column: str = _opt("", "manifest field with the image path (default: first of image, file_name, "
                             "image_file, path, file)", group="data")
    caption_column: str = _opt("", "manifest / tar .json field with the caption (default: first of caption, "
                               "text, prompt)", group="data")
    resolution: int = _opt(0, "training resolution in pixels (square); 0 = 512 for SD1.5, 1024 for SDXL",
                           group="data")
    crop: str = _opt("center", "how an image is cropped to the resolution's square (or its --aspect-buckets size) "
                     "after resizing it to cover it", choices=("center", "random"), group="data")
    aspect_buckets: bool = _opt(False, "train each image at about its own aspect ratio instead of a square crop: it "
                                "goes to the nearest of a set of sizes of at most --resolution squared pixels "
                                "(multiples of --bucket-step, out to --bucket-max-ratio : 1 either way), is resized "
                                "to cover it and cropped to it (--crop), and a micro-batch holds one size; SDXL's "
                                "size conditioning gets that size as its target. The sizes are logged at the start",
                                group="data")
    bucket_step: int = _opt(64, "with --aspect-buckets: the bucket sizes are multiples of this many pixels "
                            "(a multiple of 8 that divides the resolution)", group="data")
    bucket_max_ratio: float = _opt(2.0, "with --aspect-buckets: the most elongated bucket's long side over its "
                                   "short side (images more elongated go to it, and are cropped)", group="data")
    shuffle: bool = _opt(True, "shuffle the data each epoch (seeded)", group="data")
    shuffle_buffer: int = _opt(1000, ".tar shards: size of the streaming shuffle buffer", group="data")
    num_workers: int = _opt(2, "data-loading worker processes per training process (0 = in process)", group="data")
    prefetch: bool = _opt(True, "with a feature cache: prepare the next batch (cache read, collate, noise draws) in a "
                          "background thread while the device trains on the current one", group="data")
    prefetch_batches: int = _opt(2, "with --prefetch: batches prepared ahead, side by side in as many threads (each "
                                 "holds one more batch in page-locked host memory and on the device; 1 = one "
                                 "thread)", group="data", metavar="N")
    caption_dropout: float = _opt(0.1, "fraction of captions replaced by the empty prompt (for classifier-free "
                                  "guidance); the empty prompt goes through the same encoder path as a "
                                  "negative prompt in the nodes", group="data")
    # --- feature cache --------------------------------------------------------------------------
    cache_dir: str = _opt("", "feature cache folder: VAE latents and LLM (and CLIP) features are computed once "
                          "in a resumable pre-pass, then epochs touch neither the VAE nor the LLM",
                          group="cache", metavar="DIR")
    cache_only: bool = _opt(False, "build (or finish) the feature cache, then exit", group="cache")
    cache_dtype: str = _opt("bf16", "dtype of cached LLM features (latents are always fp32)",
                            choices=("bf16", "fp16", "fp32"), group="cache")
    cache_shard_size: int = _opt(256, "samples per cache shard file", group="cache")
    cache_batch_size: int = _opt(16, "images / captions encoded at once while building the cache", group="cache")
    # --- optimisation ---------------------------------------------------------------------------
    max_steps: int = _opt(10000, "optimizer steps to train")
    batch_size: int = _opt(4, "samples per process per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step (global batch = batch_size x processes x grad_accum)")
    lr: float = _opt(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.01, "AdamW weight decay (not applied to gates, norms and biases)")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    warmup_steps: int = _opt(500, "linear warm-up steps")
    lr_schedule: str = _opt("cosine", "after warm-up: cosine decay to min_lr_ratio x lr, or constant",
                            choices=("cosine", "constant"))
    min_lr_ratio: float = _opt(0.0, "cosine schedule floor as a fraction of lr")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = off)")
    mixed_precision: str = _opt("auto", "autocast precision; auto = bf16 where supported, else no (fp32); "
                                "fp16 uses loss scaling", choices=("auto", "no", "fp16", "bf16"))
    unet_dtype: str = _opt("auto", "dtype of the frozen U-Net weights; auto = the mixed-precision dtype (a U-Net in "
                           "that dtype then computes as when sampling, outside autocast; fp32 keeps it under autocast)",
                           choices=("auto", "fp32", "fp16", "bf16"))
    gradient_checkpointing: bool = _opt(False, "recompute U-Net activations in the backward pass (less memory, "
                                        "~30%% slower)")
    channels_last: bool = _opt(False, "keep the frozen U-Net and its input in channels-last memory format "
                               "(faster convolutions on recent NVIDIA GPUs; measure with bench/training_throughput.py)")
    unet_fp8: bool = _opt(False, "run the frozen U-Net's linear layers as float8 GEMMs (weights cast once, activations "
                          "per call, no weight gradients) on GPUs of compute capability 8.9+ (Ada, Hopper), whose "
                          "float8 GEMMs have twice the bf16 rate; trains at float8's precision; convolutions and "
                          "attention keep the U-Net's dtype. Use it with --compile-unet: eager, each GEMM's scaling "
                          "and casts make it slower than bf16. Measure the speed-up on your GPU with "
                          "bench/training_throughput.py --unet-fp8")
    compile_unet: str = _opt("", "torch.compile the frozen U-Net with the adapter's patches traced into it, with this "
                             "backend (inductor on a GPU; the first steps compile); empty = eager", metavar="BACKEND")
    compile_mode: str = _opt("", "torch.compile mode with --compile-unet (e.g. max-autotune-no-cudagraphs); "
                             "empty = the default")
    compile_whole_bucket: bool = _opt(True, "with --compile-unet: attend over every batch's whole --max-tokens "
                                      "bucket, not only up to its captions' span, so the compiled U-Net sees one "
                                      "static key length and compiles once, for a little more work per step (the "
                                      "keys past the span are masked zero padding: the same training). "
                                      "--no-compile-whole-bucket attends up to each batch's span: a static graph, "
                                      "then one with the key length dynamic, which inductor on the CPU (torch "
                                      "2.13) compiled wrongly: it failed at the third span length "
                                      "(docs/benchmarks.md §3m)")
    compile_projections: bool = _opt(True, "with --compile-unet: compile every site's K/V projection of the adapter "
                                     "too (graphs of their own, forward and backward), so a step dispatches a "
                                     "few calls for them instead of hundreds (SDXL: 70 sites); "
                                     "--no-compile-projections runs them eagerly")
    cudnn_benchmark: bool = _opt(True, "CUDA: let cuDNN time its convolution algorithms for the U-Net's shapes in the "
                                 "first steps and keep the fastest (once per image size: the resolution, or each "
                                 "bucket); off = cuDNN's heuristic choice")
    sdpa_backends: str = _opt("", "the torch SDPA kernels the U-Net's and the adapter's attention may use, fastest "
                              "first: a comma list of flash, cudnn, efficient, math (math is kept as the last "
                              "resort); empty = torch's own choice. Measure with bench/training_throughput.py "
                              "--sdpa-backends", metavar="LIST")
    ema_decay: float = _opt(0.0, "EMA of the adapter weights (e.g. 0.999; 0 = off); the export uses the EMA")
    min_snr_gamma: float = _opt(0.0, "min-SNR loss weighting gamma (e.g. 5; 0 = off)")
    noise_offset: float = _opt(0.0, "offset noise strength (0 = off)")
    seed: int = _opt(0, "seed for initialisation, data order, noise and caption dropout")
    # --- checkpoints and output -----------------------------------------------------------------
    output_dir: str = _opt("llmdiff-run", "where checkpoints, logs, validation images and the export go",
                           group="output", metavar="DIR")
    export_name: str = _opt("llmdiff_adapter.safetensors", "file name of the final adapter in output_dir "
                            "(copy it to ComfyUI/models/llmdiff/)", group="output")
    checkpoint_every: int = _opt(1000, "write a checkpoint every N optimizer steps (0 = only at the end)",
                                 group="output")
    keep_checkpoints: int = _opt(3, "keep the last N checkpoints (0 = keep all)", group="output")
    resume: str = _opt("", "resume from a checkpoint folder, or 'latest' for the newest one in output_dir",
                       group="output", metavar="DIR|latest")
    log_every: int = _opt(10, "log loss and learning rate every N optimizer steps", group="output")
    tensorboard: bool = _opt(True, "write TensorBoard logs to output_dir/tensorboard (needs the tensorboard "
                             "package; without it only the JSONL log is written)", group="output")
    progress: bool = _opt(True, "show a progress bar (main process only)", group="output")
    # --- validation images ----------------------------------------------------------------------
    validate_every: int = _opt(0, "sample validation images every N optimizer steps (0 = off; also done at the "
                               "end when validation prompts are set)", group="validation")
    validation_prompts: list[str] = _opt([], "fixed prompts for validation images (repeat the "
                                         "flag, or a YAML list)", group="validation")
    validation_negative: str = _opt("", "negative prompt for validation images", group="validation")
    validation_steps: int = _opt(20, "sampler steps for validation images", group="validation")
    validation_cfg: float = _opt(7.0, "CFG scale for validation images", group="validation")
    validation_sampler: str = _opt("euler", "ComfyUI sampler name for validation images", group="validation")
    validation_scheduler: str = _opt("normal", "ComfyUI scheduler name for validation images", group="validation")
    validation_size: str = _opt("", "validation image size in pixels: N for a square, or WIDTHxHEIGHT (e.g. 1216x832, "
                                "an --aspect-buckets size), multiples of 8; empty = the training resolution's square",
                                group="validation", metavar="N|WxH")
    validation_seed: int = _opt(0, "noise seed for validation images (the same every time)", group="validation")
    # --- debugging ------------------------------------------------------------------------------
    debug_nan_at_step: int = _opt(0, "testing aid: make the loss NaN at this optimizer step (0 = off)",
                                  group="debugging")
    config: str = _opt("", "YAML file with any of these options (flags given here win)", group="general",
                       metavar="FILE")

    # helpers
    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_GROUPS = {"models": "models", "adapter": "adapter (fixed at training time, stored in the file)",
           "data": "data", "cache": "feature cache", "training": "optimisation", "output": "checkpoints and output",
           "validation": "validation images", "debugging": "debugging", "general": "general"}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, empty ones as 'none'."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in ("", None) and action.option_strings and action.nargs != 0:
            return (action.help or "") + " (default: none)"
        return super()._get_help_string(action) or ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train an LLMDiff adapter (the U-Net, VAE and LLM stay frozen). Runs as `python "
                    "llmdiff_core/train.py ...` on one device or `accelerate launch llmdiff_core/train.py ...` "
                    "on several. Every option can also be set in a YAML file given with --config.",
        formatter_class=_HelpFormatter)
    groups = {k: parser.add_argument_group(v) for k, v in _GROUPS.items()}
    for f in dataclasses.fields(TrainOptions):
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        default = _default_of(f)
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"], "default": default}
        if meta.get("required"):
            kwargs["help"] += " (required)"
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kwargs["action"] = "append"
            kwargs["default"] = None  # append would add to the default list
            kwargs["metavar"] = "TEXT"
        else:
            kwargs["type"] = type(default)
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        groups[meta["group"]].add_argument(flag, **kwargs)
    return parser


class OptionsError(ValueError):
    """Bad flags or YAML: the message says which option and why."""


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as e:
        raise OptionsError(f"cannot read the config file '{path}': {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise OptionsError(f"the config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise OptionsError(f"the config file '{path}' must be a mapping of option: value")
    names = {f.name: f for f in dataclasses.fields(TrainOptions)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names or name == "config":
            raise OptionsError(f"unknown option '{key}' in '{path}' (see train.py --help)")
        default = _default_of(names[name])
        if isinstance(default, list):
            value = [value] if isinstance(value, str) else list(value or [])
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise OptionsError(f"'{key}' in '{path}' must be true or false, got {value!r}")
        elif value is None:
            value = default
        else:
            try:
                value = type(default)(value)
            except (TypeError, ValueError):
                raise OptionsError(f"'{key}' in '{path}' must be a {type(default).__name__}, got {value!r}") from None
        choices = names[name].metadata.get("choices")
        if choices and value not in choices:
            raise OptionsError(f"'{key}' in '{path}' must be one of {', '.join(map(str, choices))}, got {value!r}")
        out[name] = value
    return out


def parse_options(argv: Sequence[str] | None = None) -> TrainOptions:
    """Flags > YAML > defaults. Raises OptionsError (or exits on --help / argparse errors)."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**_load_yaml(first.config))
    ns = parser.parse_args(argv)
    values = vars(ns)
    if values.get("validation_prompts") is None:
        values["validation_prompts"] = list(parser.get_default("validation_prompts") or [])
    opts = TrainOptions(**values)
    check_options(opts)
    return opts


def validation_size(opts: TrainOptions, resolution: int) -> tuple[int, int]:
    """--validation-size as (height, width): 'N', 'WxH', or empty for the resolution's square (an int N from
    a caller that builds TrainOptions itself is taken too)."""
    text = str(opts.validation_size or "").strip().lower()
    if not text or text == "0":
        return resolution, resolution
    parts = text.split("x")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise OptionsError(f"--validation-size {opts.validation_size!r}: give N (a square) or WIDTHxHEIGHT, "
                           "e.g. 1216x832")
    width, height = (int(parts[0]), int(parts[-1]))
    if not width or not height or width % 8 or height % 8:
        raise OptionsError(f"--validation-size {opts.validation_size!r}: each side must be a multiple of 8 (the VAE's "
                           "downscale factor)")
    return height, width


def check_options(opts: TrainOptions) -> None:
    missing = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainOptions)
               if f.metadata.get("required") and not getattr(opts, f.name)]
    if missing:
        raise OptionsError(f"missing required option(s): {', '.join(missing)} (flags or --config YAML)")
    positive = ("max_steps", "batch_size", "grad_accum", "max_tokens", "cache_shard_size", "cache_batch_size",
                "prefetch_batches")
    for name in positive:
        if getattr(opts, name) < 1:
            raise OptionsError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= opts.caption_dropout <= 1.0:
        raise OptionsError("--caption-dropout must be between 0 and 1")
    if not -24 <= opts.clip_stop_at_layer <= 0:
        raise OptionsError("--clip-stop-at-layer must be between -24 and -1 (as in CLIP Set Last Layer), or 0 for "
                           "the checkpoint's own")
    if not 0.0 <= opts.ema_decay < 1.0:
        raise OptionsError("--ema-decay must be in [0, 1)")
    if opts.resolution and opts.resolution % 8:
        raise OptionsError("--resolution must be a multiple of 8 (the VAE's downscale factor)")
    if opts.aspect_buckets:
        if opts.bucket_step < 8 or opts.bucket_step % 8 or (opts.resolution or 512) % opts.bucket_step:
            raise OptionsError(f"--bucket-step must be a multiple of 8 that divides the resolution "
                               f"({opts.resolution or '512 or 1024 by default'}), e.g. 64")
        if opts.bucket_max_ratio < 1.0:
            raise OptionsError("--bucket-max-ratio is the long side over the short side: at least 1 (1 = squares only)")
    validation_size(opts, 512)  # (refuses a bad value now, before any model loads)
    if opts.cache_only and not opts.cache_dir:
        raise OptionsError("--cache-only needs --cache-dir")
    try:
        parse_backends(opts.sdpa_backends)
    except ValueError as e:
        raise OptionsError(f"--sdpa-backends: {e}") from None
    if opts.compile_mode and not opts.compile_unet:
        raise OptionsError("--compile-mode needs --compile-unet BACKEND (e.g. --compile-unet inductor)")
