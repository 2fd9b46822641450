#!/usr/bin/env python3
"""Mutation check: does the test suite fail when the method's code is wrong?

Each mutant below is one small, plausible bug in the product code (a flipped mask, a dropped gate, a layer off
by one). The script applies one mutant at a time in a temporary git worktree of HEAD (the checkout is never
touched), runs `./test.sh -x` on the tests that should catch it, and prints a table: a mutant whose tests
still pass "survived", i.e. the suite cannot see that bug. The same tests run unmutated first.
Exit status 1 if any survived, 2 if tests could not run.

    scripts/mutants.py                 every mutant (~20-40 min on 2 cores: most die within seconds)
    scripts/mutants.py --only keep-ignored noise-offset-shape
    scripts/mutants.py --list

Not part of ./test.sh (too slow for every run); tests/test_mutants_table.py keeps the table in step with the
code: every mutant's text must occur exactly once in its file.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # occurs exactly once in path
    new: str
    tests: tuple[str, ...]  # the test files (or file::test ids) expected to catch it


CORE = "llmdiff_core/"
ADAPTER = ("tests/test_adapter_module.py",)
ENCODING = ("tests/test_encoding.py",)
PATCHING = ("tests/test_patching.py", "tests/test_run_preparation.py")
KERNEL = ("tests/test_fused_site.py",)
OBJECTIVE = ("tests/test_train_objective.py",)
FLOAT8 = ("tests/test_float8_linears.py",)
CONDITIONING = ("tests/test_conditioning.py", "tests/test_run_preparation.py")
TRAIN_DATA = ("tests/test_train_data.py",)
IMAGING = ("tests/test_train_imaging.py",)
ATOMIC = ("tests/test_atomic_files.py", "tests/test_adapter_file.py")
CHECKPOINTS = ("tests/test_checkpointing.py",)
# (single tests of a slow file)
INIT_ADAPTER = ("tests/test_train_run.py::test_init_adapter_starts_from_the_file_and_keeps_what_it_fixed",)
EMA_VALIDATION = ("tests/test_train_run.py::test_validation_samples_the_ema_weights_and_training_goes_on_from_its_own",)
LONG_CAPTIONS = ("tests/test_train_run.py::test_long_captions_are_truncated_with_one_warning_and_a_count",)
CAPTIONS_AS_PROMPTS = ("tests/test_train_run.py::test_training_captions_reach_the_llm_and_clip_as_the_node_gives_them",)
CLIP_LAST_LAYER = ("tests/test_train_run.py::test_clip_stop_at_layer_encodes_as_the_clip_set_last_layer_node",)
RESUME_REFUSED = ("tests/test_train_run.py::test_start_over_and_mismatched_resume_are_refused_by_name",)
CACHE_STALE = ("tests/test_train_run.py::test_a_dataset_changed_since_its_cache_was_built_is_said",)
CACHE_REFUSED = ("tests/test_train_run.py::test_a_feature_cache_made_with_other_settings_is_refused_by_name",)
BUCKETS = ("tests/test_train_run.py::test_aspect_buckets_train_batches_of_one_size_resume_exactly_and_cache_the_same",)
PREFETCHER = ("tests/test_train_run.py::test_prefetcher_keeps_order_builds_side_by_side_and_raises_where_the_batch_is_"
              "taken",)
CUDAGRAPHS_BACKEND = ("tests/test_patching_compiled.py::test_the_cudagraphs_backend_samples_prompts_of_every_span_as_eager",)
SDXL_SIZES = ("tests/test_sdxl_hybrid.py::test_sdxl_size_conditioning_passes_each_image_s_size_and_crop_by_name",)

MUTANTS: tuple[Mutant, ...] = (
    # the score encoding (DESIGN.md §1.1)
    Mutant("gate-layer-order", CORE + "adapter.py", 'torch.einsum("l,bltd->btd", g, ',
           'torch.einsum("l,bltd->btd", g.flip(0), ', ADAPTER),
    Mutant("noise-scale-2h", CORE + "adapter.py", "torch.sqrt(2.0 * F.softplus", "torch.sqrt(1.0 * F.softplus",
           ADAPTER),
    Mutant("last-layer", CORE + "adapter.py", "c = hidden[:, -1]", "c = hidden[:, -2]", ADAPTER),
    Mutant("mean-includes-h0", CORE + "adapter.py", "hidden[:, 1:].mean(dim=1)", "hidden.mean(dim=1)", ADAPTER),
    Mutant("c0-wrong-layer", CORE + "adapter.py", "c = hidden[:, 0] if self.c0", "c = hidden[:, 1] if self.c0",
           ADAPTER),
    Mutant("norm-no-affine", CORE + "adapter.py", "self.norm.bias.float().to(c.device), self.norm.eps",
           "None, self.norm.eps", ADAPTER),
    Mutant("pool-ignores-mask", CORE + "adapter.py", "mean = (c * m).sum(1)", "mean = c.sum(1)", PATCHING),
    Mutant("score-off-by-one", CORE + "encoding.py", "scores = hidden[:, 1:] - ", "scores = hidden[:, :-1] - ",
           ENCODING),
    Mutant("bos-always-attended", CORE + "encoding.py", "mask[:, 0] = lengths == 1", "mask[:, 0] = True", ENCODING),
    Mutant("diagonal-is-causal-sdpa", CORE + "encoding.py", "diagonal = eye\n", "diagonal = mask\n", ENCODING),
    Mutant("diagonal-inverted-eager", CORE + "encoding.py", "masked_fill(~eye, torch.finfo",
           "masked_fill(eye, torch.finfo", ENCODING),
    Mutant("padding-not-zeroed", CORE + "encoding.py", "out[:, :, :n] = x * real[:, None, :, None]",
           "out[:, :, :n] = x", ENCODING),
    Mutant("h0-not-the-first-input", CORE + "encoding.py", "self.hidden.append(h.float())  # H_0",
           "self.hidden.append(h.float() * 1.01)  # H_0", ENCODING),
    # the gates and the fusion (Eq. 10)
    Mutant("w-new-uses-b-orig", CORE + "adapter.py", "self.a_new.float() * torch.exp(self.b_new.float())",
           "self.a_new.float() * torch.exp(self.b_orig.float())", PATCHING),
    Mutant("strength-scales-orig", CORE + "attention.py", "return 1.0 + scale * (w_orig - 1.0), scale * w_new",
           "return scale * w_orig, scale * w_new", PATCHING),
    Mutant("strength-not-on-new", CORE + "attention.py", "return 1.0 + scale * (w_orig - 1.0), scale * w_new",
           "return 1.0 + scale * (w_orig - 1.0), w_new", PATCHING),
    Mutant("keep-ignored", CORE + "attention.py", "        out = out * keep\n", "        out = out\n", PATCHING),
    Mutant("span-stop-short", CORE + "attention.py", "columns[-1] + 1) if columns", "columns[-1]) if columns",
           PATCHING),
    Mutant("keyless-rows-all-masked", CORE + "attention.py", "span = mask[:, start:stop] | ~has_key[:, None]",
           "span = mask[:, start:stop]", PATCHING),
    Mutant("prefetch-selects-out-of-turn", CORE + "training/prefetch.py",
           "            self._turn.wait_for(lambda: self._selected == ticket)\n", "            pass\n", PREFETCHER),
    Mutant("prefetch-one-thread", CORE + "training/prefetch.py", "ThreadPoolExecutor(max_workers=depth,",
           "ThreadPoolExecutor(max_workers=1,", PREFETCHER),
    Mutant("side-stream-copies-pageable", CORE + "training/device_copy.py", "to_device(host, self.device, pin=True)",
           "to_device(host, self.device)", ("tests/test_device_copy.py",)),
    Mutant("scaled-gates-per-call", CORE + "run_entry.py", "        found = self.scaled.get(scale)\n",
           "        found = None\n", ("tests/test_host_reads.py",)),
    Mutant("cudagraphs-key-length-dynamic", CORE + "attention.py", '        return "static"\n',
           '        return "dynamic"\n', CUDAGRAPHS_BACKEND),
    Mutant("kept-entry-ignores-key-length", CORE + "run_entry.py", "and self.mask.key_length == key_length and ",
           "and ", CUDAGRAPHS_BACKEND),
    Mutant("bias-correction-tensor-gate", CORE + "attention.py", "fused + (1.0 - w_orig) * out_bias",
           "fused + w_orig * out_bias", PATCHING),
    Mutant("bias-correction-float-gate", CORE + "attention.py", "else (1.0 - w_orig) * out_bias",
           "else w_orig * out_bias", PATCHING),
    Mutant("core-fusion-drops-w-orig", CORE + "attention.py", "torch.addcmul(scaled_new, a_orig, w_orig)",
           "torch.add(scaled_new, a_orig)", PATCHING),
    Mutant("kernel-no-score-scale", CORE + "fused_site.py", "s = tl.dot(q, k) * scale", "s = tl.dot(q, k)", KERNEL),
    Mutant("kernel-keep-ignored", CORE + "fused_site.py", "o = o * tl.load(keep_ptr + b * keep_sb).to(tl.float32)",
           "o = o", KERNEL),
    Mutant("kernel-drops-w-orig", CORE + "fused_site.py",
           "fused = tl.load(wo_ptr).to(tl.float32) * a.to(tl.float32) + o", "fused = a.to(tl.float32) + o", KERNEL),
    Mutant("kernel-bias-ignored", CORE + "fused_site.py", "        if HAS_BIAS:\n            s +=",
           "        if False:\n            s +=", KERNEL),
    Mutant("long-spans-keep-the-short-spans-tiles", CORE + "fused_site.py",
           "if block_t >= 256 or (block_d == 256 and block_t >= 128 and not project):",
           "if False:", KERNEL),
    Mutant("kernel-on-turing", CORE + "fused_site.py", ">= MIN_CAPABILITY", ">= (7, 0)", KERNEL),
    Mutant("unfit-kernel-tried-at-every-call", CORE + "fused_site.py", "_UNFIT.add(variant)",
           "_UNFIT.discard(variant)", KERNEL),
    # per-site and per-row bookkeeping
    Mutant("block-groups-swapped", CORE + "block_weights.py",
           'group = {"input": input_weight, "middle": middle_weight, "output": output_weight}',
           'group = {"input": input_weight, "middle": output_weight, "output": middle_weight}',
           ("tests/test_prompt_and_weights.py",)),
    Mutant("block-weight-ignored", CORE + "run_entry.py", "effective_gates(wo, wn, scale * w)",
           "effective_gates(wo, wn, scale)", PATCHING),
    Mutant("uniform-block-weight-ignored-in-training", CORE + "run_entry.py",
           "s: Gate = scale * block_weights[0]", "s: Gate = scale", PATCHING),
    Mutant("paper-training-drops-w-orig", CORE + "run_entry.py",
           "orig = [v * g for (_, v), g in zip(self.orig_kv, w_orig.to(dtype).unbind())]",
           "orig = [v for (_, v), g in zip(self.orig_kv, w_orig.to(dtype).unbind())]", PATCHING),
    Mutant("new-path-off-skips-the-site", CORE + "run_entry.py",
           "new = [None if is_identity(wo, wn) else new_stack.views[i]",
           "new = [None if wn == 0.0 else new_stack.views[i]", PATCHING),
    Mutant("sigma-window-open", CORE + "adapter_runtime.py", "return self.sigma_end <= sigma <= self.sigma_start",
           "return self.sigma_end < sigma < self.sigma_start", PATCHING),
    Mutant("stack-gain-of-the-slot", CORE + "site_stacks.py", "torch.mul(stack[j], gains[i], out=out[j])",
           "torch.mul(stack[j], gains[j], out=out[j])", PATCHING),
    Mutant("stack-slot-lost", CORE + "site_stacks.py", "                where[i] = (g, j)\n",
           "                where[i] = (g, 0)\n", PATCHING),
    Mutant("process-cond-order", CORE + "conditioning.py", "self.rows[i % n] for i in range(batch_size)",
           "self.rows[(i + 1) % n] for i in range(batch_size)", CONDITIONING),
    Mutant("distinct-rows-reversed", CORE + "conditioning.py", "rows_of_part[p].append(row)",
           "rows_of_part[p].insert(0, row)", CONDITIONING),
    Mutant("concat-order", CORE + "conditioning.py", "for c in [self, *others]", "for c in [*others, self]",
           CONDITIONING),
    # training data and its conditioning
    Mutant("dropped-caption-keeps-its-hidden-states", CORE + "training/encoders.py",
           "features.hidden[idx] = e_feat.hidden[:1].to(features.hidden.dtype)",
           "features.hidden[idx] = features.hidden[idx]", TRAIN_DATA),
    Mutant("dropped-caption-keeps-its-clip", CORE + "training/encoders.py",
           "parts = [e_clip[0] if d else clip[i] for i, d in enumerate(drop)]",
           "parts = [clip[i] for i, d in enumerate(drop)]", TRAIN_DATA),
    Mutant("crop-offset-swapped", CORE + "training/imaging.py", "crop_top_left=(top, left))",
           "crop_top_left=(left, top))", IMAGING),
    Mutant("short-side-is-the-long-side", CORE + "training/imaging.py", "scale = max(tw / w, th / h)",
           "scale = min(tw / w, th / h)", IMAGING),
    Mutant("exif-orientation-ignored", CORE + "training/imaging.py", "img = ImageOps.exif_transpose(img)",
           "img = img", IMAGING),
    Mutant("transparency-on-black", CORE + "training/imaging.py", 'bg = Image.new("RGB", img.size, (255, 255, 255))',
           'bg = Image.new("RGB", img.size, (0, 0, 0))', IMAGING),
    Mutant("16-bit-grayscale-clipped-white", CORE + "training/imaging.py", 'if img.mode.startswith(("I", "F")):',
           "if False:", IMAGING),
    Mutant("sdxl-size-conditioning-swapped", CORE + "training/loop.py", "width=w, height=h", "width=h, height=w",
           ("tests/test_sdxl_hybrid.py",)),
    Mutant("sdxl-crop-conditioning-swapped", CORE + "training/loop.py", "crop_w=left, crop_h=top",
           "crop_w=top, crop_h=left", ("tests/test_sdxl_hybrid.py",)),
    # files that survive crashes, checkpoints a run resumes from
    Mutant("failed-write-leaves-its-temp", CORE + "atomic_files.py",
           "            tmp.unlink(missing_ok=True)\n        raise", "            pass\n        raise", ATOMIC),
    Mutant("durable-write-not-synced", CORE + "atomic_files.py", "            if durable:\n                _fsync(f)",
           "            if False:\n                _fsync(f)", ATOMIC),
    Mutant("prune-keeps-one-more", CORE + "training/checkpointing.py", "for old in done[:-keep]:",
           "for old in done[:-keep - 1]:", CHECKPOINTS),
    Mutant("latest-pointer-trusted", CORE + "training/checkpointing.py",
           "            if (p / STATE_FILE).exists():\n                return p",
           "            if True:\n                return p", CHECKPOINTS),
    # adapters that do not fit
    Mutant("site-dims-not-checked", CORE + "validation.py", "    if sites != config.sites:",
           "    if False and sites != config.sites:", ("tests/test_adapter_file.py",)),
    Mutant("llm-depth-not-checked", CORE + "validation.py",
           "if (spec.hidden_size, spec.num_layers) != (trained.hidden_size, trained.num_layers):",
           "if spec.hidden_size != trained.hidden_size:", ("tests/test_adapter_file.py",)),
    # cut-off dataset shards (session 25): skipped and counted, never a crash, never a silent loss
    Mutant("cut-shard-ends-silently", CORE + "training/sources.py", "        if _ends_early(tf):", "        if False:",
           TRAIN_DATA),
    Mutant("cut-gzip-shard-raises", CORE + "training/sources.py", "_CUT_OR_BROKEN = (OSError, EOFError, tarfile.TarError)",
           "_CUT_OR_BROKEN = (OSError, tarfile.TarError)", TRAIN_DATA),
    Mutant("image-cut-in-its-shard-raises", CORE + "training/sources.py",
           "except (tarfile.TarError, EOFError) as e:  # (the shard ends", "except EOFError as e:  # (the shard ends",
           TRAIN_DATA),
    Mutant("no-usable-manifest-line-skipped-one-by-one", CORE + "training/sources.py",
           "    if not entries or any(problem is None for *_, problem in entries):\n        return",
           "    if True:\n        return", TRAIN_DATA),
    Mutant("one-caption-of-several-every-epoch", CORE + "training/data.py",
           'random.Random(sample_seed(spec.seed, epoch, entry.key + "/caption"))', "random.Random(0)", TRAIN_DATA),
    Mutant("manifest-bom-kept", CORE + "training/sources.py", 'with open(path, encoding="utf-8-sig", newline="")',
           'with open(path, encoding="utf-8", newline="")', TRAIN_DATA),
    Mutant("dataset-checked-after-the-models-load", CORE + "training/runner.py",
           "    source = open_data(opts) if source is None else source\n", "    source = None\n", TRAIN_DATA),
    # long training captions: one warning and a count, not a warning each (session 25)
    Mutant("every-long-caption-warns", CORE + "encoding.py", "            if truncated is None:\n",
           "            if True:\n", LONG_CAPTIONS),
    # validation images under --ema-decay (session 25)
    Mutant("validation-samples-the-raw-weights", CORE + "training/loop.py",
           "                self.ema.copy_to(self.adapter)", "                pass", EMA_VALIDATION),
    Mutant("training-goes-on-from-the-ema", CORE + "training/loop.py",
           "                    self.adapter.load_state_dict(backup)", "                    pass", EMA_VALIDATION),
    # fine-tuning from an adapter file (session 25)
    Mutant("init-adapter-read-after-loading", CORE + "training/runner.py",
           "    opts, source = checked_before_loading(opts)  # (whether CLIP",
           "    source = open_data(opts)  # (whether CLIP", INIT_ADAPTER),
    Mutant("init-adapter-keeps-its-token-bucket", CORE + "training/runner.py",
           "adapter.config = dataclasses.replace(adapter.config, max_tokens=opts.max_tokens)", "pass", INIT_ADAPTER),
    # training captions as the node's prompts (session 26)
    Mutant("training-captions-keep-their-weights", CORE + "training/encoders.py",
           "[strip_prompt_weights(t) for t in texts]", "texts", CAPTIONS_AS_PROMPTS),
    Mutant("clip-stop-at-layer-ignored", CORE + "training/runner.py",
           "    if clip is None or not stop_at_layer:\n", "    if True:\n", CLIP_LAST_LAYER),
    Mutant("init-adapter-drops-its-clip-layer", CORE + "training/runner.py",
           '            changes["clip_stop_at_layer"] = layer\n', "            pass\n", CLIP_LAST_LAYER),
    Mutant("clip-stop-at-layer-not-in-the-cache-key", CORE + "training/runner.py",
           '            "clip_stop_at_layer": opts.clip_stop_at_layer,\n', "", CACHE_REFUSED),
    Mutant("resume-settings-unchecked", CORE + "training/runner.py",
           "              for name in FIXED_BY_THE_FILE if getattr(saved, name) != getattr(opts, name)]",
           "              for name in () if getattr(saved, name) != getattr(opts, name)]", RESUME_REFUSED),
    Mutant("start-over-on-checkpoints", CORE + "training/runner.py", "        if earlier is not None:\n",
           "        if False:\n", RESUME_REFUSED),
    Mutant("resume-models-unchecked", CORE + "training/runner.py", "        check_checkpoint_fits(ckpt, components)\n",
           "        pass\n", RESUME_REFUSED),
    Mutant("stale-cache-edits-unseen", CORE + "training/feature_cache.py", "    return now is not None and now != cached",
           "    return False", CACHE_STALE),
    Mutant("old-cache-format-read", CORE + "training/feature_cache.py",
           "    if version != CACHE_VERSION:\n", "    if False:\n", CACHE_REFUSED),
    Mutant("cache-format-checked-after-loading", CORE + "training/runner.py",
           "        feature_cache.check_format(Path(opts.cache_dir))\n    check_output_dir",
           "        pass\n    check_output_dir", CACHE_REFUSED),
    # aspect-ratio buckets (session 27)
    Mutant("bucket-resume-forgets-waiting", CORE + "training/data.py", "    epoch, skip = start.restart()\n",
           "    epoch, skip = start.epoch, start.consumed\n", TRAIN_DATA + BUCKETS),
    Mutant("bucket-waiting-not-checkpointed", CORE + "training/loop.py",
           "Position(last_read.epoch, last_read.consumed, waiting)", "Position(last_read.epoch, last_read.consumed)",
           BUCKETS),
    Mutant("bucket-nearest-transposed", CORE + "training/buckets.py", "abs(math.log(s[1] / s[0]) - aspect)",
           "abs(math.log(s[1] / s[0]) + aspect)", IMAGING + TRAIN_DATA),
    Mutant("bucket-cache-rows-mixed-up", CORE + "training/feature_cache.py",
           "rows.update({i: (cond, row) for row, i in enumerate(group)})",
           "rows.update({i: (cond, len(group) - 1 - row) for row, i in enumerate(group)})", BUCKETS),
    Mutant("buckets-not-in-the-cache-key", CORE + "training/runner.py",
           '**({"aspect_buckets": [list(b) for b in buckets]} if buckets else {})', "", CACHE_REFUSED),
    Mutant("sdxl-target-always-square", CORE + "training/loop.py", "target_width=target_w, target_height=target_h",
           "target_width=target_h, target_height=target_h", SDXL_SIZES),
    Mutant("validation-size-transposed", CORE + "training/options.py", "    return height, width\n",
           "    return width, height\n", TRAIN_DATA),
    # the training objective and schedule
    Mutant("ema-decay-without-warm-up", CORE + "training/ema.py",
           "d = min(self.decay, (1 + self.updates) / (10 + self.updates))", "d = self.decay", OBJECTIVE),
    Mutant("ema-lerps-the-wrong-way", CORE + "training/ema.py",
           "torch._foreach_lerp_([s for s, _ in pairs], [p for _, p in pairs], 1 - d)",
           "torch._foreach_lerp_([s for s, _ in pairs], [p for _, p in pairs], d)", OBJECTIVE),
    Mutant("warm-up-from-zero", CORE + "training/schedule.py", "return (step + 1) / warmup_steps",
           "return step / warmup_steps", OBJECTIVE),
    Mutant("cosine-ignores-min-ratio", CORE + "training/schedule.py", "return min_ratio + (1.0 - min_ratio) * 0.5",
           "return (1.0 - min_ratio) * 0.5", OBJECTIVE),
    Mutant("draws-share-one-seed", CORE + "training/objective.py", "g = torch.Generator().manual_seed(s)",
           "g = torch.Generator().manual_seed(seeds[0])", OBJECTIVE),
    Mutant("caption-dropout-inverted", CORE + "training/objective.py",
           "torch.rand((), generator=g) < caption_dropout", "torch.rand((), generator=g) > caption_dropout", OBJECTIVE),
    Mutant("v-loss-weight", CORE + "training/objective.py", 'w = snr if prediction == "eps" else snr + 1.0',
           "w = snr", OBJECTIVE),
    Mutant("min-snr-eps-off", CORE + "training/objective.py", "w = torch.clamp(snr, max=min_snr_gamma)",
           "w = torch.clamp(snr, max=min_snr_gamma) if prediction == 'v' else snr", OBJECTIVE),
    Mutant("noise-offset-shape", CORE + "training/objective.py", "torch.randn((latent_shape[0], 1, 1), generator=g)",
           "torch.randn(latent_shape, generator=g)", OBJECTIVE),
    Mutant("float8-backward-weight-scale", CORE + "training/float8_linears.py",
           "scale_a=g_scale, scale_b=scale, out_dtype=grad_y.dtype",
           "scale_a=g_scale, scale_b=torch.ones_like(scale), out_dtype=grad_y.dtype", FLOAT8),
    Mutant("float8-bias-dropped", CORE + "training/float8_linears.py", "            y = y + bias.to(y.dtype)\n",
           "            pass\n", FLOAT8),
    # compiled sampling (session 21): torch 2.11's dynamo breaks the graph on bool() of a dict; 2.13 traces it
    Mutant("site-path-bool-of-dict", CORE + "run_entry.py", "return len(self.pending) > 0 or len(self.deferred) > 0",
           "return bool(self.pending or self.deferred)", ("tests/test_torch_compat.py",)),
    # the site kernel a run takes (session 23): auto follows the run's compile, and an entry its kernel
    Mutant("auto-ignores-the-compile", CORE + "adapter_runtime.py",
           "fused_site.kernel_for_run(self.site_kernel, compile_kwargs)", "fused_site.kernel_for_run(self.site_kernel)",
           ("tests/test_fused_site.py",)),
    Mutant("entry-of-another-kernel-reused", CORE + "run_entry.py",
           "self.dtype == dtype and self.site_kernel == site_kernel", "self.dtype == dtype",
           ("tests/test_fused_site.py",)),
)


def check_table(root: Path = REPO) -> list[str]:
    """Problems with the table itself: a mutant whose text does not occur exactly once, a missing test file."""
    problems = []
    names = [m.name for m in MUTANTS]
    problems += [f"{n}: named twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for m in MUTANTS:
        source = root / m.path
        count = source.read_text().count(m.old) if source.is_file() else 0
        if count != 1:
            problems.append(f"{m.name}: its text occurs {count} times in {m.path} (must be once)")
        problems += [f"{m.name}: no test file {t}" for t in m.tests if not (root / t.split("::")[0]).is_file()]
    return problems


def run_tests(worktree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    """pytest's exit status (1 = a test failed; timed out counts as 1) and the first failure's line."""
    try:
        done = subprocess.run(["./test.sh", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=worktree,
                              capture_output=True, text=True, timeout=timeout)
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        status, output = 1, "timed out"
    first = next((line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))), output[-300:])
    return status, first.strip()


def run_mutant(worktree: Path, m: Mutant, timeout: float) -> tuple[str, float, str]:
    """(killed / survived / error, seconds, the first failure) for one mutant, applied and reverted in worktree.
    error: pytest could not run the tests (exit status other than 0 and 1), which says nothing of the mutant."""
    path = worktree / m.path
    original = path.read_text()
    path.write_text(original.replace(m.old, m.new, 1))
    start = time.monotonic()
    try:
        status, first = run_tests(worktree, m.tests, timeout)
    finally:
        path.write_text(original)
    verdict = {0: "**SURVIVED**", 1: "killed"}.get(status, "error")
    return verdict, time.monotonic() - start, "" if status == 0 else first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant (counts as killed)")
    args = parser.parse_args()
    problems = check_table()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        print(f"unknown mutants: {sorted(set(args.only) - {m.name for m in MUTANTS})}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:32} {m.path}  ->  {' '.join(m.tests)}")
        return 0
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="llmdiff-mutants-") as tmp:
        worktree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(worktree), "HEAD"], cwd=REPO, check=True)
        try:
            # the same tests unmutated first: a failure there would pass for a killed mutant
            status, first = run_tests(worktree, tuple(dict.fromkeys(t for m in chosen for t in m.tests)),
                                      args.timeout)
            if status != 0:
                print(f"the unmutated tests do not pass (pytest exit status {status}): {first}", file=sys.stderr)
                return 2
            print("| mutant | file | verdict | s | first failure |\n|---|---|---|---|---|", flush=True)
            for m in chosen:
                verdict, seconds, first = run_mutant(worktree, m, args.timeout)
                counts[verdict] = counts.get(verdict, 0) + 1
                print(f"| {m.name} | {m.path} | {verdict} | {seconds:.0f} | {first} |", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, check=False)
            shutil.rmtree(worktree, ignore_errors=True)
    survived, errors = counts.get("**SURVIVED**", 0), counts.get("error", 0)
    print(f"\n{counts.get('killed', 0)} of {len(chosen)} killed, {survived} survived, {errors} could not run")
    return 2 if errors else 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
