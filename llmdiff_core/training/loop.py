"""The training loop: micro-batches -> loss through the patched U-Net -> AdamW step, with accelerate.

Determinism (what the resume and multi-process tests rely on): every random draw of a sample
(timestep, noise, caption dropout, Langevin noise) comes from that sample's own seed, the data order
is a function of (seed, epoch, process), and a checkpoint restores optimizer, scheduler, EMA, RNG and
data position. So k steps + resume = an uninterrupted run, and one process with batch 4 = two
processes with batch 2 (up to float summation order).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..adapter import LLMDiffAdapter
from ..attention import attended_span
from ..adapter_runtime import TrainingCall
from ..errors import LLMDiffError
from ..features import LLMFeatures, LLMSpec
from . import checkpointing, device_copy, objective, previews
from .buckets import LATENT_SCALE
from .data import AlreadyTrained, Position, SkipCounter, sample_seed
from .encoders import CompactFeatures, Conditioning, drop_captions, expand_features
from .ema import EMA
from .options import TrainOptions, validation_size
from .patching import feature_batch, training_options, uncompiled
from .prefetch import Prefetcher
from .schedule import lr_lambda
from .tracking import Tracker, device_memory

log = logging.getLogger("llmdiff.train")


class TrainingStopped(Exception):
    """The run stopped early on purpose (NaN/inf loss); the message says why and what to do."""

    exit_code = 3


def sdxl_adm(model: Any, cond: Conditioning) -> torch.Tensor:
    """SDXL's y per sample: the pooled vector + size conditioning (the image's size before resizing, the crop's
    offset, the target: the batch's size, square or its aspect-ratio bucket), as CLIPTextEncodeSDXL gives the
    sampler. No pooled output (paper mode without CLIP): zeros."""
    pooled = cond.pooled if cond.pooled is not None else torch.zeros(len(cond.keys), 1280)
    target_h, target_w = (LATENT_SCALE * int(n) for n in cond.latents.shape[-2:])
    rows = []
    for i, (h, w, top, left) in enumerate(cond.sizes):
        rows.append(model.encode_adm(pooled_output=pooled[i:i + 1], width=w, height=h, crop_w=left, crop_h=top,
                                     target_width=target_w, target_height=target_h))
    return torch.cat(rows)


class TrainModule(nn.Module):
    """adapter + the frozen patched U-Net; forward = per-sample loss. accelerate wraps this module
    (DDP sees only the adapter's parameters: the U-Net is held outside the module tree).
    langevin_noise: the score encoding adds its noise, each sample's from its encoder seed.
    whole_bucket: every batch attended over its whole token bucket (TrainingCall.whole_bucket: one graph for
    a compiled U-Net; encoded only up to its span's end either way), else only up to that end."""

    def __init__(self, adapter: LLMDiffAdapter, patched: Any, spec: LLMSpec, prediction: str,
                 min_snr_gamma: float, context_dim: int, langevin_noise: bool, whole_bucket: bool = False) -> None:
        super().__init__()
        self.adapter = adapter
        self._frozen = (patched,)  # a tuple is not registered as a submodule
        self.langevin_noise = langevin_noise
        self.whole_bucket = whole_bucket
        self.spec = spec
        self.prediction = prediction
        self.min_snr_gamma = min_snr_gamma
        self.context_dim = context_dim

    @property
    def patched(self) -> Any:
        return self._frozen[0]

    def forward(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
                scores: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None, y: torch.Tensor | None,
                encoder_seeds: list[int], layers: tuple[int, ...] | None = None, num_tokens: int | None = None,
                host_mask: device_copy.HostOnly | None = None, noise_tokens: int | None = None) -> torch.Tensor:
        model = self.patched.model
        ms = self.patched.get_model_object("model_sampling")
        sigma = ms.sigma(timesteps).to(latents.device, torch.float32)
        x_t = ms.noise_scaling(sigma, noise, latents)
        if context is None:  # paper mode: the APPLY_MODEL wrapper puts phi(c) in its place
            context = latents.new_zeros(latents.shape[0], 1, self.context_dim)
        if layers is None:
            features = LLMFeatures(self.spec, hidden, scores, mask)
        else:  # compact features from the cache (encoders.CompactFeatures), expanded here on the device
            features = expand_features(self.spec, hidden, scores, mask, layers, int(num_tokens or mask.shape[1]))
        call = TrainingCall(tuple(encoder_seeds) if self.langevin_noise else None,
                            None if host_mask is None else host_mask.tensor, noise_tokens, self.whole_bucket)
        to = training_options(self.patched, call)
        kwargs: dict[str, Any] = {"c_crossattn": context, "transformer_options": to, "llmdiff": feature_batch(features)}
        if y is not None:
            kwargs["y"] = y
        x0_hat = model.apply_model(x_t, sigma, **kwargs)
        return objective.diffusion_loss(x0_hat, latents, sigma, self.prediction, self.min_snr_gamma)


@dataclass
class RunState:
    step: int = 0
    position: Position = field(default_factory=Position)
    images_seen: int = 0
    last_loss: float = float("nan")
    skipped: SkipCounter = field(default_factory=SkipCounter)


class StopFlag:
    """SIGTERM / Ctrl-C request a checkpoint and a clean exit at the next step boundary; a second
    Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (embedded use): no handlers
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: writing a checkpoint after this step, then stopping (Ctrl-C again to abort)",
                    self.requested)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


@dataclass
class Picked:
    """A micro-batch's samples as the data stream gave them, not read yet (Trainer.pick_samples)."""
    items: list[Any]
    seeds: list[int]
    position: Position  # the data position after this batch's last entry
    skipped: list[tuple[str, str]]  # (key, problem) of entries passed over for it


@dataclass
class Batch:
    cond: Conditioning
    seeds: list[int]
    position: Position  # the data position after this batch's last entry
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, problem) of entries passed over for it


@dataclass
class StepRecord:
    """What the host reads of an optimizer step, once the device has finished that step.

    values: [loss, non-finite (> 0: the loss or the gradient norm was not finite), stop requests, skipped
    entries] (over all processes), then with `log` every site's w_orig and w_new; on the device until
    read(). It is copied to page-locked host memory without blocking and an event marks the copy, so
    read() waits for this step only, while the device goes on with the steps queued after it.
    """

    step: int
    lr: float
    images: int
    log: bool
    host_period_s: float  # host time since the previous step was queued (in steady state: the step's time)
    values: torch.Tensor
    copied: Any = None  # torch.cuda.Event on CUDA

    def __post_init__(self) -> None:
        if self.values.device.type == "cuda":
            host = torch.empty(self.values.shape, dtype=self.values.dtype, pin_memory=True)
            host.copy_(self.values, non_blocking=True)
            self.values, self.copied = host, torch.cuda.Event()
            self.copied.record()

    def read(self) -> list[float]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.values.tolist()


class Trainer:
    def __init__(self, opts: TrainOptions, accelerator: Any, module: TrainModule, base_patcher: Any,
                 items: Iterator[Any], make_conditioning: Any, empty: tuple, vae: Any,
                 validation: list[previews.PromptConds], summary: dict[str, Any]) -> None:
        self.opts = opts
        self.acc = accelerator
        self.module = module
        self.adapter = module.adapter
        self.base_patcher = base_patcher
        self.items = items
        self.make_conditioning = make_conditioning  # list of items -> Conditioning
        self.empty = empty
        self.vae = vae
        self.validation = validation
        self.summary = summary
        self.state = RunState()
        self.model = module.patched.model
        self.ms = module.patched.get_model_object("model_sampling")
        self.n_timesteps = objective.num_timesteps(self.ms)
        self.is_sdxl = module.adapter.config.base == "sdxl"
        self.resolution = summary["resolution"]
        self.stop = StopFlag()
        self.prefetch = False  # runner: True when batches come from the feature cache (pure host work)
        self._prefetcher: Prefetcher[Picked, tuple[Batch, Any]] | None = None
        self._last_step_start = 0.0
        self._stager: device_copy.DeviceStager | None = None  # made with the first batch (take_batch)
        self._waiting: dict[tuple[int, int], list[Any]] = {}  # samples read, by their bucket, until it has a batch

    # --- setup ----------------------------------------------------------------------------------
    def build_optimizer(self) -> None:
        decay, no_decay = [], []
        for name, p in self.adapter.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.opts.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        kwargs: dict[str, Any] = {"lr": self.opts.lr, "betas": (self.opts.adam_beta1, self.opts.adam_beta2),
                                  "eps": self.opts.adam_eps}
        # fused AdamW on GPUs (one kernel for all parameters); foreach elsewhere
        # (torch's own default off CUDA is a Python loop per parameter: ~10 ops and a .item() each)
        kwargs["fused" if self.acc.device.type == "cuda" else "foreach"] = True
        self.optimizer = torch.optim.AdamW(groups, **kwargs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.opts.warmup_steps, self.opts.max_steps, self.opts.lr_schedule,
                                      self.opts.min_lr_ratio))
        self.ema = EMA(self.adapter, self.opts.ema_decay) if self.opts.ema_decay > 0 else None
        # Only the module and optimizer go through accelerate: a prepared scheduler would step once
        # per process per step (accelerate's convention), ours counts optimizer steps.
        self.ddp_module, self.optimizer = self.acc.prepare(self.module, self.optimizer)

    def resume(self, checkpoint: Path) -> None:
        from ..adapter_file import load_adapter

        state = checkpointing.load_state(checkpoint)
        saved = load_adapter(checkpoint / checkpointing.ADAPTER_FILE)
        with torch.no_grad():
            for name, p in self.adapter.state_dict().items():
                p.copy_(saved.state_dict()[name].to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        procs = state["processes"]
        rank, world = self.acc.process_index, self.acc.num_processes
        if len(procs) == world:
            mine = procs[rank]
            checkpointing.set_rng_state(mine["rng"])
            self.state.position = Position.from_dict(mine["position"])
        else:
            # Another process count: the per-process streams differ, so restart the saved epoch's
            # share at the same fraction (approximately where the run was).
            first = Position.from_dict(procs[0]["position"])
            self.state.position = Position(first.epoch, first.consumed * len(procs) // world)
            log.warning("resuming with %d processes from a checkpoint written by %d: data order continues "
                        "approximately, not exactly", world, len(procs))
        self.state.step = int(state["step"])
        self.state.images_seen = int(state.get("images_seen", 0))
        self.state.skipped.merge(state.get("skipped", {}))
        self.acc.print(f"resumed from {checkpoint} at step {self.state.step}")

    # --- data -----------------------------------------------------------------------------------
    def pick_samples(self) -> Picked:
        """B usable samples of one size (one bucket with aspect-ratio buckets) from this process's stream; broken
        ones are passed over and listed. A sample waits in its size's queue until B are there, in stream order;
        without buckets every sample has the same size, so batches are simply the stream in order. Nothing is
        read yet (cached samples are places in the cache's files): _prepare_batch collates and reads them.

        Reads only the data stream (it may run in a prefetch thread, one batch at a time): the run state takes the
        batch's position (with the samples still waiting) and skipped entries in take_batch.
        """
        skipped: list[tuple[str, str]] = []
        skipped_in_a_row = 0
        while True:
            item = next(self.items)
            if isinstance(item, AlreadyTrained):  # a resumed stream's way back to the entries still waiting
                continue
            last_read = Position(item.epoch, item.position)
            if item.problem is not None:
                skipped.append((item.key, item.problem))
                skipped_in_a_row += 1
                if skipped_in_a_row > 10000:
                    raise LLMDiffError("10000 dataset entries in a row were unusable; see the skipped examples in "
                                       "metrics.jsonl and check --data / --data-format")
                continue
            skipped_in_a_row = 0
            queue = self._waiting.setdefault(item.bucket, [])
            queue.append(item)
            if len(queue) == self.opts.batch_size:
                break
        got = self._waiting.pop(item.bucket)
        waiting = tuple(sorted((it.epoch, it.position) for q in self._waiting.values() for it in q))
        seeds = [sample_seed(self.opts.seed, it.epoch, it.key) for it in got]
        position = Position(last_read.epoch, last_read.consumed, waiting)
        return Picked(got, seeds, position, skipped)

    def _prepare_batch(self, picked: Picked) -> tuple[Batch, Any]:
        """The picked samples as a batch and its inputs, staged for the device (on CUDA with the prefetcher: being
        copied). Touches only the batch's own tensors: prefetch threads run it side by side."""
        assert self._stager is not None
        batch = Batch(self.make_conditioning(picked.items), picked.seeds, picked.position, picked.skipped)
        return batch, self._stager.start(self._host_inputs(batch))

    def take_batch(self) -> dict[str, Any]:
        """The next micro-batch's inputs on the device; the run state moves past it."""
        if self._stager is None:  # copies on the training thread's stream; with the prefetcher, on a side stream
            self._stager = device_copy.DeviceStager(self.acc.device,
                                                    side_stream=self.prefetch and device_copy.SIDE_STREAM)
        if self.prefetch and self._prefetcher is None:
            self._prefetcher = Prefetcher(self.pick_samples, self._prepare_batch, self.opts.prefetch_batches)
        if self._prefetcher is None:
            batch, staged = self._prepare_batch(self.pick_samples())
        else:
            batch, staged = self._prefetcher.take()
        self.state.position = batch.position
        for key, problem in batch.skipped:
            self.state.skipped.add(key, problem)
        return self._device_inputs(staged)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def _adm(self, cond: Conditioning) -> torch.Tensor | None:
        return sdxl_adm(self.model, cond) if self.is_sdxl else None

    def _host_inputs(self, batch: Batch) -> dict[str, Any]:
        """The module's inputs on the host: draws, caption dropout, latent scaling, SDXL's y."""
        cond = batch.cond
        shape = tuple(cond.latents.shape[1:])
        draw = objective.draw(batch.seeds, shape, self.n_timesteps, self.opts.caption_dropout, self.opts.noise_offset)
        cond = drop_captions(cond, draw.drop_caption, self.empty)
        feats = cond.features
        llm: dict[str, Any]
        if isinstance(feats, CompactFeatures):  # stored layers, stored dtype, batch-longest tokens
            # expanded on the device only up to the attended span's end (all the adapter reads), not to
            # the bucket, even when the module attends over the whole bucket (the keys past the span are
            # padding); the Langevin draws stay at the bucket (noise_tokens) and are cut to match
            width = max(attended_span(feats.mask, feats.max_tokens)[1], feats.num_tokens)
            llm = {"hidden": feats.hidden, "scores": feats.scores, "mask": feats.mask, "layers": feats.layers,
                   "num_tokens": width, "noise_tokens": feats.max_tokens}
        else:
            llm = {"hidden": feats.hidden, "scores": feats.scores, "mask": feats.mask}  # (noise: at their bucket)
        llm["host_mask"] = device_copy.HostOnly(feats.mask)  # the span is decided on it: no device sync
        return {"latents": self.model.process_latent_in(cond.latents), "noise": draw.noise,
                "timesteps": draw.timesteps, **llm, "context": cond.clip, "y": self._adm(cond),
                "encoder_seeds": draw.encoder_seeds}

    def _device_inputs(self, staged: Any) -> dict[str, Any]:
        """A prepared batch's inputs on the device, ready for the training thread's stream."""
        assert self._stager is not None
        return self._stager.finish(staged)

    # --- the loop -------------------------------------------------------------------------------
    def run(self, tracker: Tracker) -> str:
        """Train to max_steps (or until stopped). Returns 'done' or the signal name.

        The host reads a step's loss (and checks it) while the device runs the next one: reading it at once
        would drain the device every step and leave it idle while the host prepares the next (StepRecord).
        So a non-finite loss is caught one step late, and before anything is saved or sampled: a checkpoint,
        validation images, the export and a stop read the current step first (settle).
        """
        opts = self.opts
        self.stop.install()
        pending: StepRecord | None = None
        if self.acc.device.type == "cuda":  # gpu_peak_gib is training's, not the feature cache build's (the LLM)
            torch.cuda.reset_peak_memory_stats(self.acc.device)

        def settle() -> bool:  # reads the step just queued; True: another process asks to stop
            nonlocal pending
            asked = pending is not None and self._finish(pending, tracker)
            pending = None
            return asked
        try:
            while self.state.step < opts.max_steps:
                record = self.train_step()
                self.state.step += 1
                step = self.state.step
                self.state.images_seen += record.images
                finished, pending = pending, record
                asked = finished is not None and self._finish(finished, tracker)  # the step before: done or nearly
                # one process stops when asked; several agree through the records, so a step later
                stop = self.stop.requested is not None if self.acc.num_processes == 1 else asked
                validate = bool(opts.validate_every) and step % opts.validate_every == 0 and step != opts.max_steps
                save = bool(opts.checkpoint_every) and step % opts.checkpoint_every == 0 and step != opts.max_steps
                if stop or validate or save or step == opts.max_steps:
                    stop = settle() or stop
                if validate:
                    self.validate(tracker)
                if stop:
                    self.checkpoint()
                    tracker.message(f"stopped by {self.stop.requested or 'another process'} at step {step}; "
                                    f"checkpoint written, continue with --resume latest")
                    return self.stop.requested or "SIGTERM"
                if save:
                    self.checkpoint()
            settle()
            self.checkpoint()
            if self.validation:
                self.validate(tracker)
            return "done"
        finally:
            self.close()
            self.stop.restore()

    def train_step(self) -> StepRecord:
        """One optimizer step, queued on the device; what the host reads of it comes later (StepRecord)."""
        opts = self.opts
        self.ddp_module.train()
        losses = []
        for micro in range(opts.grad_accum):
            inputs = self.take_batch()
            last = micro == opts.grad_accum - 1
            ctx = self.acc.no_sync(self.ddp_module) if not last else _nullcontext()
            with ctx, self.acc.autocast():
                per_sample = self.ddp_module(**inputs)
                loss = per_sample.mean()
                if opts.debug_nan_at_step and self.state.step + 1 == opts.debug_nan_at_step:
                    loss = loss * float("nan")
                self.acc.backward(loss / opts.grad_accum)
            losses.append(loss.detach().float())
        step_loss = torch.stack(losses).mean().to(self.acc.device)
        bad = ~torch.isfinite(step_loss)
        if opts.max_grad_norm > 0:
            grad_norm = self.acc.clip_grad_norm_(self.adapter.parameters(), opts.max_grad_norm)
            if self.acc.mixed_precision != "fp16":  # (under fp16 the grad scaler handles overflowing steps)
                bad = bad | ~torch.isfinite(grad_norm)
        # A non-finite step is applied like any other and caught when its record is read: nothing of it
        # is saved (run() reads the current step before every checkpoint, validation and the export).
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.adapter)
        step = self.state.step + 1
        log = step % opts.log_every == 0 or step == opts.max_steps
        world = self.acc.num_processes
        zero = step_loss.new_zeros(())  # (python numbers join the vector as kernel arguments, not as copies)
        values = torch.stack([step_loss / world, bad.float(), zero + (self.stop.requested is not None),
                              zero + self.state.skipped.total])
        if world > 1:  # loss: the mean over processes; the others: sums
            values = self.acc.reduce(values, reduction="sum")
        if log:
            values = torch.cat([values, *(w.detach().float() for w in self.adapter.gate_weights())])
        now = time.perf_counter()
        record = StepRecord(step, self.scheduler.get_last_lr()[0], opts.batch_size * opts.grad_accum * world, log,
                            now - self._last_step_start if self._last_step_start else float("nan"), values)
        self._last_step_start = now
        return record

    def _finish(self, record: StepRecord, tracker: Tracker) -> bool:
        """Read a step's record (waiting for the device to finish that step only): stop on a non-finite loss,
        else log it. Returns whether another process asked to stop."""
        loss, bad, stop, skipped, *gates = record.read()
        if bad:
            raise TrainingStopped(self._nan_message(loss, record.step))
        self.state.last_loss = loss
        rate = tracker.step_done(record.step, record.images, loss, record.lr)
        if record.log:
            tracker.scalars(record.step, {"loss": loss, "lr": record.lr, "images_per_s": rate,
                                          "step_time_s": record.host_period_s, "skipped": int(skipped),
                                          **device_memory(self.acc.device)})
            n = len(gates) // 2
            tracker.gates(record.step, torch.tensor(gates[:n]), torch.tensor(gates[n:]))
        return stop > 0 and self.acc.num_processes > 1

    def _nan_message(self, loss: float, step: int) -> str:
        last = checkpointing.find_checkpoint(Path(self.opts.output_dir), "latest")
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return (f"the loss became {loss} at step {step}: training stopped, nothing from that step on was saved; "
                f"{where} (resume with --resume latest). Usual causes: a learning rate too high (try --lr "
                f"{self.opts.lr / 10:g}), fp16 overflow (use --mixed-precision bf16 or no), or broken data.")

    # --- checkpoints and validation --------------------------------------------------------------
    def checkpoint(self) -> Path | None:
        from accelerate.utils import gather_object

        mine = {"rng": checkpointing.rng_state(), "position": self.state.position.to_dict(),
                "skipped": self.state.skipped.to_dict()}
        procs = gather_object([mine]) if self.acc.num_processes > 1 else [mine]
        path = None
        if self.acc.is_main_process:
            skipped = SkipCounter()
            for p in procs:
                skipped.merge(p.pop("skipped"))
            self.adapter.config.training = self.training_summary(skipped)
            state = {"step": self.state.step, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(),
                     "ema": self.ema.state_dict() if self.ema is not None else None,
                     "processes": procs, "images_seen": self.state.images_seen, "skipped": skipped.to_dict(),
                     "world": self.acc.num_processes}
            path = checkpointing.save_checkpoint(Path(self.opts.output_dir), self.state.step, self.adapter, state,
                                                 self.opts.keep_checkpoints)
        self.acc.wait_for_everyone()
        return path

    def training_summary(self, skipped: SkipCounter | None = None) -> dict[str, Any]:
        s = dict(self.summary)
        s.update({"steps": self.state.step, "images_seen": self.state.images_seen,
                  "final_loss": None if not math.isfinite(self.state.last_loss) else round(self.state.last_loss, 6),
                  "processes": self.acc.num_processes})
        if skipped is not None:
            s["skipped_entries"] = skipped.total
        return s

    def validate(self, tracker: Tracker) -> None:
        if not self.validation:
            return
        if self.acc.is_main_process:
            backup = None
            if self.ema is not None:  # sample with the weights that will be exported
                backup = {k: v.detach().clone() for k, v in self.adapter.state_dict().items()}
                self.ema.copy_to(self.adapter)
            self.adapter.eval()
            try:
                size = validation_size(self.opts, self.resolution)
                patched = self.module.patched
                if self.opts.compile_unet:  # sampling would compile U-Net graphs of its own: sample eager
                    patched = uncompiled(patched)
                grid = previews.render(self.base_patcher, patched, self.vae, self.validation, size,
                                       self.opts.validation_steps, self.opts.validation_cfg,
                                       self.opts.validation_sampler, self.opts.validation_scheduler,
                                       self.opts.validation_seed)
                path = previews.save_grid(grid, Path(self.opts.output_dir) / "validation", self.state.step)
                tracker.image(self.state.step, "validation (base | adapter)", grid)
                tracker.message(f"validation images: {path}")
            finally:
                if backup is not None:
                    self.adapter.load_state_dict(backup)
                # ComfyUI's model management may have moved the adapter while sampling
                self.adapter.to(self.acc.device)
                self.adapter.train()
        self.acc.wait_for_everyone()


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None
