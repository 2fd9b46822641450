"""GPU correctness checks for a session that has a GPU (the test suite runs on CPU only).

    python bench/gpu_checks.py            # on a GPU: every check on CUDA; exit status 1 if one fails
    python bench/gpu_checks.py --device cpu   # the same code on the CPU (a smoke run: CPU vs CPU)

Tiny real-layout models (bench/builders.py --small shapes), so the whole run takes about a minute:
1. sampling on the device in fp16 (the loader's default adapter dtype) reproduces the adapter's effect
   computed on the CPU in fp32, hybrid and paper mode;
2. the patches add no device->host sync per sampling step (torch.cuda.set_sync_debug_mode counts every
   sync; the once-per-run entry may sync, the steps may not);
3. ComfyUI's torch.compile wrapper with inductor: one graph for prompts of two span lengths and a second
   strength (the key length is a dynamic size from the first compile, the fusion's gate a tensor), no graph
   break, the eager results;
4. Adapter Loader's dtype auto picks half precision on a GPU (fp32 on CPU);
5. the LLM leaves the GPU after encoding (after_encoding offload) and stays with keep;
6. training from the feature cache on the device: pinned batches copied without blocking, prefetch on ==
   off, finite losses;
7. with ComfyUI short of memory (--novram) the adapter is loaded partially like the U-Net (comfy.ops layers
   fetch their weights per call) and samples what the fully loaded one does;
8. bf16 training with a bf16 U-Net: the U-Net outside autocast (the product) does fewer casts per step than
   under it (CUDA autocast upcasts every norm) and gives the same losses within bf16 tolerance;
9. training steps queue without a host sync, and their records read what the device computed;
10. a training batch cut to its attended span gives the whole bucket's U-Net output (each row's noise drawn
   over the bucket and cut; other seeds change it, so the equality is not vacuous);
11. check 3 under inductor's CUDA graphs (mode reduce-overhead, what the sampling step needs to stop being
   launch-bound): no cudagraph skip, and replays with another run's keys, values and gates give that run's
   eager images;
12. the one-kernel hybrid site (llmdiff_core/fused_site.py: site_kernel "fused" or "fused-attention", and "auto"),
   compiled by Triton for this GPU: the kernel against float64 math at the real SD1.5 and SDXL site shapes in
   fp16 and bf16 at 64 keys and in fp16 at 128 and 256 (given n, or given tau_q(n)), sampling with each site
   kernel against the three kernels, and compiled as check 11: "fused" and the default "auto" under inductor's
   CUDA graphs (auto must run fused-attention there), and fused-attention under TorchCompileModel's cudagraphs
   backend;
13. train.py --unet-fp8 (training/float8_linears.py): a frozen linear layer at SDXL's GEMM shapes in bf16 gives
   the fp32 product of its float8-rounded operands, forward and activation gradient, no weight gradient; and
   its forward + backward time against bf16.
14. a sampling run's features moved to the GPU (FeatureBatch.distinct with a device, through features.moved's
   page-locked staging since session 23): whole, cut to the span, and as the encoding's broadcast reads, each
   equal to the host's tensors, three times in a row (the staging blocks are reused).
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

FP16_EFFECT_TOL = 0.1  # relative error of the adapter's effect on the sampled latent, fp16 vs fp32


def parse() -> Any:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma list of check numbers to run (default all)")
    p.add_argument("--compile-backend", default=None, metavar="BACKEND",
                   help="check 3's dynamo backend (default inductor on CUDA, eager on the CPU): eager on CUDA counts "
                        "the graphs and breaks in seconds, without inductor's compile (TORCH_LOGS=graph_breaks "
                        "says where)")
    opts = p.parse_args()
    opts.small = True
    common.defaults(opts, repeats=1, warmup=0)
    return opts


def crashed(e: BaseException) -> str:
    """An exception as a check's detail: what it says and where it was raised (the innermost frame, and the
    innermost in this repository's code when that is another), its whole traceback on stderr (the run's log):
    session 28's one failure said only what, and the device time to find where was gone."""
    frames = traceback.extract_tb(e.__traceback__)
    traceback.print_exception(e, file=sys.stderr)
    if not frames:
        return f"{type(e).__name__}: {e}"
    ours = [f for f in frames if f.filename.startswith(str(REPO)) and "site-packages" not in f.filename
            and not f.filename.startswith(str(REPO / ".bench"))]  # (.bench/ComfyUI: the pinned ComfyUI's copy)
    where = [frames[-1]] + ([ours[-1]] if ours and ours[-1] is not frames[-1] else [])
    at = ", from ".join(f"{Path(f.filename).name}:{f.lineno} ({f.name})" for f in where)
    return f"{type(e).__name__}: {e} (at {at})"


class Checks:
    def __init__(self) -> None:
        self.rows: list[list[Any]] = []

    def run(self, number: int, name: str, fn: Callable[[], tuple[bool, str]], only: set[int]) -> None:
        if only and number not in only:
            return
        try:
            ok, detail = fn()
        except Exception as e:  # a crash is a failed check, reported with the others
            ok, detail = False, crashed(e)
        self.rows.append([number, name, "pass" if ok else "FAIL", detail])
        print(f"[{'pass' if ok else 'FAIL'}] {number}. {name}: {detail}", file=sys.stderr, flush=True)

    @property
    def failed(self) -> bool:
        return any(r[2] == "FAIL" for r in self.rows)


def main() -> None:
    opts = parse()
    device = common.setup_comfy(opts)
    import torch

    import builders
    import comfy.model_management as mm
    import comfy.sample

    cuda = device.type == "cuda"
    cpu = torch.device("cpu")
    spec = builders.llm_spec("tiny")
    shape = builders.unet_shape("sd15", True)
    noise = torch.randn(1, 4, shape.latent, shape.latent, generator=torch.Generator().manual_seed(0))
    pos, neg = builders.prompt_pair(shape, spec, 32, 20, 0, 1)
    clip_pos, clip_neg = builders.clip_conditioning(shape, 1, 1), builders.clip_conditioning(shape, 1, 2)
    unet_dtype = torch.float16 if cuda else torch.float32
    only = {int(x) for x in opts.only.split(",") if x.strip()}
    checks = Checks()

    def sample(mp: Any, positive: list, negative: list, steps: int = 4) -> torch.Tensor:
        with torch.inference_mode():
            return comfy.sample.sample(mp, noise, steps, 5.0, "euler", "normal", positive, negative,
                                       torch.zeros_like(noise), disable_pbar=True, seed=0).float().cpu()

    def models(dev: torch.device, dtype: torch.dtype) -> Any:
        return builders.build_unet("sd15", True, dtype, dev, offload_device=mm.unet_offload_device())

    def same_weights_on(dev: torch.device, dtype: torch.dtype) -> Any:
        """The CPU-built U-Net (builders seeds a per-device generator: CUDA draws differ) stored in dtype,
        loaded to dev by ComfyUI at sampling, like a checkpoint."""
        import comfy.model_patcher

        model = models(cpu, torch.float32).model
        model.diffusion_model.to(dtype)
        model.diffusion_model.dtype = dtype  # BaseModel.get_dtype() reads it
        return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=mm.unet_offload_device())

    from llmdiff_core.comfy_patch import apply_adapter

    # 1. device fp16 vs CPU fp32
    def device_matches_cpu() -> tuple[bool, str]:
        details, ok = [], True
        ref_base, dev_base = models(cpu, torch.float32), same_weights_on(device, unet_dtype)
        plain_ref, plain_dev = sample(ref_base, clip_pos, clip_neg), sample(dev_base, clip_pos, clip_neg)
        for mode in ("clip", "llm"):
            ref = sample(apply_adapter(ref_base, builders.build_adapter(ref_base, spec, mode, "fp32", 32)), pos, neg)
            got = sample(apply_adapter(dev_base, builders.build_adapter(dev_base, spec, mode, "auto", 32)), pos, neg)
            # hybrid: the effect over the unpatched model; paper mode has no CLIP baseline, so the output
            effect_ref, effect_got = (ref - plain_ref, got - plain_dev) if mode == "clip" else (ref, got)
            err = float((effect_got - effect_ref).abs().max() / effect_ref.abs().max().clamp_min(1e-12))
            ok &= err < FP16_EFFECT_TOL and bool(torch.isfinite(got).all())
            details.append(f"{mode}: rel. error of the adapter's effect {err:.2e}")
        return ok, "; ".join(details) + f" (limit {FP16_EFFECT_TOL}, {unet_dtype} vs float32 on CPU)"

    # 2. no host sync per step
    def no_sync_per_step() -> tuple[bool, str]:
        if not cuda:
            return True, "skipped: needs CUDA (torch.cuda.set_sync_debug_mode)"
        base = models(device, unet_dtype)
        patched = apply_adapter(base, builders.build_adapter(base, spec, "clip", "auto", 32))

        def syncs(mp: Any, p: list, n: list, steps: int) -> int:
            sample(mp, p, n, 1)  # loaded and warm
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    sample(mp, p, n, steps)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            return sum("synchroniz" in str(w.message) for w in caught)

        extra_short = syncs(patched, pos, neg, 2) - syncs(base, clip_pos, clip_neg, 2)
        extra_long = syncs(patched, pos, neg, 8) - syncs(base, clip_pos, clip_neg, 8)
        per_step = (extra_long - extra_short) / 6
        return per_step <= 0, (f"extra syncs per run: {extra_short} (2 steps), {extra_long} (8 steps) -> "
                               f"{per_step:.2f} per step (must be 0; per-run ones are the entry's)")

    # 3. torch.compile; 11. the same with CUDA graphs
    def compiled_like_eager(mode: str | None = None, steps: int = 3, site_kernel: str = "torch",
                            backend: str | None = None) -> tuple[bool, str]:
        """Sampled under ComfyUI's compile wrapper (inductor on CUDA, eager on the CPU: the code path only) over
        prompts of two span lengths and a second strength: one graph, no break, the eager images.

        mode "reduce-overhead" (CUDA only) replays CUDA graphs: the third run is the first's shape again, so its
        steps replay a recording made with the first run's keys, values and gates. Images equal to eager mean
        the per-run tensors were copied in, not read stale from the recording; no cudagraph skip means the
        patched U-Net really ran as CUDA graphs (torch raises with the reason, reported as the check's detail).
        A site kernel other than torch must have run at the compiled runs' sites (their entries say which).
        Backend cudagraphs: a graph per span length (the run marks the length static, key_length_for_run)."""
        import torch._dynamo
        import torch._inductor.config as inductor_config
        from comfy_api.torch_helpers import set_torch_compile_wrapper
        from torch._dynamo.utils import counters

        from llmdiff_core.comfy_patch import applied_runtimes

        if backend is None:
            backend = "inductor" if cuda else "eager"
            if mode is None and opts.compile_backend:
                backend = opts.compile_backend
        base = models(device, unet_dtype)
        adapter = builders.build_adapter(base, spec, "clip", "auto", 96)
        # 20 and 70 tokens in a 96-token bucket (spans of 32 and 95 keys), then the first at strength 0.6
        short, long = (builders.prompt_pair(shape, spec, 96, n, 0, 1) for n in (20, 70))
        runs = [(apply_adapter(base, adapter, strength=s, site_kernel=site_kernel), p)
                for s, p in ((1.0, short), (1.0, long), (0.6, short))]
        eager = [sample(m, *p, steps) for m, p in runs]
        torch._dynamo.reset()
        counters.clear()

        def compiled_clone(m: Any) -> Any:
            c = m.clone()
            set_torch_compile_wrapper(c, backend=backend, mode=mode)
            return c
        strict = mode == "reduce-overhead" and hasattr(inductor_config.triton, "cudagraph_or_error")
        # strict: a skipped CUDA graph raises, with torch's reason for it
        kernels = set()  # the compiled runs' site kernels, where fused_site's kernel ran at a site

        def compiled_sample(m: Any, p: tuple) -> torch.Tensor:
            out = sample(compiled_clone(m), *p, steps)
            kernels.update(e.site_kernel if any(e.fused) else "torch" for e in applied_runtimes(m)[0].runs.kept)
            return out
        with inductor_config.patch({"triton.cudagraph_or_error": True}) if strict else contextlib.nullcontext():
            got = [compiled_sample(m, p) for m, p in runs]
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        skips = counters["inductor"]["cudagraph_skips"]
        torch._dynamo.reset()
        err = max(float((g - e).abs().max() / e.abs().max().clamp_min(1e-12)) for g, e in zip(got, eager))
        # the cudagraphs backend traces a graph per span length (attention.key_length_for_run): 2 here
        want_graphs = 2 if backend == "cudagraphs" else 1
        ok = graphs == want_graphs and breaks == 0 and err < 2e-2 and (mode != "reduce-overhead" or skips == 0)
        ok &= site_kernel == "torch" or (len(kernels) == 1 and "torch" not in kernels)
        ran = "" if site_kernel == "torch" else f"site kernel {site_kernel}: ran {', '.join(sorted(kernels))}; "
        return ok, (f"{ran}{backend}{f' mode {mode}' if mode else ''}, two span lengths and two strengths: {graphs} "
                    f"graph(s), {breaks} graph break(s)"
                    f"{f', {skips} CUDA-graph skip(s)' if mode == 'reduce-overhead' else ''}, largest rel. "
                    f"difference to eager {err:.2e}")

    def compiled_cuda_graphs() -> tuple[bool, str]:
        if not cuda:
            return True, "skipped: needs CUDA (CUDA graphs)"
        return compiled_like_eager("reduce-overhead", steps=4)

    # 12. the one-kernel hybrid site
    def fused_site_kernel() -> tuple[bool, str]:
        if not cuda:
            return True, "skipped: needs CUDA (tests/test_fused_site.py runs the kernel in Triton's CPU interpreter)"
        from attend_calls import SITES, site_mask
        from llmdiff_core import fused_site
        from site_calls import site_inputs

        details, ok = [], True
        g = torch.Generator().manual_seed(0)
        worst: dict[str, float] = {}
        # every site shape of SD1.5 512 px (head widths 40, 80, 160) and SDXL 1024 px (64), 2 rows, at spans of 64
        # keys, and of 128 and 256 in fp16 (launch_config's tiles change with the span; each is a Triton compile)
        spans = [(torch.float16, 64), (torch.bfloat16, 64), (torch.float16, 128), (torch.float16, 256)]
        for side, channels, heads, _ in SITES["sd15"][:3] + SITES["sdxl"]:
            for dtype, span in spans:
                mask = site_mask(dtype, device, span)
                n, w_q, keys, values, a_orig, w_orig = site_inputs(dtype, device, side, channels, heads, g, mask)
                inputs = (n, w_q, keys, values, mask.bias, mask.keep, a_orig, w_orig)
                given_q = (n @ w_q.T, None, *inputs[2:])  # (site kernel fused-attention)
                for args in (inputs, given_q):
                    got, want = fused_site.hybrid_site(*args), fused_site.reference(*args)
                    err = float((got.double() - want).abs().max() / want.abs().max())
                    key = str(dtype).replace("torch.", "")
                    worst[key] = max(worst.get(key, 0.0), err)
        limits = {"float16": 5e-3, "bfloat16": 4e-2}
        ok &= all(worst[k] < limits[k] for k in limits)
        details.append("kernel vs float64 at the real site shapes, spans of 64 to 256 keys: " + ", ".join(
            f"{k} {worst[k]:.2e} (limit {limits[k]})" for k in limits))
        # sampling: the one kernel against the three, eager, and the kernel must have run at every site
        base = models(device, unet_dtype)
        adapter = builders.build_adapter(base, spec, "clip", "auto", 32)
        calls = {"kernel": 0}
        with common.counting_site_kernel(calls, "kernel"):
            kernels = {k: sample(apply_adapter(base, adapter, site_kernel=k), pos, neg)
                       for k in ("fused", "fused-attention")}
        three = sample(apply_adapter(base, adapter, site_kernel="torch"), pos, neg)
        errs = {k: float((got - three).abs().max() / three.abs().max()) for k, got in kernels.items()}
        ok &= max(errs.values()) < 2e-2 and calls["kernel"] > 0
        details.append("sampling against the three kernels: " + ", ".join(f"{k} {e:.2e}" for k, e in errs.items())
                       + f" (limit 2e-2), {calls['kernel']} kernel calls")
        # under CUDA graphs: the kernel itself, the product's default (auto: fused-attention where inductor replays
        # CUDA graphs) and (never run before session 23's change) the cudagraphs backend, which auto leaves alone
        for kwargs in ({"site_kernel": "fused"}, {"site_kernel": "auto"},
                       {"site_kernel": "fused-attention", "mode": None, "backend": "cudagraphs"}):
            try:  # (one that fails leaves the others' results in the detail)
                graphs_ok, graphs = compiled_like_eager(**{"mode": "reduce-overhead", "steps": 4, **kwargs})
            except Exception as e:
                graphs_ok, graphs = False, f"{kwargs}: {crashed(e)}"
            ok &= graphs_ok
            details.append(graphs)
        return ok, "; ".join(details)

    # 4. adapter dtype
    def loader_dtype() -> tuple[bool, str]:
        from llmdiff_core.comfy_adapter import inference_dtype

        got = inference_dtype("auto", device)
        want = (torch.float16, torch.bfloat16) if cuda else (torch.float32,)
        return got in want, f"auto -> {got} on {device.type}"

    # 5. LLM offload / keep
    def llm_offload() -> tuple[bool, str]:
        import comfy.model_patcher
        from llmdiff_core.comfy_llm import ManagedLLM, _HFHolder, release

        dtype = torch.bfloat16 if cuda else torch.float32
        loaded = builders.build_llm("tiny", dtype, mm.text_encoder_offload_device())
        patcher = comfy.model_patcher.ModelPatcher(_HFHolder(loaded.model, dtype), load_device=device,
                                                   offload_device=mm.text_encoder_offload_device())
        llm = ManagedLLM(loaded, patcher, "tiny")

        def state() -> tuple[bool, str]:
            resident = any(lm.model is patcher for lm in mm.current_loaded_models)
            return resident, next(loaded.model.parameters()).device.type

        llm.encode(["a red fox"], 32, "error")
        after_offload = state()
        llm.keep_loaded = True
        llm.encode(["a red fox"], 32, "error")
        after_keep = state()
        release(patcher)
        ok = not after_offload[0] and after_keep[0] and (not cuda or (after_offload[1] == "cpu"
                                                                      and after_keep[1] == "cuda"))
        return ok, f"offload: resident {after_offload[0]}, weights on {after_offload[1]}; keep: resident " \
                   f"{after_keep[0]}, weights on {after_keep[1]}"

    # 6. training from the cache
    logged_peaks: dict[str, list[Any]] = {}  # per run: the metrics rows' gpu_peak_gib (CUDA only)

    def cached_training(work: Path, runs: dict[str, dict[str, Any]], spy: Callable[[str], None] = lambda k: None
                        ) -> dict[str, list[float]]:
        """A tiny cache built once, then one 3-step training run per entry of runs (extra TrainOptions);
        spy(name) is called before each. Returns each run's losses."""
        import json

        import training_throughput as tt
        from llmdiff_core.training import runner
        from llmdiff_core.training.options import TrainOptions

        data = tt.write_dataset(work / "data", 6, 64, 12)
        mp = builders.build_unet("sd15", True, torch.bfloat16 if cuda else torch.float32, device,
                                 offload_device=mm.unet_offload_device())
        llm = builders.build_llm("tiny", torch.float32, device)
        common_kw = dict(base_model="", llm="tiny", data=str(data), resolution=64, batch_size=2,
                         num_workers=0, cache_dir=str(work / "cache"), warmup_steps=0, lr=1e-3,
                         progress=False, tensorboard=False, log_every=1, checkpoint_every=0,
                         max_tokens=32, mixed_precision="auto" if cuda else "no", seed=0, max_steps=3)
        width = builders.unet_config("sd15", True)[1]["context_dim"]
        comps = runner.Components(mp, tt.StandInCLIP(width), tt.StandInVAE(), llm, "random", "tiny")
        if runner.run_with(TrainOptions(output_dir=str(work / "pre"), cache_only=True, **common_kw), comps):
            raise RuntimeError("cache pre-pass failed")
        losses = {}
        for name, extra in runs.items():
            out = work / f"run-{name}"
            comps = runner.Components(mp, tt.StandInCLIP(width), tt.StandInVAE(), None, "random", "tiny",
                                      llm_spec=llm.spec)
            spy(name)
            if runner.run_with(TrainOptions(output_dir=str(out), **{**common_kw, **extra}), comps):
                raise RuntimeError(f"training run {name} failed")
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            losses[name] = [r["loss"] for r in rows if "loss" in r]
            logged_peaks[name] = [r.get("gpu_peak_gib") for r in rows if "loss" in r]
        return losses

    def training() -> tuple[bool, str]:
        """Prefetch on (the batch copied on the prefetch thread's side stream), prefetch on without the side
        stream, prefetch off: the same losses, page-locked feature buffers, the side stream really used, and no
        copy from a prefetch thread that blocks it (a pageable tensor's copy synchronises the side stream)."""
        import threading

        from llmdiff_core.training import device_copy

        pinned: list[bool] = []
        streamed: dict[str, int] = {}
        blocking: list[str] = []  # shapes of the copies to CUDA a prefetch thread made without non_blocking
        current = [""]
        original, original_to = device_copy.DeviceStager.start, torch.Tensor.to

        def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = original_to(self, *args, **kwargs)
            if (current[0] == "on" and threading.current_thread().name.startswith("llmdiff-prefetch")
                    and self.device.type == "cpu" and out.device.type == "cuda" and not kwargs.get("non_blocking")):
                blocking.append("x".join(map(str, self.shape)))
            return out

        def spy(self: Any, host: dict) -> Any:
            pinned.append(bool(host["hidden"].is_pinned()) if isinstance(host.get("hidden"), torch.Tensor) else False)
            staged = original(self, host)
            streamed[current[0]] = streamed.get(current[0], 0) + isinstance(staged, device_copy.InFlight)
            return staged

        def choose(name: str) -> None:
            current[0] = name
            device_copy.SIDE_STREAM = name != "no-stream"
        device_copy.DeviceStager.start = spy  # type: ignore[method-assign]
        torch.Tensor.to = to  # type: ignore[method-assign]
        try:
            with tempfile.TemporaryDirectory(prefix="llmdiff-gpu-checks-") as tmp:
                losses = cached_training(Path(tmp), {"on": {"prefetch": True}, "no-stream": {"prefetch": True},
                                                     "off": {"prefetch": False}}, spy=choose)
        finally:
            device_copy.DeviceStager.start, device_copy.SIDE_STREAM = original, True  # type: ignore[method-assign]
            torch.Tensor.to = original_to  # type: ignore[method-assign]
        a = torch.tensor(losses["on"])
        same = all(torch.tensor(losses[k]).shape == a.shape
                   and bool(torch.allclose(a, torch.tensor(losses[k]), rtol=1e-3, atol=1e-5))
                   for k in ("no-stream", "off"))
        side_stream_used = streamed.get("on", 0) > 0 and streamed.get("no-stream", 0) == 0 and not streamed.get("off")
        peaks = logged_peaks.get("on", [])  # the run logs its peak GPU memory on CUDA, nothing elsewhere
        peaks_ok = bool(peaks) and all((p is not None and p > 0) if cuda else p is None for p in peaks)
        ok = same and bool(torch.isfinite(a).all()) and peaks_ok and (not cuda or (all(pinned) and side_stream_used
                                                                                   and not blocking))
        return ok, (f"losses prefetch + side stream {[round(x, 4) for x in losses['on']]}, prefetch "
                    f"{[round(x, 4) for x in losses['no-stream']]}, no prefetch {[round(x, 4) for x in losses['off']]}; "
                    f"pinned batches {sum(pinned)}/{len(pinned)}; batches on the side stream {streamed}; "
                    f"blocking copies from a prefetch thread {blocking or 'none'}; "
                    f"logged gpu_peak_gib {peaks}")

    # 8. bf16 training: the frozen bf16 U-Net outside autocast (docs/benchmarks.md §3h)
    def training_outside_autocast() -> tuple[bool, str]:
        if not cuda:
            return True, "skipped: needs CUDA (CPU autocast does not upcast norms)"
        from torch.profiler import ProfilerActivity, profile

        from llmdiff_core import model_wrappers
        from llmdiff_core.training import loop

        casts: dict[str, int] = {}
        product_rule, original_step = model_wrappers.unet_autocast_off, loop.Trainer.train_step
        current = [""]

        def counted(self: Any) -> Any:  # the casts (aten::_to_copy, forward and backward) of step 2
            if self.state.step != 1:
                return original_step(self)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                record = original_step(self)
            casts[current[0]] = sum(1 for e in prof.events() if e.name == "aten::_to_copy")
            return record

        def choose(name: str) -> None:
            current[0] = name
            model_wrappers.unet_autocast_off = product_rule if name == "outside" else (lambda *a: False)
        loop.Trainer.train_step = counted  # type: ignore[method-assign]
        try:
            with tempfile.TemporaryDirectory(prefix="llmdiff-gpu-checks-") as tmp:
                losses = cached_training(Path(tmp), {"outside": {}, "under": {}}, spy=choose)
        finally:
            model_wrappers.unet_autocast_off, loop.Trainer.train_step = product_rule, original_step
        a, b = torch.tensor(losses["outside"]), torch.tensor(losses["under"])
        close = a.shape == b.shape and bool(torch.allclose(a, b, rtol=5e-2, atol=1e-3))
        ok = close and bool(torch.isfinite(a).all()) and casts["outside"] < casts["under"]
        return ok, (f"casts per step {casts['outside']} (U-Net outside autocast) vs {casts['under']} (under it); "
                    f"losses {[round(x, 4) for x in losses['outside']]} vs {[round(x, 4) for x in losses['under']]}")

    # 9. training steps queue on the device without a host sync, and their records read what it computed
    def training_without_syncs() -> tuple[bool, str]:
        """From step 3 on, train_step (the training thread) must not sync with the device: the loss is read
        a step later (loop.StepRecord) and the attended span is decided on the host mask. The records must
        read the values the device computed. A sync in under half of the watched steps is a one-off (a new
        span bucket's first use, say) and passes with its stack shown; one in most steps fails."""
        import threading
        import traceback

        from llmdiff_core.training import loop

        watched_steps = 6
        where: dict[int, list[str]] = {}  # step -> the Python stack (innermost last) of each sync warning
        pairs: list[tuple[Any, list[float]]] = []
        original_step, original_record = loop.Trainer.train_step, loop.StepRecord.__post_init__

        def watched(self: Any) -> Any:
            if self.state.step < 2 or not cuda:
                return original_step(self)
            main, step = threading.current_thread(), self.state.step + 1
            shown = warnings.showwarning

            def show(message: Any, category: Any, filename: str, lineno: int, *a: Any, **k: Any) -> None:
                if threading.current_thread() is main and "synchroniz" in str(message):  # (not the prefetch thread)
                    # the stack says more than the warning's frame: a sync in a C++ path without a Python
                    # boundary of its own surfaces at the next call that has one
                    frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
                    where.setdefault(step, []).append(" < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                                                 for f in reversed(frames[-4:])))
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = show
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return original_step(self)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                    warnings.showwarning = shown

        def recorded(self: Any) -> None:
            on_device = self.values.clone()
            original_record(self)
            pairs.append((self, on_device))
        loop.Trainer.train_step, loop.StepRecord.__post_init__ = watched, recorded  # type: ignore[method-assign]
        try:
            with tempfile.TemporaryDirectory(prefix="llmdiff-gpu-checks-") as tmp:
                losses = cached_training(Path(tmp), {"run": {"max_steps": 2 + watched_steps}})
        finally:
            loop.Trainer.train_step, loop.StepRecord.__post_init__ = original_step, original_record
        same = all(rec.read() == dev.tolist() for rec, dev in pairs)
        finite = len(losses["run"]) == 2 + watched_steps and all(math.isfinite(x) for x in losses["run"])
        ok = 2 * len(where) < watched_steps and same and finite
        stacks = "; ".join(f"step {k}: {len(v)}x {v[0]}" for k, v in sorted(where.items()))
        return ok, (f"steps with a host sync among steps 3-{2 + watched_steps}: {len(where)} ({stacks or 'none'}); "
                    f"records read what the device computed: {same} ({len(pairs)} steps; "
                    f"{'CUDA' if cuda else 'CPU: no syncs to find'})")

    # 10. a training batch cut to its attended span (what the trainer feeds from the cache) trains as the bucket
    def cut_batch_trains_as_the_bucket() -> tuple[bool, str]:
        """The trainer encodes a cached batch only up to its attended span's end, with each row's Langevin
        noise drawn over the whole bucket and cut (docs/benchmarks.md §3j): the U-Net output of the cut batch
        must be the bucket's, and other seeds must change it (else the noise never reached the output and the
        equality proves nothing). Draws at the cut width are reported, not judged: the H100 run of session 10
        found them equal to the bucket's first tokens (torch's CUDA normal kernel maps element i to Philox
        subsequence i, whatever the size), so the bucket-wide draw is a guarantee, not a correction."""
        from llmdiff_core.adapter_runtime import TrainingCall
        from llmdiff_core.training.patching import feature_batch, training_options

        bucket, seeds = 96, (5, 6)
        base = models(device, torch.float32)  # fp32: the comparison is about the draws, not rounding
        # on the device itself: load_models_gpu below moves the U-Net only (ComfyUI's samplers load an
        # applied adapter as an additional model; this calls apply_model directly, as the trainer does)
        adapter = builders.build_adapter(base, spec, "clip", "fp32", bucket).float().to(device)
        with torch.no_grad():
            adapter.encoder.rho.fill_(0.0)  # noise scale ~1 (a fresh adapter's is ~0.03): the draws show
        patched = apply_adapter(base, adapter)
        features = builders.make_features(spec, [9, 17], bucket, 3)
        mm.load_models_gpu([patched])
        g = torch.Generator().manual_seed(7)
        x = torch.randn(2, 4, shape.latent, shape.latent, generator=g).to(device)
        context = clip_pos[0][0].repeat(2, 1, 1).to(device)
        sigma = torch.full((2,), 3.0, device=device)

        def output(feats: Any, host: torch.Tensor, noise_tokens: int | None,
                   noise_seeds: tuple[int, ...] = seeds) -> torch.Tensor:
            to = training_options(patched, TrainingCall(noise_seeds, host, noise_tokens))
            with torch.no_grad():
                return patched.model.apply_model(x, sigma, c_crossattn=context, transformer_options=to,
                                                 llmdiff=feature_batch(feats.to(device))).float().cpu()
        whole = output(features, features.mask, bucket)
        cut = features.first_tokens(40)
        same = output(cut, features.mask[:, :18], bucket)
        reseeded = output(cut, features.mask[:, :18], bucket, (11, 12))
        short = output(cut, features.mask[:, :18], None)  # drawn at the cut width

        def rel(a: torch.Tensor) -> float:
            return float((a - whole).abs().max() / whole.abs().max())
        err, moved, off = rel(same), rel(reseeded), rel(short)
        ok = err < 1e-5 and moved > 1e-3
        return ok, (f"cut to 40 of {bucket} tokens (span ends at 33), draws at the bucket: rel. difference "
                    f"{err:.1e}; other seeds: {moved:.1e} (must differ); draws at the cut width: {off:.1e} "
                    f"(reported only)")

    # 7. partial loading (--novram): every comfy.ops layer offloaded, weights fetched per call
    def partial_loading() -> tuple[bool, str]:
        if not cuda:
            return True, "skipped: needs CUDA (on a CPU nothing is offloaded)"
        from llmdiff_core.comfy_patch import WRAPPER_KEY

        details, ok = [], True
        base = models(device, unet_dtype)
        for mode in ("clip", "llm"):
            patched = apply_adapter(base, builders.build_adapter(base, spec, mode, "auto", 32))
            want = sample(patched, pos, neg)
            mm.unload_all_models()
            saved = mm.vram_state
            mm.vram_state = mm.VRAMState.NO_VRAM  # what --novram does: load_models_gpu loads (almost) nothing
            try:
                got = sample(patched, pos, neg)
                (adapter_patcher,) = patched.get_additional_models_with_key(WRAPPER_KEY)
                partial = bool(getattr(adapter_patcher.model, "model_lowvram", False))
            finally:
                mm.vram_state = saved
                mm.unload_all_models()
            err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
            ok &= partial and err < 1e-2
            details.append(f"{mode}: adapter loaded partially {partial}, rel. difference to full load {err:.2e}")
        return ok, "; ".join(details)

    # 13. --unet-fp8: the frozen U-Net's linears as float8 GEMMs
    def float8_linears() -> tuple[bool, str]:
        from llmdiff_core.training.float8_linears import use_float8_linears

        def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # float8 with one amax scale, in fp32
            scale = t.double().abs().max() / torch.finfo(dtype).max
            return ((t.double() / scale).to(dtype).double() * scale).float()

        # SDXL 1024 px batch 4 at its 32x32 level (4096 rows): attention projection, GEGLU in and out
        shapes = [(4096, 1280, 1280), (4096, 1280, 10240), (4096, 5120, 1280)] if cuda else [(256, 128, 256)]
        dtype = torch.bfloat16 if cuda else torch.float32
        g = torch.Generator().manual_seed(0)
        details, ok = [], True
        for rows, k, n in shapes:
            layer = torch.nn.Linear(k, n).to(device, dtype).requires_grad_(False)
            x = torch.randn(rows, k, generator=g).to(device, dtype).requires_grad_(True)
            grad_y = (torch.randn(rows, n, generator=g) * 1e-2).to(device, dtype)

            def step() -> None:
                layer(x).backward(grad_y)

            def median_ms() -> float:  # (after a warm-up step; each A/B side timed in a block: a check, not a bench)
                step()
                return 1e3 * common.median([common.timed(step, device, calls=10)() for _ in range(5)])
            ms = {"bf16": median_ms()}
            x.grad = None
            _, undo = use_float8_linears(layer, device)
            try:
                y = layer(x)
                y.backward(grad_y)
                y, dx = y.detach(), x.grad.clone()  # (before the timed steps add to x.grad)
                ms["fp8"] = median_ms()
            finally:
                undo()
            w = layer.weight.float()
            want_y = torch.nn.functional.linear(rounded(x.detach().float(), torch.float8_e4m3fn),
                                                rounded(w, torch.float8_e4m3fn), layer.bias.float())
            want_dx = rounded(grad_y.float(), torch.float8_e5m2) @ rounded(w, torch.float8_e4m3fn)
            err_y = float((y.float() - want_y).abs().max() / want_y.abs().max())
            err_dx = float((dx.float() - want_dx).abs().max() / want_dx.abs().max())
            ok &= err_y < 2e-2 and err_dx < 2e-2 and layer.weight.grad is None
            details.append(f"{rows}x{k}->{n}: rel. error y {err_y:.1e}, dx {err_dx:.1e}; forward+backward "
                           f"{ms['bf16']:.3f} ms {str(dtype)[6:]} / {ms['fp8']:.3f} ms fp8 "
                           f"({ms['bf16'] / ms['fp8']:.2f}x)")
        return ok, "; ".join(details) + " (errors against the fp32 product of the same float8 roundings)"

    # 14. a run's features reach the GPU through page-locked staging (features.moved)
    def staged_features() -> tuple[bool, str]:  # (on a CPU the moves are no-ops: the check's code only)
        from llmdiff_core.conditioning import FeatureBatch, FeaturePart
        from llmdiff_core.features import LLMFeatures, LLMSpec

        g = torch.Generator().manual_seed(0)
        spec, tokens = LLMSpec("llama", "check", 256, 4), 64

        def prompt(length: int) -> LLMFeatures:
            mask = torch.zeros(1, tokens, dtype=torch.bool)
            mask[0, 1:length] = True
            return LLMFeatures(spec, torch.randn(1, 5, tokens, 256, generator=g).bfloat16(),
                               torch.randn(1, 4, tokens, 256, generator=g).bfloat16(), mask)
        batch = FeatureBatch((FeaturePart(prompt(20), (0, 0)), FeaturePart(prompt(1), (0,))))
        ok, moves = True, 0
        for read, cut in ((([0], True), 32), ((None), None), (([0, 2], False), 48)):
            host, _ = batch.distinct(read, tokens=cut)
            for _ in range(3):  # each move's staging block from the host allocator's cache, then reused
                dev, index = batch.distinct(read, tokens=cut, device=device)
                ok &= index == [0, 0, 1] and dev.hidden.device.type == device.type
                for name in ("hidden", "scores", "mask"):
                    ok &= torch.equal(getattr(dev, name).cpu(), getattr(host, name))
                moves += 1
        return ok, (f"{moves} moves (whole, cut to the span, the encoding's reads as broadcast views): each equal to "
                    "its host tensors")

    checks.run(1, "device sampling reproduces the CPU fp32 adapter effect", device_matches_cpu, only)
    checks.run(2, "no device->host sync per sampling step", no_sync_per_step, only)
    checks.run(3, "torch.compile: one graph, no break, eager result", compiled_like_eager, only)
    checks.run(4, "Adapter Loader dtype auto", loader_dtype, only)
    checks.run(5, "LLM offloaded after encoding, kept with keep", llm_offload, only)
    checks.run(6, "training from the cache on the device (prefetch, side-stream copy)", training, only)
    checks.run(7, "adapter partially loaded (--novram) computes the same", partial_loading, only)
    checks.run(8, "bf16 training: the U-Net outside autocast casts less, trains the same", training_outside_autocast,
               only)
    checks.run(9, "training steps queue without host syncs, their records read the device's values",
               training_without_syncs, only)
    checks.run(10, "a training batch cut to its attended span trains as the whole bucket (noise drawn there)",
               cut_batch_trains_as_the_bucket, only)
    checks.run(11, "torch.compile with CUDA graphs (reduce-overhead): no skip, eager result on replays",
               compiled_cuda_graphs, only)
    checks.run(12, "the one-kernel hybrid site (fused_site): real shapes, sampling, CUDA graphs", fused_site_kernel,
               only)
    checks.run(13, "--unet-fp8: float8 linears match the rounded operands' product; their speed", float8_linears,
               only)
    checks.run(14, "a run's features reach the GPU through page-locked staging, unchanged", staged_features, only)

    report = common.Report("GPU correctness checks", common.env_header(device, opts.root))
    report.table("checks", ["#", "check", "result", "detail"], checks.rows)
    if not cuda:
        report.notes.append("CPU run: the code paths only (device == reference); the numbers that matter come "
                            "from a CUDA run.")
    report.emit(opts)
    sys.exit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
