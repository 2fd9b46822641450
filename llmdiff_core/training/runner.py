"""Loads the base model through ComfyUI, the LLM, the data; builds the adapter; runs the loop; exports.

`run(opts)` is the script. `run_with(opts, components)` takes models that are already loaded (the
tests pass tiny ones); both end in the same code.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..adapter import LLMDiffAdapter
from ..config import AdapterConfig
from ..dtypes import DTYPES
from ..errors import AdapterMismatchError, LLMDiffError
from ..unet_sites import base_family, find_sites
from . import checkpointing, feature_cache, previews
from .buckets import Size, bucket_sizes, describe as describe_buckets
from .data import Position, SampleStream, StreamSpec, loader
from .sources import Source, open_source
from .encoders import Conditioning, FrozenEncoders
from .float8_linears import use_float8_linears
from .loop import Trainer, TrainingStopped, TrainModule
from .objective import prediction_type
from .options import TrainOptions
from .patching import compile_unet, enable_gradient_checkpointing, patch_for_training
from .sdpa_backends import parse_backends, use_backends
from .tracking import Tracker

log = logging.getLogger("llmdiff.train")


@dataclass
class Components:
    """The frozen models: a comfy ModelPatcher, its CLIP (or None), its VAE, and the LLM (LoadedLLM;
    None is allowed when training only from a finished feature cache without validation prompts)."""

    model_patcher: Any
    clip: Any
    vae: Any
    llm: Any
    base_name: str = ""
    llm_name: str = ""
    llm_spec: Any = None  # LLMSpec when llm is None (read from a finished feature cache)

    @property
    def spec(self) -> Any:
        return self.llm.spec if self.llm is not None else self.llm_spec


def make_accelerator(opts: TrainOptions) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if "WORLD_SIZE" not in os.environ and "LOCAL_RANK" not in os.environ:
        # In-process callers (tests, notebooks) may build several runs with other settings.
        AcceleratorState._reset_state(reset_partial_state=True)
    mp = opts.mixed_precision
    cuda = torch.cuda.is_available()
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    # cpu=True on CPU machines: accelerate then runs multi-process over gloo (MULTI_CPU) when launched
    # by torchrun or `accelerate launch --multi_gpu` (not `--cpu`, which starts one process only).
    return Accelerator(cpu=not cuda, mixed_precision=mp)


def unet_dtype(opts: TrainOptions, mixed_precision: str) -> torch.dtype:
    if opts.unet_dtype != "auto":
        return DTYPES[opts.unet_dtype]
    return DTYPES.get(mixed_precision, torch.float32)  # "no": float32


def load_components(opts: TrainOptions, accelerator: Any) -> Components:
    import comfy.sd

    from ..llm import load_llm

    if not os.path.isfile(opts.base_model):
        raise LLMDiffError(f"base model '{opts.base_model}' not found (a single-file SD1.5 / SDXL checkpoint)")
    want_clip = opts.original_path == "clip" or bool(opts.validation_prompts)
    mp, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        opts.base_model, output_vae=True, output_clip=want_clip, output_clipvision=False,
        model_options={"dtype": unet_dtype(opts, accelerator.mixed_precision)})
    if vae is None:
        raise LLMDiffError(f"'{opts.base_model}' has no VAE: training needs one to make latents")
    names = dict(base_name=os.path.basename(opts.base_model), llm_name=os.path.basename(os.path.normpath(opts.llm)))
    cached_spec = _finished_cache_llm(opts, accelerator.num_processes)
    if cached_spec is not None and not opts.validation_prompts:
        # Everything the LLM would compute is in the cache: do not spend its memory on the GPU.
        accelerator.print(f"training from the finished feature cache in {opts.cache_dir}: the LLM is not loaded")
        return Components(mp, clip, vae, None, llm_spec=cached_spec, **names)
    llm_dtype = opts.llm_dtype
    if llm_dtype == "auto" and accelerator.device.type == "cpu":
        llm_dtype = "fp32"
    llm = load_llm(opts.llm, dtype=llm_dtype, device=accelerator.device, trust_remote_code=opts.trust_remote_code)
    llm.model.requires_grad_(False)
    return Components(mp, clip, vae, llm, **names)


# What an adapter file fixed when it was trained: its parameters exist for these settings (phi only in paper mode,
# the layer gates only for the score encoding), so a run that starts from it keeps them.
FIXED_BY_THE_FILE = ("encoding", "original_path", "c0")


def adopt_init_adapter(opts: TrainOptions) -> TrainOptions:
    """With --init-adapter, the run takes the file's encoding, original path and c0; a flag that says otherwise
    gives way (a warning where it was not the default). Its CLIP layer too, unless --clip-stop-at-layer is given.
    Reads the header only, so a wrong or damaged file stops the run before any model loads."""
    if not opts.init_adapter:
        return opts
    from ..adapter_file import read_adapter_config

    config = read_adapter_config(opts.init_adapter)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
    changes = {}
    for name in FIXED_BY_THE_FILE:
        theirs, ours = getattr(config, name), getattr(opts, name)
        if theirs != ours:
            changes[name] = theirs
            level = logging.INFO if ours == defaults[name] else logging.WARNING
            log.log(level, "--init-adapter %s was trained with --%s %s: this run keeps that (not %s)",
                    os.path.basename(opts.init_adapter), name.replace("_", "-"), theirs, ours)
    # CLIP's last layer is the file's too unless asked otherwise: its original path learned against that CLIP
    layer = int(config.training.get("clip_stop_at_layer", 0))
    if layer != opts.clip_stop_at_layer:
        if opts.clip_stop_at_layer == 0:
            changes["clip_stop_at_layer"] = layer
            log.info("--init-adapter %s was trained with --clip-stop-at-layer %d: this run keeps that",
                     os.path.basename(opts.init_adapter), layer)
        else:
            log.warning("--init-adapter %s was trained with --clip-stop-at-layer %d; this run uses %d, as asked",
                        os.path.basename(opts.init_adapter), layer, opts.clip_stop_at_layer)
    return dataclasses.replace(opts, **changes) if changes else opts


def check_output_dir(opts: TrainOptions) -> None:
    """Before any model loads: a run without --resume does not start over in an output folder that holds another
    run's checkpoints (it would overwrite and prune them); --resume continues the run that wrote the checkpoint,
    so an encoding, original path or c0 other than its own (which would not fit its parameters, or change what
    they mean) is refused. Reads the checkpoint adapter's header only."""
    if not opts.resume:
        earlier = checkpointing.find_checkpoint(Path(opts.output_dir), "latest")
        if earlier is not None:
            raise LLMDiffError(f"the output folder {opts.output_dir} holds the checkpoints of an earlier run (the "
                               f"newest: {earlier.name}): --resume latest continues it; to start over, use another "
                               f"--output-dir or delete {earlier.parent}")
        return
    ckpt = checkpointing.find_checkpoint(Path(opts.output_dir), opts.resume)
    if ckpt is None:
        return
    from ..adapter_file import read_adapter_config

    saved = read_adapter_config(ckpt / checkpointing.ADAPTER_FILE)
    differ = [f"--{name.replace('_', '-')} {getattr(saved, name)} (this run: {getattr(opts, name)})"
              for name in FIXED_BY_THE_FILE if getattr(saved, name) != getattr(opts, name)]
    if differ:
        raise LLMDiffError(f"--resume: the checkpoint {ckpt} was trained with {', '.join(differ)}: resume with its "
                           "settings, or train the new ones in another --output-dir (--init-adapter starts from a "
                           "finished adapter)")


def check_checkpoint_fits(ckpt: Path, components: Components) -> None:
    """The base model and the LLM a checkpoint was trained with, against the ones this run loaded."""
    from ..adapter_file import read_adapter_config
    from ..validation import check_adapter_matches_llm, check_adapter_matches_model

    saved = read_adapter_config(ckpt / checkpointing.ADAPTER_FILE)
    try:
        check_adapter_matches_model(saved, components.model_patcher)
        check_adapter_matches_llm(saved, components.spec)
    except AdapterMismatchError as e:
        raise LLMDiffError(f"--resume: the checkpoint {ckpt} does not fit this run's models. {e} Resume with the "
                           "base model and LLM it was trained with, or train in another --output-dir") from None


def _finished_cache_llm(opts: TrainOptions, world: int) -> Any:
    """The LLMSpec recorded in a finished feature cache, or None."""
    import json

    from ..features import LLMSpec

    if not opts.cache_dir or opts.cache_only:
        return None
    cache_dir = Path(opts.cache_dir)
    meta = cache_dir / "cache.json"
    if not meta.exists() or not (cache_dir / "empty.safetensors").exists() \
            or not feature_cache.is_complete(cache_dir, world):
        return None
    return LLMSpec.from_dict(json.loads(meta.read_text(encoding="utf-8"))["llm"])


def build_adapter(opts: TrainOptions, components: Components, device: torch.device) -> LLMDiffAdapter:
    unet = components.model_patcher.model.diffusion_model
    sites, modules = find_sites(unet)
    family = base_family(components.model_patcher.model)
    if opts.init_adapter:
        from ..adapter_file import load_adapter
        from ..validation import check_adapter_matches_llm, check_adapter_matches_model

        adapter = load_adapter(opts.init_adapter, dtype=torch.float32)
        check_adapter_matches_model(adapter.config, components.model_patcher)
        check_adapter_matches_llm(adapter.config, components.spec)
        # this run's token bucket: the feature cache pads to it, and the export records it
        adapter.config = dataclasses.replace(adapter.config, max_tokens=opts.max_tokens)
    else:
        config = AdapterConfig(base=family, sites=sites, llm=components.spec, encoding=opts.encoding,
                               original_path=opts.original_path, c0=opts.c0, gate_init=opts.gate_init,
                               rho_init=opts.rho_init, max_tokens=opts.max_tokens)
        adapter = LLMDiffAdapter(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            adapter.reset_parameters([m.to_q.weight.detach().float().cpu() for m in modules])
    adapter = adapter.to(device=device, dtype=torch.float32).train()
    # Parameters the chosen encoding never uses get no gradient: freeze them (DDP requires every
    # trainable parameter to take part in the loss).
    if adapter.encoder.mode != "score":
        adapter.encoder.gate.requires_grad_(False)
        adapter.encoder.rho.requires_grad_(False)
    elif not opts.langevin_noise:
        adapter.encoder.rho.requires_grad_(False)
    return adapter


def _fingerprint(opts: TrainOptions, components: Components, resolution: int,
                 buckets: tuple[Size, ...]) -> dict[str, Any]:
    def file_id(p: str) -> Any:
        try:
            st = os.stat(p)
            return [os.path.basename(p), st.st_size]
        except OSError:
            return os.path.basename(p)
    return {"base_model": file_id(opts.base_model) if opts.base_model else components.base_name,
            "llm": components.llm_name, "data": os.path.abspath(opts.data), "resolution": resolution,
            "crop": opts.crop, "original_path": opts.original_path, "max_tokens": opts.max_tokens,
            "image_root": opts.image_root, "image_column": opts.image_column, "caption_column": opts.caption_column,
            "clip_stop_at_layer": opts.clip_stop_at_layer,
            **({"aspect_buckets": [list(b) for b in buckets]} if buckets else {})}  # (caches made before: no key)


def last_layer_set(clip: Any, stop_at_layer: int) -> Any:
    """The checkpoint's CLIP as `CLIP Set Last Layer` leaves it (a clone: the caller's CLIP is not changed);
    0 = as it is."""
    if clip is None or not stop_at_layer:
        return clip
    clip = clip.clone()
    clip.clip_layer(stop_at_layer)
    return clip


def run(opts: TrainOptions) -> int:
    """The script: load through ComfyUI, train, export. Returns the process exit code."""
    opts, source = checked_before_loading(opts)  # (whether CLIP is needed follows an --init-adapter's mode)
    accelerator = make_accelerator(opts)
    components = load_components(opts, accelerator)
    return run_with(opts, components, accelerator, source)


def checked_before_loading(opts: TrainOptions, source: Source | None = None) -> tuple[TrainOptions, Source]:
    """What can be checked before the models load (minutes for SDXL and an 8B LLM): the --init-adapter file, the
    dataset, the feature cache's format and the output folder. Returns the options the file fixes, and the data."""
    opts = adopt_init_adapter(opts)
    source = open_data(opts) if source is None else source
    if opts.cache_dir:
        feature_cache.check_format(Path(opts.cache_dir))
    check_output_dir(opts)
    return opts, source


def open_data(opts: TrainOptions) -> Source:
    """The dataset, indexed (folders and manifests) or its shards listed; a DatasetError names what is wrong."""
    return open_source(opts.data, opts.data_format, opts.image_root, opts.image_column, opts.caption_column)


def run_with(opts: TrainOptions, components: Components, accelerator: Any = None, source: Source | None = None) -> int:
    import comfy.model_management as mm

    opts, source = checked_before_loading(opts, source)
    accelerator = accelerator or make_accelerator(opts)
    out_dir = Path(opts.output_dir)
    device = accelerator.device
    mp = components.model_patcher
    family = base_family(mp.model)
    if family not in ("sd15", "sdxl"):
        raise LLMDiffError(f"the base model is a {type(mp.model).__name__}; LLMDiff trains on SD1.5 and SDXL")
    resolution = opts.resolution or (1024 if family == "sdxl" else 512)
    buckets = bucket_sizes(resolution, opts.bucket_step, opts.bucket_max_ratio) if opts.aspect_buckets else ()
    if buckets:
        log.info("aspect-ratio buckets (width x height): %s", describe_buckets(buckets))
    prediction = prediction_type(mp.model)

    # Frozen U-Net on the training device, weights patched (LoRAs merged) the way ComfyUI runs it.
    mp.model.requires_grad_(False)
    mm.load_models_gpu([mp], force_full_load=True)
    if mp.model.diffusion_model.dtype != torch.float32 and device.type == "cpu":
        log.warning("the U-Net weights are %s on CPU: slow; use --unet-dtype fp32", mp.model.diffusion_model.dtype)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)

    if components.spec is None:
        components.llm_spec = _finished_cache_llm(opts, accelerator.num_processes)
        if components.llm_spec is None:
            raise LLMDiffError("no LLM loaded and no finished feature cache to train from")
    adapter = build_adapter(opts, components, device)
    patched = patch_for_training(mp, adapter)
    # run_with may be called in-process (bench, tests): the U-Net and torch's settings are left as they came,
    # also when the run fails (a process-wide SDPA choice must not outlive it)
    undo: list[Any] = []
    try:
        _apply_run_settings(opts, mp, patched, device, undo, max(1, len(buckets)))
        return _train(opts, components, accelerator, adapter, patched, family, resolution, buckets, prediction,
                      source)
    finally:
        _undo(undo)


def _apply_run_settings(opts: TrainOptions, mp: Any, patched: Any, device: torch.device, undo: list[Any],
                        image_sizes: int) -> None:
    """How the frozen U-Net runs (checkpointing, cuDNN, SDPA kernels, memory format, compile); each setting
    puts what reverts it on `undo`. image_sizes: the aspect-ratio buckets (1 without)."""
    if opts.gradient_checkpointing:
        undo.append(enable_gradient_checkpointing(mp.model.diffusion_model))
    if device.type == "cuda" and opts.cudnn_benchmark != torch.backends.cudnn.benchmark:
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = opts.cudnn_benchmark
        undo.append(lambda: setattr(torch.backends.cudnn, "benchmark", before))
    undo.append(use_backends(parse_backends(opts.sdpa_backends)))  # (before compile: it traces the choice)
    if opts.channels_last:
        unet = mp.model.diffusion_model
        unet.to(memory_format=torch.channels_last)
        undo.append(lambda: unet.to(memory_format=torch.contiguous_format))
    if opts.unet_fp8:  # (before compile: the compiled graph traces the float8 forward)
        converted, undo_fp8 = use_float8_linears(mp.model.diffusion_model, device)
        undo.append(undo_fp8)
        log.info("--unet-fp8: %d linear layers of the frozen U-Net run float8 GEMMs", converted)
        if device.type == "cpu":
            log.warning("--unet-fp8 on the CPU: correct, but torch's CPU float8 GEMM is slower than fp32's; it is "
                        "meant for GPUs of compute capability 8.9+")
        elif not opts.compile_unet:
            # GPU check 13 on an H200: a frozen linear's forward + backward 3-5x slower eager in float8 than in
            # bf16 at SDXL's shapes (each GEMM's scaling and casts are separate kernels, launched from Python)
            log.warning("--unet-fp8 without --compile-unet: correct, but slower than bf16 (eager, each float8 "
                        "GEMM brings its own scaling and cast kernels: 3-5x a bf16 linear's time on an H200); "
                        "use it with --compile-unet inductor, which fuses them")
    if opts.compile_unet:
        if opts.gradient_checkpointing:
            log.warning("--compile-unet with --gradient-checkpointing: correct, but dynamo splits the U-Net into "
                        "many graphs (the adapter's fusion state is a side effect inside each checkpointed "
                        "block), so expect little of compile's speed-up")
        undo.append(compile_unet(patched, opts.compile_unet, opts.compile_mode or None, opts.compile_projections,
                                 image_sizes))
        # the first steps then sit silent for minutes (SDXL); say why, and that it is paid once per machine
        log.info("--compile-unet %s: the first training steps compile the U-Net (minutes for SDXL); torch keeps "
                 "the result in its compile cache (TORCHINDUCTOR_CACHE_DIR, else torchinductor_<user> in the temp "
                 "folder), so a resumed or repeated run at the same shapes compiles in seconds%s", opts.compile_unet,
                 ("" if opts.compile_whole_bucket else "; with --no-compile-whole-bucket a second compile follows "
                  "at the second caption span length")
                 + (f"; with --aspect-buckets one compile per bucket the run meets ({image_sizes} sizes)"
                    if image_sizes > 1 else ""))


def _train(opts: TrainOptions, components: Components, accelerator: Any, adapter: LLMDiffAdapter, patched: Any,
           family: str, resolution: int, buckets: tuple[Size, ...], prediction: str, source: Source) -> int:
    """Encoders, data (the feature cache built first when asked), the trainer, the run and the export."""
    out_dir = Path(opts.output_dir)
    device = accelerator.device
    mp = components.model_patcher
    if opts.clip_stop_at_layer and adapter.config.original_path != "clip":
        log.warning("--clip-stop-at-layer %d: paper mode does not use CLIP (only validation's base-model column does)",
                    opts.clip_stop_at_layer)
    clip = last_layer_set(components.clip, opts.clip_stop_at_layer)
    encoders = FrozenEncoders(components.vae, components.llm, clip, opts.max_tokens,
                              need_clip=adapter.config.original_path == "clip", need_pooled=family == "sdxl")
    spec = StreamSpec(seed=opts.seed, shuffle=opts.shuffle, rank=accelerator.process_index,
                      world=accelerator.num_processes, shuffle_buffer=opts.shuffle_buffer, resolution=resolution,
                      crop=opts.crop, buckets=buckets)
    validation = []
    if opts.validation_prompts and accelerator.is_main_process:
        validation = previews.prepare(encoders, opts.validation_prompts, opts.validation_negative)

    summary = {
        "trainer": f"ComfyUI-LLMDiff {__version__} llmdiff_core/train.py", "base_model": components.base_name,
        "llm": components.llm_name, "data": os.path.basename(os.path.normpath(opts.data)),
        "resolution": resolution, **({"aspect_buckets": describe_buckets(buckets)} if buckets else {}),
        "prediction": prediction, "batch_size": opts.batch_size,
        "grad_accum": opts.grad_accum, "global_batch": opts.batch_size * opts.grad_accum * accelerator.num_processes,
        "lr": opts.lr, "lr_schedule": opts.lr_schedule, "warmup_steps": opts.warmup_steps,
        "max_steps": opts.max_steps, "caption_dropout": opts.caption_dropout,
        "mixed_precision": accelerator.mixed_precision, "ema_decay": opts.ema_decay,
        "min_snr_gamma": opts.min_snr_gamma, "langevin_noise": opts.langevin_noise, "seed": opts.seed,
        "feature_cache": bool(opts.cache_dir),
        **({"clip_stop_at_layer": opts.clip_stop_at_layer} if opts.clip_stop_at_layer else {}),
        **({"init_adapter": os.path.basename(opts.init_adapter)} if opts.init_adapter else {}),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }

    # --- feature cache: build (resumable), then read from it -----------------------------------
    empty = encoders.empty_prompt() if components.llm is not None else None
    make_conditioning: Any
    cache_source = None
    if opts.cache_dir:
        cache_dir = Path(opts.cache_dir)
        cspec = feature_cache.make_spec(adapter.config, _fingerprint(opts, components, resolution, buckets),
                                       opts.cache_dtype)
        feature_cache.check_or_create(cache_dir, cspec, accelerator.is_main_process)
        accelerator.wait_for_everyone()
        if not feature_cache.is_complete(cache_dir, accelerator.num_processes) or not (cache_dir / "empty.safetensors").exists():
            if components.llm is None:
                raise LLMDiffError("the feature cache is not finished and no LLM is loaded to finish it")
            build_spec = StreamSpec(seed=opts.seed, shuffle=False, rank=accelerator.process_index,
                                    world=accelerator.num_processes, resolution=resolution, crop=opts.crop, epochs=1,
                                    buckets=buckets)
            bar = None
            if accelerator.is_main_process and opts.progress:
                from tqdm.auto import tqdm
                bar = tqdm(desc="feature cache", unit="img", dynamic_ncols=True)
            skipped = feature_cache.build(cache_dir, source, build_spec, encoders, cspec, opts.cache_batch_size,
                                          opts.cache_shard_size, opts.num_workers, accelerator.process_index,
                                          progress=bar.update if bar is not None else None)
            if bar is not None:
                bar.close()
            if skipped.total:
                log.warning("feature cache: %d entries skipped (%s)", skipped.total, skipped.counts)
            _say_truncated(encoders, "feature cache")
        accelerator.wait_for_everyone()
        if opts.cache_only:
            accelerator.print(f"feature cache complete in {cache_dir}")
            return 0
        cache_source = feature_cache.CachedSource(cache_dir)
        if buckets and accelerator.is_main_process:
            log.info("the feature cache's images per bucket (width x height): %s",
                     describe_buckets(buckets, cache_source.image_sizes))
        changed = feature_cache.changes_since_built(cache_source, source) if accelerator.is_main_process else None
        if changed:
            log.warning("the dataset changed since the feature cache in %s was built (%s): training reads the cache "
                        "as it is; to train on the dataset as it is now, build the cache again in a new --cache-dir",
                        cache_dir, changed)
        empty = feature_cache.load_empty(cache_dir, cspec)

        pin = device.type == "cuda"  # page-locked batches: asynchronous host->device copies

        def make_conditioning(samples: list[Any]) -> Conditioning:
            return feature_cache.collate(samples, cspec, pin=pin)
    else:
        def make_conditioning(items: list[Any]) -> Conditioning:
            return encoders.encode([it.key for it in items], torch.stack([it.pixels for it in items]),
                                   [it.caption for it in items],
                                   [(*it.original_size, *it.crop_top_left) for it in items])
    if empty is None:
        raise LLMDiffError("no LLM loaded to encode the empty prompt")

    module = TrainModule(adapter, patched, adapter.config.llm, prediction, opts.min_snr_gamma,
                         adapter.config.context_dim, opts.langevin_noise,
                         whole_bucket=bool(opts.compile_unet) and opts.compile_whole_bucket)  # (eager: the span)
    trainer = Trainer(opts, accelerator, module, mp, iter(()), make_conditioning, empty, components.vae,
                      validation, summary)
    trainer.build_optimizer()
    ckpt = checkpointing.find_checkpoint(out_dir, opts.resume)
    if opts.resume and ckpt is None:
        accelerator.print(f"--resume {opts.resume}: no checkpoint in {out_dir} yet, starting fresh")
    if ckpt is not None:
        check_checkpoint_fits(ckpt, components)
        trainer.resume(ckpt)
    start: Position = trainer.state.position
    if cache_source is not None:
        trainer.items = feature_cache.iter_items(cache_source, spec, start, opts.num_workers)
        trainer.prefetch = opts.prefetch  # pure host work; on-the-fly encoding runs models: never in a thread
    else:
        trainer.items = loader(SampleStream(source, spec, start), opts.num_workers)

    tracker = Tracker(out_dir, accelerator.is_main_process, opts.tensorboard, opts.progress, opts.max_steps,
                      trainer.state.step)
    code = 0
    try:
        outcome = trainer.run(tracker)
        if outcome == "done" and accelerator.is_main_process:
            path = checkpointing.export(adapter, out_dir / opts.export_name, trainer.training_summary(trainer.state.skipped),
                                        trainer.ema.shadow if trainer.ema is not None else None)
            tracker.message(f"adapter written to {path} (copy it to ComfyUI/models/llmdiff/)")
    except TrainingStopped as e:
        tracker.message(f"ERROR: {e}")
        log.error("%s", e)
        code = TrainingStopped.exit_code
    finally:
        _say_truncated(encoders, "training")
        tracker.close()
    accelerator.wait_for_everyone()
    return code


def _say_truncated(encoders: FrozenEncoders, what: str) -> None:
    truncated = encoders.take_truncated()
    if truncated:
        log.warning("%s: %d captions were longer than --max-tokens %d and were truncated (raise --max-tokens to keep "
                    "them whole)", what, truncated, encoders.max_tokens)


def _undo(undo: list[Any]) -> None:
    for fn in reversed(undo):
        fn()
