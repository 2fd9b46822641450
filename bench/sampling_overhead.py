"""Sampling overhead of the applied adapter vs the unpatched model, per step, plus the FLOP floor.

    python bench/sampling_overhead.py                 # GPU: SD1.5 512 px and SDXL 1024 px, 2 U-Net rows
    python bench/sampling_overhead.py --small         # CPU: tiny widths, real layouts (16 / 70 sites)

What is timed: comfy.sample.sample (what KSampler runs: euler, CFG 5, one latent -> the U-Net sees
cond + uncond = 2 rows), under inference_mode like a node. A sampler callback stamps the end of
every step (common.StepStamps), on CUDA two ways, each variant timed with both in the same rounds: synced
(the host waits for the device at every step, as with a preview; a step is its host work plus its device
work) and pipelined (CUDA events, the host runs ahead as when nothing reads a step; a step is the longer of
the two). The per-step time of a run is the median of the step-to-step gaps
(so ComfyUI's model loading and the adapter's once-per-run work, done in step 1, are left out and
reported separately as "step 1 extra"; "whole-run overhead %" compares whole runs, the per-run work and
the sampler's own setup included: what a user waits for). Variants (unpatched, hybrid adapter, paper adapter) run
interleaved in one process; the table gives the median over repeats.

FLOP floor (issue 5): torch.utils.flop_counter.FlopCounterMode counts
  - on the timed device: step 2 of a 2-step run of each variant (the adapter's per-run cache is
    warm by then), patched minus unpatched = the adapter's extra work per step;
  - at the real SD1.5 / SDXL shapes on the meta device (no weights, no GPU needed): the patched U-Net's
    own forward, step 2 of a run (bench/flop_floor.py), so the table counts what the product code executes
    per step (a prompt of --floor-tokens attended tokens in both rows, and --prompt-tokens + an empty negative).
"measured / FLOP" = (time overhead) / (FLOP overhead): 1.0 means the adapter costs exactly its FLOPs.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODE_NAMES = {"clip": "hybrid (clip)", "llm": "paper (llm)"}


def parse() -> Any:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sd15,sdxl", help="comma list of sd15, sdxl")
    p.add_argument("--modes", default="clip,llm", help="adapter original_path modes: clip (hybrid), llm (paper)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps per run (default 20 GPU, 6 --small)")
    p.add_argument("--rows", type=int, default=2, help="U-Net rows per step (latent batch = rows / 2 with CFG)")
    p.add_argument("--latent", type=int, default=None, help="latent side (default 64 SD1.5, 128 SDXL; 16 --small)")
    p.add_argument("--llm", choices=("tiny", "1b", "8b"), default=None,
                   help="LLM feature shape (default 8b; tiny --small)")
    p.add_argument("--tokens", type=int, default=128, help="LLM token bucket (max_tokens)")
    p.add_argument("--prompt-tokens", type=int, default=60, help="real tokens of the positive prompt (negative: empty)")
    p.add_argument("--adapter-dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                   help="the adapter's projections as Adapter Loader (LLMDiff) loads them: auto = its default "
                        "(fp16 on most GPUs, fp32 on CPU); fp32 = the training export as it is")
    p.add_argument("--compile", default=None, metavar="BACKEND",
                   help="time every variant under ComfyUI's torch.compile wrapper (what TorchCompileModel does): "
                        "inductor or cudagraphs as in that node, or any torch.compile backend (eager, aot_eager); "
                        f"{common.HOST_ONLY}: graphs that compute nothing after their first call, so a step is its "
                        "host work alone (common.host_only_backend); implies --no-flops")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode with --compile inductor (e.g. reduce-overhead = CUDA graphs, max-autotune)")
    p.add_argument("--attend", default="", metavar="IMPLS",
                   help="also time each adapter with its masked attention done another way (an A/B for the "
                        "product's llmdiff_core.attention.attend, which lets torch pick the SDPA backend): comma "
                        "list of efficient, cudnn, math (SDPA with that backend forced), bmm (matmul-softmax-matmul) "
                        "and unmasked (SDPA without the mask: wrong wherever tokens are masked, a lower bound on what "
                        "the mask costs)")
    p.add_argument("--site-kernel", default="", metavar="KERNELS",
                   help="hybrid mode: time the adapter with each of these site kernels (apply_adapter's site_kernel, "
                        "comma list: torch = the three kernels per site, fused = llmdiff_core/fused_site.py's one "
                        "Triton kernel, fused-attention = tau_q's GEMM then one kernel, auto = fused-attention under "
                        "inductor's CUDA graphs, else torch), a variant each against the same unpatched runs "
                        "(default: the product's setting alone, auto unless $LLMDIFF_SITE_KERNEL says otherwise)")
    p.add_argument("--keep-entries", action="store_true",
                   help="let each run take the last run's once-per-run entry, as a re-run of the same prompts does "
                        "in hybrid mode (default: every run builds its own, as a new prompt does)")
    p.add_argument("--step-clock", choices=("both", "pipelined", "synced"), default=None,
                   help="how steps are stamped (common.StepStamps): pipelined = CUDA events, the host runs ahead as "
                        "the sampler does when nothing reads a step's latent; synced = the host waits for the device "
                        "every step, as with a preview (the only clock before session 15); both = each variant "
                        "timed both ways in the same rounds (default on CUDA; on a CPU the two are one clock, so the "
                        "default there is synced)")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting on the timed device")
    p.add_argument("--no-real-flops", action="store_true", help="skip the real-shape FLOP floor (meta device)")
    p.add_argument("--floor-only", action="store_true", help="only the real-shape FLOP floor table (no timing)")
    p.add_argument("--floor-tokens", type=int, default=128,
                   help="real-shape FLOP table: attended LLM tokens of both rows in its first case (issue 5: 128)")
    opts = p.parse_args()
    opts.floor_prompt_tokens = opts.prompt_tokens  # the real-shape table's second case is never shrunk
    opts.no_flops = opts.no_flops or bool(opts.compile)  # FlopCounterMode does not see into compiled graphs
    common.defaults(opts, repeats=5 if opts.small else 7, warmup=1 if opts.small else 2)
    if opts.steps is None:
        opts.steps = 6 if opts.small else 20
    if opts.llm is None:
        opts.llm = "tiny" if opts.small else "8b"
    if opts.small:
        opts.tokens = min(opts.tokens, 32)
        opts.prompt_tokens = min(opts.prompt_tokens, 20)
    return opts


def main() -> None:
    opts = parse()
    device = common.setup_comfy(opts)
    import torch
    import torch._dynamo

    import builders
    import comfy.model_management as mm
    from llmdiff_core import fused_site
    from llmdiff_core.comfy_patch import apply_adapter, forget_kept_entries

    entry_seconds = timed_entry_builds(device)

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    attend_impls = {name: attend_variant(name) for name in opts.attend.split(",") if name}
    site_kernels = [k for k in opts.site_kernel.split(",") if k]
    setting = fused_site.site_kernel_setting()  # the product's, for a variant without --site-kernel
    run_kernel = fused_site.kernel_for_run(setting, {"backend": opts.compile, "mode": opts.compile_mode})
    product_kernel = f"auto: {run_kernel}" if setting == "auto" else setting
    spec = builders.llm_spec(opts.llm)
    models = [m for m in opts.models.split(",") if m]
    modes = [m for m in opts.modes.split(",") if m]
    # a CPU has one clock, the device being the host (StepStamps): pipelined is synced there ("both" still times
    # each variant twice, which the smoke test uses to exercise the two-clock tables)
    step_clock = opts.step_clock or ("both" if device.type == "cuda" else "synced")
    if step_clock == "pipelined" and device.type != "cuda":
        step_clock = "synced"
    clocks = ["pipelined", "synced"] if step_clock == "both" else [step_clock]
    suffix = {clock: (f"@{clock}" if i else "") for i, clock in enumerate(clocks)}  # clock -> its variants' suffix
    cfg = 5.0 if opts.rows % 2 == 0 else 1.0
    latent_batch = opts.rows // 2 if cfg > 1 else opts.rows
    report = common.Report("Sampling overhead per step (adapter vs unpatched)", common.env_header(
        device, opts.root, unet_dtype=str(dtype).replace("torch.", ""), shapes="small" if opts.small else "real",
        llm=f"{opts.llm} (D={spec.hidden_size}, L={spec.num_layers})", tokens=opts.tokens,
        adapter_dtype=opts.adapter_dtype, steps=opts.steps, repeats=opts.repeats, warmup=opts.warmup,
        compile=f"{opts.compile} (mode {opts.compile_mode})" if opts.compile else "no (eager)",
        entry="the last run's (--keep-entries)" if opts.keep_entries else "built every run",
        step_clock=" and ".join(clocks)))
    rows_out: list[list[Any]] = []
    flop_rows: list[list[Any]] = []
    replay_rows: list[list[Any]] = []
    coverages: set[float] = set()  # the paired intervals' coverage (it depends on the repeats only)
    # under inductor's CUDA graphs, each replay's device time (CUDA events): the step's split into the graph and
    # the rest (host, input copies, sampler kernels), measured in the same runs as the step
    replays = None
    if device.type == "cuda" and opts.compile == "inductor" and common.uses_cuda_graphs(opts.compile, opts.compile_mode):
        try:
            replays = common.ReplayClock().install()
        except (ImportError, AttributeError) as exc:  # another torch's CUDA-graph trees: the table goes without it
            report.notes.append(f"no replay split: torch's CUDAGraphNode.run_graph is not there ({exc})")

    # a SIGINT (the step's timeout on the GPU machine) while a model is measured ends the loop, not the script: the
    # tables of the models before it are written (15 s before the KILL)
    cut = common.Interruption(report)
    with cut:
        for family in ([] if opts.floor_only else models):
            cut.during = family
            shape = builders.unet_shape(family, opts.small, opts.latent)
            base = builders.build_unet(family, opts.small, dtype, device, offload_device=mm.unet_offload_device())
            clip_pos = builders.clip_conditioning(shape, latent_batch, 1)
            clip_neg = builders.clip_conditioning(shape, latent_batch, 2)
            pos, neg = builders.prompt_pair(shape, spec, opts.tokens, opts.prompt_tokens, 0, latent_batch)
            variants: dict[str, tuple[Any, list, list]] = {"unpatched": (base, clip_pos, clip_neg)}
            impl_of: dict[str, str] = {}  # variant -> the attend implementation it runs with ("" = the product's)
            kernel_of: dict[str, str] = {}  # variant -> the site kernel it was applied with (--site-kernel)
            for mode in modes:
                adapter = builders.build_adapter(base, spec, mode, opts.adapter_dtype, max_tokens=opts.tokens)
                named = []
                for kernel in site_kernels if mode == "clip" and site_kernels else [None]:  # (paper mode: no fusion)
                    named.append(mode if kernel is None else f"{mode}+{kernel}")
                    variants[named[-1]] = (apply_adapter(base, adapter, strength=1.0, site_kernel=kernel), pos, neg)
                    if kernel is not None or (mode == "clip" and run_kernel != "torch"):  # (named where the
                        kernel_of[named[-1]] = kernel or product_kernel  # product's default is not the 3 kernels)
                for impl in attend_impls:
                    variants[f"{mode}+{impl}"] = variants[named[0]]
                    impl_of[f"{mode}+{impl}"] = impl
            if opts.compile:  # warmup runs compile; each variant is its own dynamo graph of the same U-Net code
                # A new model family starts afresh: the same UNetModel.forward with new shapes would otherwise
                # recompile with dynamic shapes (automatic_dynamic), which took SDXL past 5 minutes on the GPU.
                torch._dynamo.reset()
                variants = {name: (common.comfy_compiled(mp, opts.compile, opts.compile_mode), p_, n_)
                            for name, (mp, p_, n_) in variants.items()}
            noise = torch.randn(latent_batch, 4, shape.latent, shape.latent, generator=torch.Generator().manual_seed(0))
            n_sites = len(builders.find_sites(base.model.diffusion_model)[0])

            def sampler_run(mp: Any, positive: list, negative: list, steps: int, flops: Any = None,
                            synced: bool = True) -> dict[str, float]:
                stamps = common.StepStamps(device, synced)

                def callback(step: int, x0: Any, x: Any, total: int) -> None:
                    stamps.stamp()
                    if flops is not None:
                        flops.append(flops[0].get_total_flops())

                if not opts.keep_entries:  # every run builds its entry, as for a new prompt (run_cache.py)
                    forget_kept_entries(mp)
                common.sync(device)
                if replays is not None:
                    replays.take(device)  # (drops what ran before this run)
                entry_seconds.clear()
                t0 = common.now()
                stamps.start()
                with torch.inference_mode():
                    import comfy.sample
                    comfy.sample.sample(mp, noise, steps, cfg, "euler", "normal", positive, negative,
                                        torch.zeros_like(noise), denoise=1.0, disable_pbar=True, seed=0,
                                        callback=callback)
                common.sync(device)
                t1 = common.now()
                ends = stamps.seconds()
                gaps = [b - a for a, b in zip(ends, ends[1:])]
                out = {"step": common.median(gaps), "first": ends[0], "run": t1 - t0, "entry": sum(entry_seconds)}
                if replays is not None:  # a warm run replays once per U-Net call: the median replay times the count
                    times = replays.take(device)
                    out.update(replay=common.median(times) / 1e3 * len(times) / steps if times else 0.0,
                               replays=len(times) / steps)
                return out

            failed: dict[str, str] = {}  # variant -> why its --attend implementation or site kernel could not run here

            def measured(name: str, v: tuple[Any, list, list], clock: str) -> Any:
                def run() -> dict[str, float]:
                    return sampler_run(*v, steps=opts.steps, synced=clock == "synced")
                if name not in impl_of and kernel_of.get(name, "torch") == "torch":
                    return run
                catch = RuntimeError if name in impl_of else Exception  # (a site kernel: Triton's compile errors too)

                def tolerant() -> dict[str, float]:  # a variant this device cannot run: reported, not fatal
                    if name not in failed:
                        try:
                            return with_attend(attend_impls[impl_of[name]], run) if name in impl_of else run()
                        except catch as exc:
                            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    return {"step": float("nan"), "first": float("nan"), "run": float("nan"), "entry": float("nan")}
                return tolerant
            # every variant once per clock (the same compiled model: no second compile), interleaved in one set of
            # rounds
            measurements = {name + suffix[clock]: measured(name, v, clock) for clock in clocks
                            for name, v in variants.items()}
            compile_clock = common.CompileClock()
            graphs = {"before": common.graphs_compiled()}

            def warm() -> None:
                graphs.update(warm=common.graphs_compiled(), recorded=common.cuda_graph_recorded_inputs())
            results = common.interleaved(measurements, opts.repeats, opts.warmup, progress=True, after_warmup=warm)
            report.raw[family] = results  # every repeat's metrics, in the JSON (seconds), for other statistics later
            if common.repeats_done(results) < opts.repeats:
                report.notes.append(f"{family}: {common.repeats_done(results)} of {opts.repeats} repeats (the step's "
                                    f"time ran out: ${common.DEADLINE_ENV})")
            phases = compile_clock.phases() if opts.compile else ""
            if phases:
                report.notes.append(f"{family}: the compiles' phases, all variants (nested): {phases}")
            if opts.compile:  # a graph compiled while timing would be an outlier repeat: the noise column's cause
                report.notes.append(f"{family}: graphs compiled in the warm-up {graphs['warm'] - graphs['before']}, "
                                    f"in the timed repeats {common.graphs_compiled() - graphs['warm']} (0 expected)")
            if common.uses_cuda_graphs(opts.compile, opts.compile_mode):
                report.notes.append(f"{family}: {common.cuda_graph_note()}; of those inputs, recorded in the timed "
                                    f"repeats: {common.cuda_graph_recorded_inputs() - graphs['recorded']} (0 expected: "
                                    f"more means graphs recorded again in warm runs, e.g. once per run)")

            step_flops: dict[str, tuple[float, float]] = {}
            if not opts.no_flops:
                for name, v in variants.items():
                    if name in impl_of or name in failed:
                        continue  # the same FLOPs as the product's attend; a variant that failed has none
                    counter = common.flop_counter()
                    marks: list[Any] = [counter]
                    with counter:
                        sampler_run(*v, steps=2, flops=marks)
                    step1, total = marks[1], counter.get_total_flops()
                    step_flops[name] = (float(step1), float(total - step1))  # (step 1, step 2) FLOPs, all rows

            report.notes += [f"{family} {name}: failed ({why})" for name, why in failed.items()]
            for clock, mode in [(c, m) for c in clocks for m in variants if m != "unpatched"]:
                r, r0 = results[mode + suffix[clock]], results["unpatched" + suffix[clock]]
                base_step, base_first, base_run = (common.median(r0[k]) for k in ("step", "first", "run"))
                step = common.median(r["step"])
                overhead = step / base_step - 1.0
                noise_pct = max(common.spread(r["step"]), common.spread(r0["step"]))
                ratios = common.paired_ratios(r["step"], r0["step"])
                low, high, coverage = common.median_interval(ratios)
                coverages.add(round(100 * coverage, 1))
                flop_over = measured_per_flop = per_run = float("nan")
                if mode in step_flops:
                    b1, b2 = step_flops["unpatched"]
                    a1, a2 = step_flops[mode]
                    flop_over = (a2 - b2) / b2
                    measured_per_flop = overhead / flop_over if flop_over > 0 else float("nan")
                    per_run = ((a1 - b1) - (a2 - b2)) / 1e9
                name = MODE_NAMES[mode.split("+")[0]] + (f", attend={impl_of[mode]}" if mode in impl_of else "") + (
                    f", site kernel {kernel_of[mode]}" if mode in kernel_of else "") + (
                    f", steps {clock}" if len(clocks) > 1 else "")
                if replays is not None:
                    base_replay = common.median(r0.get("replay", []))
                    replay = common.median(r.get("replay", []))
                    replay_rows.append([family, name, base_replay * 1e3, replay * 1e3, (replay - base_replay) * 1e3,
                                        (step - base_step) * 1e3, ((step - replay) - (base_step - base_replay)) * 1e3,
                                        (base_step - base_replay) * 1e3, common.median(r.get("replays", []))])
                rows_out.append([family, shape.pixels, opts.rows, name, base_step * 1e3, step * 1e3,
                                 100 * overhead, 100 * noise_pct, 100 * (common.median(ratios) - 1.0),
                                 f"{100 * (low - 1.0):.2f} .. {100 * (high - 1.0):.2f}",
                                 (step - base_step) / n_sites * 1e6,
                                 100 * flop_over, measured_per_flop,
                                 (common.median(r["first"]) - base_first) * 1e3, common.median(r["entry"]) * 1e3,
                                 100 * (common.median(r["run"]) / base_run - 1.0), per_run])
            del variants, measurements, base
            mm.unload_all_models()
            gc.collect()
            mm.soft_empty_cache()

    if replays is not None:
        replays.uninstall()
    if not opts.floor_only and len(clocks) > 1:
        report.notes.append("steps pipelined: stamped by CUDA events, the host free to run ahead (ComfyUI without a "
                            "preview): a step costs the longer of its host and its device work, so an adapter's host "
                            "time is hidden where the device is the slower. steps synced: the host waits for the "
                            "device at every step (a preview reads each latent; sessions 3-14's only clock), so a "
                            "step is its host work plus its device work and both extras count." + (
                                "" if device.type == "cuda" else " On this CPU both rows read one clock (the device "
                                "is the host): their difference is noise."))
    if not opts.floor_only:
        report.table("per-step time, interleaved repeats (medians)",
                     ["model", "px", "rows", "adapter", "unpatched ms/step", "adapter ms/step", "overhead %",
                      "noise ±%", "paired overhead %", "its interval %", "extra µs/site/step", "FLOP overhead %",
                      "measured / FLOP", "step 1 extra ms", "of which the entry ms", "whole-run overhead %",
                      "once-per-run GFLOP"],
                     rows_out)
    if replay_rows:
        report.table("the step split at its CUDA-graph replays (device time of each replay from CUDA events around "
                     "it, ms per step, medians of the runs)",
                     ["model", "adapter", "unpatched replay", "adapter replay", "replay extra (device)",
                      "step extra", "extra outside the replay", "unpatched outside the replay",
                      "replays per step"], replay_rows)
        report.notes.append("outside the replay = step - replays: the host (sampler, wrappers, guards), the replay's "
                            "input copies and the sampler's own kernels. A step runs its U-Net as one replay, so an "
                            "extra there is host time or copies; an extra in the replay is the adapter's kernels.")
    if opts.compile == common.HOST_ONLY:
        report.notes.append(f"compile {common.HOST_ONLY}: every U-Net call returns its graph's first outputs without "
                            "running a kernel, so ms/step is the host's work per step alone (sampler, wrappers, "
                            "dynamo's guards, AOTAutograd); the adapter's extra here is its host time, which a "
                            "CUDA-graph step pays on top of its replay. Images are garbage: a timing tool only.")

    if not opts.no_real_flops and not cut.happened:
        import flop_floor
        n, p_len = opts.floor_tokens, opts.floor_prompt_tokens
        cases = [(f"{n} + {n}", [n, n]), (f"{p_len} + empty", [p_len, 0])]
        bucket = max(opts.tokens, n + 1, p_len + 1)  # the BOS is never attended (except by an empty prompt)
        roofline_rows: list[list[Any]] = []
        floor_modes = modes + [f"clip+{k}" for k in site_kernels if "clip" in modes and k != "torch"]
        for family in models:
            for r in flop_floor.real_shape_steps(family, floor_modes, builders.llm_spec("8b"), cases, bucket):
                path, _, kernel = r.mode.partition("+")
                adapter_name = MODE_NAMES[path] + (f", site kernel {kernel}" if kernel else "")
                no_attn = r.unet - r.unet_attn
                flop_rows.append([r.family, builders.unet_shape(r.family, False).pixels, adapter_name,
                                  r.prompt, r.span, r.sites, r.unet / r.rows / 1e12, no_attn / r.rows / 1e12,
                                  r.extra / r.rows / 1e9, r.extra_attn / r.rows / 1e9, 100 * r.extra / r.unet,
                                  100 * r.extra / no_attn, 100 * flop_floor.ISSUE_FLOOR[r.family],
                                  100 * flop_floor.ISSUE_TARGET[r.family],
                                  r.core_fusions if path == "clip" else "n/a", r.out_fusions,
                                  r.once / r.rows / 1e9])
                roofline_rows.append([r.family, adapter_name, r.prompt, r.unet_bytes / r.rows / 1e9,
                                      r.extra_bytes / r.rows / 1e9, 1e3 * r.unet_kernel_s / r.rows,
                                      1e3 * r.extra_kernel_s / r.rows, 100 * r.extra_kernel_s / r.unet_kernel_s,
                                      100 * r.extra / r.unet, 100 * flop_floor.ISSUE_TARGET[r.family]])
        report.table(f"FLOP floor at the real shapes: the patched U-Net's forward per step (meta device: shapes "
                     f"only; Llama-3-8B features, fp16, {bucket}-token bucket, per U-Net row)",
                     ["model", "px", "adapter", "prompt (pos + neg tokens)", "attended span", "sites",
                      "U-Net TFLOP/sample", "U-Net w/o attention core", "extra GFLOP/sample/step",
                      "of which attention GFLOP", "extra % of U-Net", "extra % of U-Net w/o attention",
                      "issue floor %", "issue target %", "fused at core/step", "2nd to_out projections/step",
                      "once-per-run GFLOP/sample"],
                     flop_rows)
        report.table("eager roofline of the same step (bench/traffic.py: bytes each op reads and writes; per U-Net "
                     "row, sum over kernels of max(FLOPs / 989 TFLOP/s, bytes / 3.35 TB/s))",
                     ["model", "adapter", "prompt (pos + neg tokens)", "U-Net GB", "extra GB", "U-Net roofline ms",
                      "extra roofline ms", "extra % (roofline)", "extra % (FLOPs)", "issue target %"], roofline_rows)
    report.notes += [
        "overhead % = adapter ms/step / unpatched ms/step - 1; noise = the larger relative half-IQR of the two.",
        "paired overhead % = the median over repeats of (adapter / unpatched - 1), each repeat's two runs back to "
        "back, so drift they share cancels; its interval holds the true median with "
        f"{' / '.join(f'{c:g}' for c in sorted(coverages)) or 'n/a'} % confidence (order statistics, no assumed "
        "distribution). The target is met when the interval's top is at most the target.",
        "measured / FLOP = overhead % / FLOP overhead %: the issue's target is within about 1.25 of the floor.",
        "real-shape table: counted by FlopCounterMode on the product code path (bench/flop_floor.py: "
        "apply_adapter, step 2 of a run, minus the unpatched U-Net), not by formula. hybrid (clip) fuses at "
        "ComfyUI's attention core (to_out runs once: '2nd to_out projections' = 0), K/V trimmed to the attended "
        "span; paper (llm)'s extra also holds its original attention reading the span instead of 77 CLIP tokens "
        "(minus the CLIP to_k / to_v it no longer projects).",
        "issue floor % was counted without the U-Net's own attention core in the denominator (0.677 TFLOP for "
        "SD1.5 at 512 px is exactly the U-Net without its attention bmm/SDPA FLOPs): compare it with "
        "'extra % of U-Net w/o attention'.",
    ]
    if opts.small:
        report.notes.append("--small: tiny widths on CPU. These ratios show per-call overheads of the patch code, "
                            "not the GPU targets (whose shapes are 10-1000x more compute per site).")
    report.emit(opts)
    cut.exit_if_cut()


def timed_entry_builds(device: Any) -> list[float]:
    """The seconds of every once-per-run entry build from now on (AdapterRuntime._build_entry: the features
    moved, encoded, every site's K/V projected and stacked), synchronised at its end so its device work counts:
    what of a run's "step 1 extra" the entry is, and what is something else (a CUDA-graph recording, ...)."""
    from llmdiff_core.adapter_runtime import AdapterRuntime

    seconds: list[float] = []
    build = AdapterRuntime._build_entry

    def timed(runtime: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = common.now()
        try:
            return build(runtime, *args, **kwargs)
        finally:
            common.sync(device)
            seconds.append(common.now() - t0)
    AdapterRuntime._build_entry = timed  # type: ignore[method-assign]
    return seconds


def attend_variant(name: str) -> Any:
    """An implementation of llmdiff_core.attention.attend(q, kh, vh, mask) for the --attend A/B."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llmdiff_core import attention

    if name == "unmasked":
        def unmasked(q: Any, kh: Any, vh: Any, mask: Any) -> Any:
            return attention.attend(q, kh, vh, dataclasses.replace(mask, bias=None, keep=None))
        return unmasked
    if name == "bmm":
        def attend(q: Any, kh: Any, vh: Any, mask: Any) -> Any:  # 3-5 plain kernels, no SDPA dispatch
            b, n, inner = q.shape
            heads = kh.shape[1]
            qh = q.view(b, n, heads, inner // heads).transpose(1, 2) * (inner // heads) ** -0.5
            scores = qh @ kh.transpose(-1, -2)
            if mask.bias is not None:
                scores = scores + mask.bias
            out = (scores.softmax(-1) @ vh).transpose(1, 2).reshape(b, n, inner)
            return out if mask.keep is None else out * mask.keep
        return attend
    backend = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "math": SDPBackend.MATH}.get(name)
    if backend is None:
        raise SystemExit(f"--attend: unknown implementation {name!r} (efficient, cudnn, math, bmm, unmasked)")

    def forced(q: Any, kh: Any, vh: Any, mask: Any) -> Any:
        with sdpa_kernel(backend):
            return attention.attend(q, kh, vh, mask)
    return forced


def with_attend(impl: Any, fn: Any) -> Any:
    """fn() with the adapter's per-site attention replaced by impl (adapter_runtime calls it by this name)."""
    from llmdiff_core import adapter_runtime

    product = adapter_runtime.attend
    adapter_runtime.attend = impl
    try:
        return fn()
    finally:
        adapter_runtime.attend = product


if __name__ == "__main__":
    main()
