"""Training throughput of the adapter with the U-Net frozen, from the feature cache, through the real
training code (llmdiff_core.training.runner.run_with: accelerate, autocast, AdamW, data loader).

    python bench/training_throughput.py            # GPU: SD1.5 512 px batch 16, SDXL 1024 px batch 4
    python bench/training_throughput.py --small    # CPU: tiny widths, 64 px, batch 2

Two runs per model:
  1. the cache pre-pass (--cache-only) over a generated image folder, with a random-weight LLM of the
     real shape (Llama-3-8B; tiny with --small) and a stand-in VAE (random latents): this builds the
     feature cache exactly as train.py does, and is not timed;
  2. training from the finished cache with no LLM loaded (what train.py does then), timed per
     optimizer step from its start to the next one's (the trainer runs a step ahead of the device, so
     this is the device's pace; --sync-steps: each step synchronised and timed alone). img/s = batch /
     median step time after the warmup steps.
Each step is split into data (next batch from the cache loader + collate + host->device inputs) and
compute (forward, backward, optimizer), and the bytes moved to the device per step are reported (the
stored layers in the stored dtype, padded to the batch's longest caption: encoders.CompactFeatures).
--profile K adds K profiled steps: top ops, and where the device idles by host phase (device_gaps.py).
Peak GPU memory is torch.cuda.max_memory_allocated over the training run (U-Net weights included).
Targets (issue 5, one H100): >= 200 img/s SD1.5 512 px, >= 28 img/s SDXL 1024 px.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET = {"sd15": 200.0, "sdxl": 28.0}
H100_DENSE_BF16_TFLOPS = common.H100_FLOPS / 1e12
ISSUE_REF = {"sd15": "103 img/s, 18.4 GiB (batch 16)", "sdxl": "14.3 img/s, 38.7 GiB (batch 4)"}


def parse() -> Any:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--mode", choices=("clip", "llm"), default="clip",
                   help="original_path: clip = hybrid (train.py's default; a stand-in CLIP gives random "
                        "conditioning), llm = paper")
    p.add_argument("--batch", default=None, help="per-model batch, e.g. 'sd15=16,sdxl=4' (default that; 2 --small)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 20 GPU, 4 --small)")
    p.add_argument("--samples", type=int, default=None, help="images in the generated dataset (default 64; 8 --small)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default 512 SD1.5 / 1024 SDXL; 64 --small)")
    p.add_argument("--llm", choices=("tiny", "thin8b", "1b", "8b"), default=None,
                   help="LLM shape for the cache (default 8b; tiny --small; thin8b = 8B feature shapes on a CPU)")
    p.add_argument("--caption-words", type=int, default=48, help="mean caption length in tokens")
    p.add_argument("--num-workers", type=int, default=None, help="data loader workers (default 4 GPU, 0 --small)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--channels-last", action="store_true", help="train.py --channels-last (frozen U-Net memory format)")
    p.add_argument("--unet-fp8", action="store_true", help="train.py --unet-fp8 (the frozen U-Net's linear layers "
                   "as float8 GEMMs; CUDA compute capability 8.9+)")
    p.add_argument("--sdpa-backends", default="", metavar="LIST",
                   help="train.py --sdpa-backends: the attention kernels to use, fastest first (e.g. flash,efficient)")
    p.add_argument("--compile", default="", metavar="BACKEND",
                   help="train.py --compile-unet BACKEND (inductor on a GPU); the warmup steps compile")
    p.add_argument("--compile-mode", default="", help="train.py --compile-mode")
    p.add_argument("--compile-projections", action=argparse.BooleanOptionalAction, default=True,
                   help="train.py --compile-projections (its default, with --compile): every site's K/V projection "
                        "compiled too; --no-compile-projections: eager (the A/B of the host work per step)")
    p.add_argument("--compile-whole-bucket", action=argparse.BooleanOptionalAction, default=True,
                   help="train.py --compile-whole-bucket (its default, with --compile): one static key length, one "
                        "compile; --no-compile-whole-bucket: the span's (a static, then a dynamic graph)")
    p.add_argument("--mixed-precision", default=None, choices=("no", "bf16", "fp16"),
                   help="train.py --mixed-precision, with the frozen U-Net in that dtype (default: bf16 where the "
                        "GPU has it, no on a CPU; bf16 on a CPU counts the casts a GPU step does)")
    p.add_argument("--floor-only", action="store_true",
                   help="only the real-shape training FLOP table (meta device, seconds, any machine)")
    p.add_argument("--no-floor", action="store_true", help="skip the real-shape training FLOP table")
    p.add_argument("--no-prefetch", action="store_true",
                   help="prepare each batch in the step (train.py --no-prefetch) instead of in the background")
    p.add_argument("--prefetch-batches", type=int, default=None, metavar="N",
                   help="train.py --prefetch-batches: batches prepared ahead side by side (default the trainer's)")
    p.add_argument("--sync-steps", action="store_true",
                   help="synchronise the device around every step and batch (each step timed alone, as the trainer "
                        "itself did before it read each step's loss a step later): the A/B of that change")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="train.py --no-cudnn-benchmark: cuDNN's heuristic convolution algorithms (the A/B)")
    p.add_argument("--no-copy-stream", action="store_true",
                   help="with prefetch on CUDA: copy each batch to the device on the compute stream, not on the "
                        "prefetch thread's side stream (llmdiff_core/training/device_copy.py; the A/B)")
    p.add_argument("--keep", default=None, help="keep the dataset, cache and run folders here (default: a temp dir); "
                                                "a later run with the same settings reuses the finished cache "
                                                "(no LLM, no pre-pass)")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="after the timed steps, K more under torch.profiler: top ops by device and by host time")
    opts = p.parse_args()
    common.defaults(opts, repeats=1, warmup=3 if not opts.small else 1)
    opts.steps = opts.steps or (8 if opts.small else 20)
    opts.samples = opts.samples or (8 if opts.small else 64)
    opts.llm = opts.llm or ("tiny" if opts.small else "8b")
    opts.num_workers = (0 if opts.small else 4) if opts.num_workers is None else opts.num_workers
    batch = {"sd15": 2, "sdxl": 2} if opts.small else {"sd15": 16, "sdxl": 4}
    for part in (opts.batch or "").split(","):
        if "=" in part:
            k, v = part.split("=")
            batch[k.strip()] = int(v)
        elif part.strip():
            batch = {k: int(part) for k in batch}
    opts.batch_of = batch
    return opts


class StandInVAE:
    """What FrozenEncoders needs of a VAE: encode(pixels [B, H, W, 3]) -> latents [B, 4, H/8, W/8]."""

    def encode(self, pixels: Any) -> Any:
        import torch

        b, h, w, _ = pixels.shape
        g = torch.Generator().manual_seed(int(pixels.sum().item() * 1000) % (2 ** 31))
        return torch.randn(b, 4, h // 8, w // 8, generator=g)


class StandInCLIP:
    """What FrozenEncoders needs of a CLIP: tokenize + encode_from_tokens(return_pooled=True)."""

    def __init__(self, width: int) -> None:
        self.width = width

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens(self, tokens: str, return_pooled: bool = False) -> Any:
        import torch

        g = torch.Generator().manual_seed(len(tokens))
        cond = torch.randn(1, 77, self.width, generator=g)
        return (cond, torch.randn(1, 1280, generator=g)) if return_pooled else cond


def write_dataset(root: Path, n: int, size: int, words: int) -> Path:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 255, size=(size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(img).resize((size, size), Image.NEAREST).save(root / f"img_{i:04d}.png")
        k = max(4, int(words * (0.5 + rng.random())))
        (root / f"img_{i:04d}.txt").write_text(" ".join(f"w{j}_{i % 7}" for j in range(k)), encoding="utf-8")
    return root


def main() -> None:
    opts = parse()
    device = common.setup_comfy(opts)
    import accelerate
    import torch
    import torch._dynamo
    from torch.profiler import record_function

    import builders
    from device_gaps import PHASE_PREFIX, STEP_PHASE
    import comfy.model_management as mm
    from llmdiff_core.dtypes import DTYPES
    from llmdiff_core.training import device_copy, feature_cache, loop, runner
    from llmdiff_core.training.options import TrainOptions

    opts.prefetch_batches = opts.prefetch_batches or TrainOptions.prefetch_batches  # (not given: the trainer's)
    cuda = device.type == "cuda"
    device_copy.SIDE_STREAM = not opts.no_copy_stream
    precision = opts.mixed_precision or ("bf16" if cuda and torch.cuda.is_bf16_supported() else "no")
    report = common.Report("Adapter training throughput (U-Net frozen, from the feature cache)", common.env_header(
        device, opts.root, mode=opts.mode, llm=opts.llm, steps=opts.steps, warmup_steps=opts.warmup,
        workers=opts.num_workers, grad_ckpt=opts.gradient_checkpointing, prefetch=not opts.no_prefetch,
        prefetch_batches=opts.prefetch_batches,
        copy_stream=cuda and not opts.no_prefetch and not opts.no_copy_stream, sync_steps=opts.sync_steps,
        cudnn_benchmark=cuda and not opts.no_cudnn_benchmark,
        channels_last=opts.channels_last, unet_fp8=opts.unet_fp8,
        sdpa_backends=opts.sdpa_backends.replace(",", "+") or "torch's choice",
        compile=(f"{opts.compile} (mode {opts.compile_mode})" if opts.compile_mode else opts.compile) or "no",
        whole_bucket=bool(opts.compile) and opts.compile_whole_bucket,
        compiled_projections=bool(opts.compile) and opts.compile_projections,
        mixed_precision=precision))
    step_tflop = {} if opts.no_floor else floor_table(report, opts)  # family -> TFLOP per image per step
    if opts.floor_only:
        report.emit(opts)
        return
    work = Path(opts.keep) if opts.keep else Path(tempfile.mkdtemp(prefix="llmdiff-bench-train-"))
    rows = []
    # Per-step timing and the data/compute split, by wrapping the Trainer's own methods (this process only).
    marks: dict[str, list[float]] = {"start": [], "step": [], "end": [], "wait": [], "prep": [], "pick": [],
                                     "build": [], "reads": [], "stage": []}
    orig_step, orig_take = loop.Trainer.train_step, loop.Trainer.take_batch
    orig_prep, orig_device = loop.Trainer._prepare_batch, loop.Trainer._device_inputs
    orig_pick, orig_reads = loop.Trainer.pick_samples, feature_cache.read_all
    orig_stage = device_copy.DeviceStager.start
    picked_in: dict[int, tuple[int, float]] = {}  # id(picked) -> (its batch number, seconds its pick took)
    prep_of: dict[int, tuple[float, float, float, float]] = {}  # batch number -> (pick, build, reads, stage) seconds
    in_thread = threading.local()  # the cache reads' and the copies' seconds of the batch this thread builds
    orig_forward, orig_backward = loop.TrainModule.forward, accelerate.Accelerator.backward
    moved: list[int] = []

    profiler: dict[str, Any] = {}  # the torch.profiler of the current model's last K steps
    run: dict[str, Any] = {"family": "", "start": 0.0, "picks": 0}  # the current model's name, start, batches picked

    def train_step(self: Any) -> Any:
        if opts.profile and len(marks["start"]) == opts.warmup + opts.steps + 1:  # (one untimed step between)
            profiler["on"] = start_profiler(cuda)
        if opts.sync_steps:
            common.sync(device)
        t0 = common.now()
        marks["start"].append(t0)
        with record_function(PHASE_PREFIX + STEP_PHASE):
            out = orig_step(self)
            if opts.sync_steps:
                common.sync(device)
        marks["step"].append(common.now() - t0)
        if len(marks["start"]) <= opts.warmup + 1:  # where compiles happen: a run cut off there still says how far
            print(f"  {run['family']} step {len(marks['start'])}: {common.now() - run['start']:.1f} s "
                  "since the run's start", file=sys.stderr, flush=True)
        return out

    def take_batch(self: Any) -> Any:  # what the step waits for: the (prefetched) batch (+ host->device if synced)
        t0 = common.now()
        with record_function(PHASE_PREFIX + "data"):
            out = orig_take(self)
            if opts.sync_steps:
                common.sync(device)
        marks["wait"].append(common.now() - t0)
        return out

    def step_times() -> list[float]:
        """Seconds per optimizer step: synced, each step alone; else the time from one step's start to the
        next one's (the trainer queues a step and reads the one before it, so this is the device's pace)."""
        if opts.sync_steps:
            return marks["step"]
        starts = marks["start"] + marks["end"]
        return [b - a for a, b in zip(starts, starts[1:])]

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:  # phases for the profile's idle-time table
        with record_function(PHASE_PREFIX + "forward"):
            return orig_forward(self, *args, **kwargs)

    def backward(self: Any, *args: Any, **kwargs: Any) -> Any:
        with record_function(PHASE_PREFIX + "backward"):
            return orig_backward(self, *args, **kwargs)

    def pick_samples(self: Any) -> Any:  # the samples from the loader (one batch at a time)
        t0 = common.now()
        out = orig_pick(self)
        picked_in[id(out)] = (run["picks"], common.now() - t0)  # (picks run one at a time, in the order of the steps)
        run["picks"] += 1
        return out

    def prepare_batch(self: Any, picked: Any) -> Any:  # cache reads + collate + draws + copies: in a prefetch thread
        in_thread.reads = in_thread.stage = 0.0
        t0 = common.now()
        out = orig_prep(self, picked)
        build = common.now() - t0
        number, pick = picked_in.pop(id(picked))
        prep_of[number] = (pick, build, in_thread.reads, in_thread.stage)  # by number: threads finish out of order
        return out

    def prep_marks() -> None:  # batch i's prep times at index i of the marks, as the steps took them
        done = [prep_of[i] for i in sorted(prep_of)]
        for key, values in zip(("pick", "build", "reads", "stage"), zip(*done)):
            marks[key][:] = values
        marks["prep"][:] = [pick + build for pick, build, _, _ in done]

    def read_all(*args: Any, **kwargs: Any) -> Any:
        t0 = common.now()
        out = orig_reads(*args, **kwargs)
        in_thread.reads = getattr(in_thread, "reads", 0.0) + common.now() - t0
        return out

    def stage(self: Any, host: Any) -> Any:  # issuing the batch's copies (on CUDA's side stream: nothing may block)
        t0 = common.now()
        out = orig_stage(self, host)
        in_thread.stage = getattr(in_thread, "stage", 0.0) + common.now() - t0
        return out

    def device_inputs(self: Any, host: Any) -> Any:
        out = orig_device(self, host)
        moved.append(sum(v.numel() * v.element_size() for v in out.values() if isinstance(v, torch.Tensor)))
        return out

    # Not timed and not wanted here: the end-of-run checkpoint (adapter + AdamW state: ~10 GB for SDXL with
    # an 8B LLM) and the export. Other tests cover both.
    orig_ckpt, orig_export = loop.Trainer.checkpoint, runner.checkpointing.export
    loop.Trainer.train_step, loop.Trainer.take_batch = train_step, take_batch
    loop.Trainer._prepare_batch, loop.Trainer._device_inputs = prepare_batch, device_inputs
    loop.Trainer.pick_samples, feature_cache.read_all = pick_samples, read_all
    device_copy.DeviceStager.start = stage  # type: ignore[method-assign]
    loop.TrainModule.forward, accelerate.Accelerator.backward = forward, backward
    loop.Trainer.checkpoint = lambda self: None
    runner.checkpointing.export = lambda adapter, path, *a, **k: path
    try:
        for family in [m for m in opts.models.split(",") if m]:
            if opts.compile:  # a fresh start per family: new shapes of the same U-Net code would recompile with
                torch._dynamo.reset()  # dynamic shapes (minutes of sympy for SDXL, bench/sampling_overhead.py)
            res = opts.resolution or (64 if opts.small else (512 if family == "sd15" else 1024))
            bsz = opts.batch_of[family]
            unet_dtype = DTYPES.get(precision, torch.float32)  # what the trainer's unet_dtype auto picks
            mp = builders.build_unet(family, opts.small, unet_dtype, device, offload_device=mm.unet_offload_device())
            tag = f"{family}-{res}-n{opts.samples}-w{opts.caption_words}"
            data, cache = work / f"data-{tag}", work / f"cache-{tag}-{opts.mode}-{opts.llm}"
            ctx_dim = builders.unet_config(family, opts.small)[1]["context_dim"]
            clip = StandInCLIP(ctx_dim) if opts.mode == "clip" else None
            common_kw = dict(base_model="", llm=f"llama-{opts.llm}-random", data=str(data), resolution=res,
                             original_path=opts.mode, batch_size=bsz, num_workers=opts.num_workers,
                             cache_dir=str(cache), warmup_steps=0, lr=1e-5, progress=False, tensorboard=False,
                             log_every=1, checkpoint_every=0, keep_checkpoints=1, max_tokens=128,
                             gradient_checkpointing=opts.gradient_checkpointing, prefetch=not opts.no_prefetch,
                             prefetch_batches=opts.prefetch_batches,
                             channels_last=opts.channels_last, unet_fp8=opts.unet_fp8, compile_unet=opts.compile,
                             sdpa_backends=opts.sdpa_backends,
                             cudnn_benchmark=not opts.no_cudnn_benchmark,
                             compile_mode=opts.compile_mode, compile_whole_bucket=opts.compile_whole_bucket,
                             compile_projections=opts.compile_projections,
                             mixed_precision=precision, seed=0)
            # 1. the cache pre-pass (LLM loaded), not timed; a finished one kept by an earlier run (--keep) is reused
            spec = builders.llm_spec(opts.llm)
            if not feature_cache.is_complete(cache, 1):
                write_dataset(data, opts.samples, res, opts.caption_words)
                llm = builders.build_llm(opts.llm, torch.bfloat16 if cuda else torch.float32, device)
                comps = runner.Components(mp, clip, StandInVAE(), llm, f"random-{family}", f"llama-{opts.llm}-random")
                code = runner.run_with(TrainOptions(output_dir=str(work / "prepass"), cache_only=True, max_steps=1,
                                                    **common_kw), comps)
                if code != 0:
                    raise RuntimeError(f"cache pre-pass failed with exit code {code}")
                del llm, comps
                gc.collect()  # the pre-pass's adapter and patched clone (reference cycles) must not count below
                if cuda:
                    torch.cuda.empty_cache()
            # 2. training from the finished cache, no LLM
            out_dir = work / f"run-{family}"
            shutil.rmtree(out_dir, ignore_errors=True)
            comps = runner.Components(mp, clip, StandInVAE(), None, f"random-{family}", f"llama-{opts.llm}-random",
                                      llm_spec=spec)
            for v in marks.values():
                v.clear()
            moved.clear()
            picked_in.clear()
            prep_of.clear()
            run.update(family=family, start=common.now(), picks=0)
            compile_clock = common.CompileClock()
            with common.PeakMemory(device) as pm:
                code = runner.run_with(TrainOptions(output_dir=str(out_dir),
                                                    max_steps=opts.warmup + opts.steps + 1 + opts.profile,
                                                    **common_kw), comps)
                common.sync(device)
                marks["end"].append(common.now())
            prep_marks()
            if code != 0:
                raise RuntimeError(f"training run failed with exit code {code}")
            if profiler.get("on") is not None:
                profile_tables(report, profiler.pop("on"), family, opts.profile, step_times()[-opts.profile:], cuda)
            timed = slice(opts.warmup, opts.warmup + opts.steps)
            steps = step_times()[timed]
            if len(marks["start"]) > opts.warmup:  # what a compile costs shows here (A/B: --no-compile-whole-bucket)
                report.notes.append(f"{family}: {marks['start'][opts.warmup] - run['start']:.1f} s from the run's start "
                                    f"to the first timed step (the warm-up steps: compile, cuDNN's choices)")
            phases = compile_clock.phases() if opts.compile else ""
            if phases:
                report.notes.append(f"{family}: the compile's phases (nested): {phases}")
            if common.uses_cuda_graphs(opts.compile, opts.compile_mode):  # did the step run as CUDA graphs?
                report.notes.append(f"{family} (so far in this process): {common.cuda_graph_note()}")
            if len(steps) < opts.steps:  # stopped early (device_run.sh's deadline sends SIGINT): say how far it got
                report.notes.append(f"{family}: stopped after {len(marks['start'])} steps, "
                                    f"{common.now() - run['start']:.0f} s in: {len(steps)} of {opts.steps} timed steps "
                                    "in its row")
            if marks["build"]:
                ms = {k: common.median(marks[k]) * 1e3 for k in ("pick", "build", "reads", "stage")}
                side = opts.prefetch_batches
                pace = max(ms["pick"], (ms["pick"] + ms["build"]) / side)  # picks one at a time, builds side by side
                how = ("no prefetch" if opts.no_prefetch else f"{side} batches prepared side by side: the data path "
                       f"delivers one every ~{pace:.1f} ms at best")
                report.notes.append(
                    f"{family}: host prep per batch (medians): picking its samples from the loader {ms['pick']:.1f} "
                    f"ms, then collate + draws + copies {ms['build']:.1f} ms, of which cache reads {ms['reads']:.1f} ms"
                    f" and issuing the copies {ms['stage']:.1f} ms ({how})")
            if steps:
                rows.append(_row(opts, family, res, bsz, spec, steps, timed, marks, moved, pm, out_dir, step_tflop))
            del mp, comps
            mm.unload_all_models()
            gc.collect()
            mm.soft_empty_cache()
    finally:
        loop.Trainer.train_step, loop.Trainer.take_batch = orig_step, orig_take
        loop.Trainer._prepare_batch, loop.Trainer._device_inputs = orig_prep, orig_device
        loop.Trainer.pick_samples, feature_cache.read_all = orig_pick, orig_reads
        device_copy.DeviceStager.start = orig_stage  # type: ignore[method-assign]
        loop.TrainModule.forward, accelerate.Accelerator.backward = orig_forward, orig_backward
        loop.Trainer.checkpoint, runner.checkpointing.export = orig_ckpt, orig_export
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    report.table("per optimizer step (medians after warmup)",
                 ["model", "px", "batch", "LLM D x L", "step ms", "img/s", "data wait ms", "host prep ms", "compute ms",
                  "noise ±%", "fastest ms", "slowest ms",
                  "MiB to device/step", "peak GiB", "target img/s", "last loss", "% of H100 bf16 peak"], rows)
    report.notes += [
        "step = from one step's start to the next one's (the trainer queues a step while the device runs the one "
        "before, so this is the device's pace), or with sync_steps each step synchronised and timed alone. "
        "data wait = what the step's host waits for its batch (Trainer.take_batch: the prefetched batch, or "
        "preparing it without prefetch; with sync_steps also the host->device copy: with copy_stream only what of "
        "the side stream's copy is left); host prep = cache loader + collate + draws, and with copy_stream issuing "
        "the copy (Trainer.pick_samples + _prepare_batch, in a prefetch thread, overlapping the previous step, "
        "unless --no-prefetch; with --prefetch-batches N, N batches are prepared side by side); compute = step - data wait (forward, backward, clip, AdamW). MiB to device = the tensors "
        "handed to the step.",
        "issue 5 reference (H100, plain attn2 replace adapter): SD1.5 " + ISSUE_REF["sd15"] + "; SDXL "
        + ISSUE_REF["sdxl"] + ".",
    ]
    if opts.small:
        report.notes.append("--small: tiny widths at 64 px on CPU: exercises the whole path; img/s is not comparable "
                            "with the GPU targets.")
    report.emit(opts)


def start_profiler(cuda: bool) -> Any:
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    prof.__enter__()
    return prof


def profile_tables(report: Any, prof: Any, family: str, k: int, step_s: list[float], cuda: bool, top: int = 30) -> None:
    """Where K profiled steps spend their time: ops by self device time (what the GPU runs) and by self host
    time (what the training thread spends launching it; cuDNN graph builds for new shapes show up here)."""
    import device_gaps

    prof.__exit__(None, None, None)
    averages = prof.key_averages()
    # the ops (aten and the optimizer step) for the tables; the device's own events (kernels, copies) for the
    # busy time, where an op's device time would count its kernels a second time
    events = [e for e in averages if e.key.startswith(("aten::", "Optimizer"))]
    # device time of the kernels and copies themselves, not of the annotations' device-side ranges (the phases,
    # ProfilerStep, a compiled region), which span kernels counted already (with them SDXL's "busy" came to
    # 132 % of its step), nor of the aten ops, whose self device time is their kernels'
    busy = sum(e.self_device_time_total for e in averages if device_gaps.is_device_work(e)) / k / 1e3
    wall_ms = sum(step_s) / k * 1e3
    ops = [e for e in prof.events() if e.name.startswith("aten::")]
    outer = sum(1 for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    ranked = sorted(events, key=lambda e: -e.self_device_time_total) if cuda else []
    if ranked:
        # the tail and the busy time no op owns: SDXL's top 15 ops held only a third of its step (§5e)
        rest = ranked[top:]
        # (aten ops only: the optimizer's row is an annotation over its own aten kernels)
        owned = sum(e.self_device_time_total for e in ranked if e.key.startswith("aten::")) / k / 1e3
        rows = [[e.key[:70], e.count / k, e.self_device_time_total / k / 1e3,
                 100 * e.self_device_time_total / k / 1e3 / wall_ms] for e in ranked[:top]]
        rows.append([f"the other {len(rest)} ops", sum(e.count for e in rest) / k,
                     sum(e.self_device_time_total for e in rest) / k / 1e3,
                     100 * sum(e.self_device_time_total for e in rest) / k / 1e3 / wall_ms])
        rows.append(["device time under no op (busy - all ops)", float("nan"), busy - owned,
                     100 * (busy - owned) / wall_ms])
        report.table(f"{family}: profile of {k} steps, top ops by self device time (per step)",
                     ["op", "calls/step", "device ms/step", "% of step"], rows)
    host = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    report.table(f"{family}: profile of {k} steps, top ops by self host time (per step)",
                 ["op", "calls/step", "host ms/step", "% of step"],
                 [[e.key[:70], e.count / k, e.self_cpu_time_total / k / 1e3,
                   100 * e.self_cpu_time_total / k / 1e3 / wall_ms] for e in host])
    phase_table(report, prof, family, k, cuda)
    # the ops dispatched from Python or autograd (not inside another op) outside every compiled graph
    eager = collections.Counter(e.name for e in ops if not in_compiled_graph(e)
                                and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    if len(eager) < len(set(e.name for e in ops)):  # (something ran compiled: else this is the table above again)
        report.table(f"{family}: profile of {k} steps, ops launched outside the compiled graphs (per step)",
                     ["op", "calls/step"], [[name[:70], n / k] for name, n in eager.most_common(top // 2)])
        report.notes.append(f"{family} profile: {sum(eager.values()) / k:.0f} aten calls per step outside the "
                            "compiled graphs: what stays launched from the host when the graphs replay as CUDA "
                            "graphs (the adapter's eager encoding, the loss, the optimizer, the data's copies)")
    report.notes.append(f"{family} profile: {len(ops) / k:.0f} aten calls per step ({outer / k:.0f} not inside "
                        "another aten op: dispatched from Python or autograd)")
    report.notes.append(f"{family} profile: {wall_ms:.1f} ms per step under the profiler; device busy "
                        f"{busy:.1f} ms per step ({100 * busy / wall_ms:.0f} %)" if cuda else
                        f"{family} profile: {wall_ms:.1f} ms per step under the profiler (CPU: no device time)")


COMPILED_REGIONS = ("Torch-Compiled Region", "CompiledFunction", "## Call CompiledFxGraph")


def in_compiled_graph(event: Any) -> bool:
    """Whether a profiler event ran inside a compiled graph (forward or backward): under one of the ranges torch
    puts around a compiled call."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(COMPILED_REGIONS):
            return True
        parent = parent.cpu_parent
    return False


def phase_table(report: Any, prof: Any, family: str, k: int, cuda: bool) -> None:
    """Per phase of the profiled steps: host time and (CUDA) the device time launched from it and the
    device idle time charged to it (bench/device_gaps.py)."""
    import device_gaps

    windows, acts, linked = device_gaps.from_profiler(prof)
    rows, totals = device_gaps.attribute(windows, acts)
    headers = ["phase", "host ms/step"] + (["device busy launched ms/step", "idle: waiting for the host ms/step",
                                            "idle: other waits ms/step"] if cuda else [])
    report.table(f"{family}: profile of {k} steps, by phase" + (": where the device is idle" if cuda else ""),
                 headers, [[r.phase, r.host_ms / k] + ([r.launched_busy_ms / k, r.idle_host_bound_ms / k,
                                                        r.idle_other_ms / k] if cuda else []) for r in rows])
    if cuda:
        report.notes.append(
            f"{family} phases: step {totals['wall_ms'] / k:.1f} ms, device busy {totals['busy_ms'] / k:.1f} ms, "
            f"idle {totals['idle_ms'] / k:.1f} ms per step; device activities linked to their launch: {linked}. "
            "Idle time is charged to the phase that launched the activity ending it: 'waiting for the host' when "
            "the launch came after the device ran out of work, 'other waits' when it was launched in time "
            "(stream waits, syncs).")


def _row(opts: Any, family: str, res: int, bsz: int, spec: Any, steps: list[float], timed: slice,
         marks: dict[str, list[float]], moved: list[float], pm: Any, out_dir: Path,
         step_tflop: dict[str, float]) -> list[Any]:
    """One model's row of the per-step table from its timed steps and the run's marks."""
    step = common.median(steps)

    def per_step(xs: list[float]) -> list[float]:  # grad_accum calls per optimizer step
        k = max(1, len(xs) // max(1, len(marks["start"])))
        return [sum(xs[i * k:(i + 1) * k]) for i in range(len(marks["start"]))][timed]

    t_wait = common.median(per_step(marks["wait"])) if marks["wait"] else float("nan")
    t_prep = common.median(per_step(marks["prep"][:len(marks["wait"])])) if marks["prep"] else float("nan")
    return [family, res, bsz, f"{spec.hidden_size}x{spec.num_layers}", step * 1e3, bsz / step,
            t_wait * 1e3, t_prep * 1e3, (step - t_wait) * 1e3, 100 * common.spread(steps),
            min(steps) * 1e3, max(steps) * 1e3,
            (sum(moved) / len(moved) / 2 ** 20) if moved else float("nan"), common.gib(pm.peak_gib),
            TARGET[family] if not opts.small else "n/a (GPU)", _last_loss(out_dir),
            "n/a (--small)" if opts.small else "n/a (--no-floor)" if family not in step_tflop
            else 100 * bsz / step * step_tflop[family] / H100_DENSE_BF16_TFLOPS]


def _last_loss(out_dir: Path) -> float:
    try:
        rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if r.get("loss") is not None]
        return float(losses[-1]) if losses else float("nan")
    except OSError:
        return float("nan")


def per_op_table(report: Any, family: str, r: Any, top: int = 20) -> None:
    """The eager roofline of one step split by aten op (meta device, the bench's batch): set beside the
    profile's device time per op, it says how far each kind of kernel runs from its bound (§5e)."""
    ops: dict[str, list[float]] = {}
    for counter in r.traffic:  # forward, backward
        for op, values in counter.per_op().items():
            ops[op] = [a + b for a, b in zip(ops.get(op, [0.0] * 4), values)]
    total = sum(v[3] for v in ops.values())
    ranked = sorted(ops.items(), key=lambda kv: -kv[1][3])
    report.table(f"{family}: eager roofline by op, per step of {r.rows} images (meta device; attention as the "
                 "memory-efficient kernels)", ["op", "calls/step", "GB", "TFLOP", "roofline ms/step", "% of roofline"],
                 [[op, v[0], v[2] / 1e9, v[1] / 1e12, 1e3 * v[3], 100 * v[3] / total] for op, v in ranked[:top]]
                 + [[f"all {len(ops)} ops", sum(v[0] for v in ops.values()), sum(v[2] for v in ops.values()) / 1e9,
                     sum(v[1] for v in ops.values()) / 1e12, 1e3 * total, 100.0]])


def floor_table(report: Any, opts: Any) -> dict[str, float]:
    """The real-shape training FLOPs per image (bench/flop_floor.real_shape_training) and what the targets
    and the issue's reference points mean in throughput; returns step TFLOP per image per family."""
    import builders
    import flop_floor

    ref_img_s = {"sd15": 103.0, "sdxl": 14.3}
    peak = H100_DENSE_BF16_TFLOPS
    rows, per_image, roofline = [], {}, []
    for family in [m for m in opts.models.split(",") if m]:
        batch = opts.batch_of[family] if not opts.small else 2  # (the real shapes: --small's batch is 2 anyway)
        for r in flop_floor.real_shape_training(family, [opts.mode], builders.llm_spec("8b"), 129,
                                                opts.caption_words, rows=batch):
            fwd, bwd = r.forward / r.rows / 1e12, r.backward / r.rows / 1e12
            per_image[family] = fwd + bwd
            need = TARGET[family] * (fwd + bwd)
            ref = ref_img_s[family] * (fwd + bwd)
            rows.append([family, builders.unet_shape(family, False).pixels, r.mode, fwd, bwd, bwd / fwd, fwd + bwd,
                         TARGET[family], need, 100 * need / peak, ref_img_s[family], ref, 100 * ref / peak])
            forward_bytes, backward_bytes = (t.total for t in r.traffic)
            moved = forward_bytes + backward_bytes
            flop_ms, byte_ms = 1e3 * (fwd + bwd) / peak, 1e3 * moved / r.rows / common.H100_BYTES  # per image
            kernel_ms, memory_ms = (1e3 * sum(t.kernel_bound()[i] for t in r.traffic) / r.rows for i in (0, 1))
            by_op: collections.Counter[str] = collections.Counter()
            for t in r.traffic:
                by_op.update(t.by_op)
            roofline.append([family, r.mode, moved / r.rows / 1e9, backward_bytes / forward_bytes, flop_ms, byte_ms,
                             kernel_ms, memory_ms, 1e3 / kernel_ms, 1e3 / flop_ms, TARGET[family],
                             ", ".join(f"{op} {100 * b / moved:.0f} %" for op, b in by_op.most_common(4))])
            per_op_table(report, family, r)
    report.table("training FLOPs per image at the real shapes (meta device, product code path, Llama-3-8B features, "
                 f"{opts.caption_words}-token captions, bf16)",
                 ["model", "px", "adapter", "forward TFLOP", "backward TFLOP", "backward / forward", "step TFLOP",
                  "target img/s", "target needs TFLOP/s", "% of H100 bf16 peak", "issue reference img/s",
                  "reference TFLOP/s", "reference % of peak"], rows)
    report.notes.append(f"H100 SXM dense bf16 peak taken as {peak:.0f} TFLOP/s. backward / forward ~1.1: the frozen "
                        "U-Net computes activation gradients only (tests/test_train_run.py checks this on a real "
                        "step); the adapter's own gradients are small.")
    report.table("eager roofline per image (the same meta step: bytes each op reads and writes, bench/traffic.py)",
                 ["model", "adapter", "GB moved (eager, unfused)", "backward / forward bytes",
                  "ms at bf16 peak (all FLOPs)", f"ms at {common.H100_BYTES / 1e12} TB/s (all bytes)",
                  "per-kernel roofline ms", "of which memory-bound kernels ms", "bound img/s (eager)",
                  "bound img/s (FLOPs only)", "target img/s", "most bytes"], roofline)
    report.notes.append("An eager step runs one kernel per op: its traffic is every op's inputs and outputs (attention "
                        "as the fused memory-efficient kernels). The per-kernel roofline sums max(FLOPs / peak, bytes / "
                        "bandwidth) over the step's kernels at 100 % of both peaks, so a real eager step is slower; "
                        "a compiled U-Net fuses elementwise ops and norms into their neighbours, which cuts the bytes "
                        "(the memory-bound kernels), not the FLOPs: 'FLOPs only' is the bound if fusion hid every "
                        "byte of traffic.")
    return per_image


if __name__ == "__main__":
    main()
