"""A hybrid site's whole new path and fusion per call, at the real site shapes: the product's three kernels
(tau_q's GEMM, the masked attention, the fusion's addcmul) against llmdiff_core/fused_site.py's one kernel, and
that kernel's tiles against each other.

    python bench/site_calls.py            # GPU: SD1.5 512 px and SDXL 1024 px site shapes, fp16, device time
    python bench/site_calls.py --small    # CPU: a 16x16 latent, the three kernels only (eager wall time)

Under CUDA graphs (the sampling targets' setting) a step's U-Net is one replay, so what a site costs there is
its kernels' device time. On CUDA each variant's calls are captured in a CUDA graph and its replays timed with
CUDA events: device time only, no launch overhead, as in a replayed step. Each variant's error is against
fused_site.reference (float64). "per step" weighs each shape by its number of sites (SD1.5: 16, SDXL: 70), with
the bytes each way at the H100's bandwidth beside it (the three kernels move ~7 full-resolution tensors per site,
the one kernel ~3).

Variants: three = the product's default path; fused = the kernel with its own tiles; fused:R/W = R query rows per
program and W warps (the sweep says whether another tile shape is faster at some site shape); fused-attention
(and :R/W) = tau_q as the library GEMM, then the kernel for the attention and the fusion (site kernel
fused-attention: ~5 full-resolution tensors moved, and the GEMM at the library's speed).

A second table asks whether a site's two query projections should be one GEMM. attn2's own to_q and the adapter's
tau_q both read the block's normed input n; the product runs them as two GEMMs (to_q inside the site's
CrossAttention, tau_q in the patch). The layouts: apart = those two GEMMs; cat = one GEMM over both weights
stacked ([2C, C]), each projection a column-half view of its [.., 2C] output; bmm = one batched GEMM (n read by
both batches through a stride-0 view), each projection contiguous. Timed alone ("projections") and with what
consumes them ("core": the original attention over the 77 CLIP tokens as ComfyUI's attention_pytorch runs it, and
the new path with the fusion: fused-attention's kernel where it runs, else the three kernels' attention and
addcmul), since a view's row stride of 2C may cost its consumers more than the GEMM saves. Merging them in the
product would need an object patch of every hybrid site's to_q (docs/benchmarks.md §3w): this says first
whether it pays on a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from attend_calls import SITES, site_keys_values, site_mask  # noqa: E402

# query rows per program / warps: the fused:<tile> variants (launch_config's own at up to 128 keys: 64/8, or 32/4 for
# 128-wide heads; fused-attention's 128/8 for heads up to 64 wide)
TILES = ("16/4", "32/4", "32/8", "64/4", "128/8")
ATTENTION_TILES = ("32/4", "32/8", "64/8", "128/8")  # fused-attention:<tile> variants
# full-resolution [rows, N, C] tensors each variant kind reads or writes per site (fused_site's docstring)
TENSORS_MOVED = {"three": 7, "fused": 3, "fused-attention": 5}
QUERY_LAYOUTS = ("apart", "cat", "bmm")  # a site's to_q and tau_q: two GEMMs, or one (module docstring)
CLIP_TOKENS = 77  # the original path's keys at every site


def parse() -> Any:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--variants", default=None,
                   help="comma list: three, fused, fused:<rows>/<warps>, fused-attention, fused-attention:<rows>/"
                        f"<warps> (default where the kernel runs: three, fused, fused:{', fused:'.join(TILES)}, "
                        f"fused-attention, fused-attention:{', fused-attention:'.join(ATTENTION_TILES)}; else three)")
    p.add_argument("--calls", type=int, default=None, help="calls per measurement (default 50 GPU, 3 --small)")
    p.add_argument("--keys", default="64", help="comma list of attended spans (multiples of 32, at most 256: "
                   "the kernel's MAX_KEYS): the tiles' registers grow with the span")
    p.add_argument("--no-queries", dest="queries", action="store_false",
                   help="leave out the second table (a site's to_q and tau_q as two GEMMs or one)")
    opts = p.parse_args()
    common.defaults(opts, repeats=3 if opts.small else 7, warmup=1)
    opts.calls = opts.calls or (3 if opts.small else 50)
    opts.keys = [int(k) for k in opts.keys.split(",")]
    if any(k % 32 or not 0 < k <= 256 for k in opts.keys):
        p.error(f"--keys {opts.keys}: multiples of 32 up to 256")
    return opts


def site_inputs(dtype: Any, device: Any, side: int, channels: int, heads: int, gen: Any,
                mask: Any) -> tuple[Any, ...]:
    """n, tau_q's weight, the keys and gate-scaled values as the run entry holds them, A_orig, w_orig: a site of
    side x side latent tokens, 2 rows."""
    import torch

    n = side * side

    def rand(*size: int, scale: float = 1.0) -> Any:
        return (scale * torch.randn(*size, generator=gen)).to(device, dtype)
    kv = site_keys_values(mask, channels, heads, gen, device, dtype)
    return (rand(2, n, channels), rand(channels, channels, scale=channels ** -0.5), kv[0], 0.5 * kv[1],
            rand(2, n, channels), torch.tensor(0.9, device=device))


def three_kernels(mask: Any) -> Callable[..., Any]:
    """The product's default path at a site: tau_q (F.linear), attention.attend, attention.fuse_at_core."""
    import torch.nn.functional as F

    from llmdiff_core.attention import attend, fuse_at_core

    def site(n: Any, w_q: Any, keys: Any, values: Any, a_orig: Any, w_orig: Any) -> Any:
        return fuse_at_core(a_orig, attend(F.linear(n, w_q), keys, values, mask), w_orig)
    return site


def fused_kernel(mask: Any, tile: str = "", project: bool = True) -> Callable[..., Any]:
    """fused_site's kernel at a site (project=False: tau_q by F.linear first, the site kernel fused-attention)."""
    import torch.nn.functional as F

    from llmdiff_core import fused_site

    rows, warps = (int(x) for x in tile.split("/")) if tile else (0, 0)

    def site(n: Any, w_q: Any, keys: Any, values: Any, a_orig: Any, w_orig: Any) -> Any:
        if not project:
            n, w_q = F.linear(n, w_q), None
        return fused_site.hybrid_site(n, w_q, keys, values, mask.bias, mask.keep, a_orig, w_orig, rows, warps)
    return site


def query_projections(layout: str) -> Callable[..., tuple[Any, Any]]:
    """(to_q(n), tau_q(n)) of a site in one of QUERY_LAYOUTS. weights: (to_q's, tau_q's, both stacked as one
    [2C, C] matrix, both as a [2, C, C] batch), built once as a run would build them."""
    import torch
    import torch.nn.functional as F

    def project(n: Any, weights: tuple[Any, Any, Any, Any]) -> tuple[Any, Any]:
        w_q, w_tau, w_cat, w_batch = weights
        if layout == "apart":
            return F.linear(n, w_q), F.linear(n, w_tau)
        if layout == "cat":
            both = F.linear(n, w_cat)
            return both[..., :w_q.shape[0]], both[..., w_q.shape[0]:]
        b, rows, channels = n.shape  # bmm: both batches read the one n (stride 0), each output contiguous
        both = torch.bmm(n.reshape(1, b * rows, channels).expand(2, -1, -1), w_batch.transpose(1, 2))
        return both[0].view(b, rows, -1), both[1].view(b, rows, -1)
    return project


def query_core(layout: str, mask: Any, heads: int, kernel: bool) -> Callable[..., Any]:
    """A site's attention core with both query projections in `layout`: A_orig = ComfyUI's attention_pytorch of
    to_q(n) over the CLIP tokens, then w_orig*A_orig + w_new*A_new over tau_q(n) (fused-attention's kernel if
    `kernel`, else attend and fuse_at_core): what the block's to_out receives."""
    from comfy.ldm.modules.attention import attention_pytorch

    from llmdiff_core import fused_site
    from llmdiff_core.attention import attend, fuse_at_core

    project = query_projections(layout)

    def core(n: Any, weights: tuple[Any, ...], clip_kv: tuple[Any, Any], keys: Any, values: Any,
             w_orig: Any) -> Any:
        q, tau_q = project(n, weights)
        a_orig = attention_pytorch(q, clip_kv[0], clip_kv[1], heads)
        if kernel:
            return fused_site.hybrid_site(tau_q, None, keys, values, mask.bias, mask.keep, a_orig, w_orig)
        return fuse_at_core(a_orig, attend(tau_q, keys, values, mask), w_orig)
    return core


def query_tables(report: Any, opts: Any, device: Any, dtype: Any, mask: Any, kernel: bool) -> None:
    """The second table: a site's to_q and tau_q as two GEMMs or one, alone and with their consumers."""
    import torch

    rows, step_rows = [], []
    gen = torch.Generator().manual_seed(1)
    for family in [m for m in opts.models.split(",") if m]:
        per_step: dict[tuple[str, str], float] = {}
        for side, channels, heads, sites in SITES[family]:
            side = side // 4 if opts.small else side
            n, w_tau, keys, values, _, w_orig = site_inputs(dtype, device, side, channels, heads, gen, mask)
            w_q = (channels ** -0.5 * torch.randn(channels, channels, generator=gen)).to(device, dtype)  # attn2.to_q
            weights = (w_q, w_tau, torch.cat([w_q, w_tau]), torch.stack([w_q, w_tau]))
            clip_kv = tuple(torch.randn(2, CLIP_TOKENS, channels, generator=gen).to(device, dtype) for _ in range(2))
            calls: dict[tuple[str, str], Callable[[], Any]] = {}
            for layout in QUERY_LAYOUTS:
                project, core = query_projections(layout), query_core(layout, mask, heads, kernel)
                calls["projections", layout] = lambda project=project: project(n, weights)
                calls["core", layout] = lambda core=core: core(n, weights, clip_kv, keys, values, w_orig)
            def outputs(out: Any) -> list[Any]:
                return [t.double() for t in ((out,) if isinstance(out, torch.Tensor) else out)]
            with torch.inference_mode():
                want = {what: outputs(calls[what, "apart"]()) for what in ("projections", "core")}
                errors, measurements = {}, {}
                for (what, layout), call in calls.items():
                    got = outputs(call())
                    errors[what, layout] = max(float((g - w).abs().max() / w.abs().max())
                                               for g, w in zip(got, want[what]))
                    measurements[f"{what} {layout}"] = device_timer(call, opts.calls, device)
                results = common.interleaved(measurements, opts.repeats, opts.warmup)
            for what in ("projections", "core"):
                base = common.median(results[f"{what} apart"]["time"])
                for layout in QUERY_LAYOUTS:
                    times = results[f"{what} {layout}"]["time"]
                    t = common.median(times)
                    per_step[what, layout] = per_step.get((what, layout), 0.0) + t * sites
                    rows.append([family, side * side, channels, heads, sites, what, layout, t * 1e6, t / base,
                                 100 * common.spread(times), f"{errors[what, layout]:.1e}"])
        for (what, layout), t in per_step.items():
            step_rows.append([family, what, layout, t * 1e3, (t - per_step[what, "apart"]) * 1e3])
    report.table("a site's to_q and tau_q: two GEMMs or one (interleaved medians)",
                 ["model", "tokens", "channels", "heads", "sites", "timed", "layout", "µs/call", "vs apart",
                  "noise ±%", "rel. error vs apart"], rows)
    report.table("query layouts per U-Net call (all sites)", ["model", "timed", "layout", "ms/step", "ms vs apart"],
                 step_rows)
    report.notes.append(f"query layouts: 'core' is the original attention over {CLIP_TOKENS} CLIP tokens plus the new "
                        "path and the fusion (" + ("fused-attention's kernel" if kernel else "the three kernels' "
                        "attention and addcmul") + ") on top of the two projections; the error is against apart's "
                        "outputs (the same math: GEMM rounding only).")


def site_variants(names: list[str], mask: Any, kernel_runs: bool) -> dict[str, Callable[..., Any]]:
    """--variants' site functions for one prompt pair's mask."""
    variants: dict[str, Callable[..., Any]] = {}
    for name in names:
        if name == "three":
            variants[name] = three_kernels(mask)
        elif name.partition(":")[0] in ("fused", "fused-attention"):
            if not kernel_runs:
                raise SystemExit(f"{name}: fused_site's kernel does not run here (CUDA with Triton, or Triton's "
                                 "interpreter on a CPU)")
            kind, _, tile = name.partition(":")
            variants[name] = fused_kernel(mask, tile, project=kind == "fused")
        else:
            raise SystemExit(f"--variants: unknown {name!r} (three, fused[:<rows>/<warps>], "
                             "fused-attention[:<rows>/<warps>])")
    return variants


def device_timer(fn: Callable[[], Any], calls: int, device: Any) -> Callable[[], float]:
    """Seconds per call: on CUDA, `calls` calls captured in one CUDA graph, its replay timed by CUDA events;
    elsewhere a loop of `calls` calls (common.timed)."""
    import torch

    if device.type != "cuda":
        return common.timed(fn, device, calls)
    side = torch.cuda.Stream()  # warmed on a side stream before the capture, as torch.cuda.graph's docs ask
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()  # (Triton's first launch compiles; cuBLAS and cuDNN set up their workspaces and plans)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()

    def replay() -> float:
        start, end = common.cuda_timing_event(), common.cuda_timing_event()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    return replay


def main() -> None:
    opts = parse()
    device = common.setup_comfy(opts)
    import torch

    from llmdiff_core import fused_site

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    kernel_runs = fused_site.applies(device, dtype, 8, 64, 64)
    names = (opts.variants.split(",") if opts.variants else
             ["three"] + (["fused"] + [f"fused:{t}" for t in TILES] + ["fused-attention"]
                          + [f"fused-attention:{t}" for t in ATTENTION_TILES] if kernel_runs else []))
    report = common.Report("A hybrid site per call at the site shapes: three kernels vs one", common.env_header(
        device, opts.root, dtype=str(dtype).replace("torch.", ""), calls=opts.calls, repeats=opts.repeats,
        warmup=opts.warmup, clock="device time, CUDA-graph replays" if device.type == "cuda" else opts.clock))
    rows, step_rows = [], []
    gen = torch.Generator().manual_seed(0)
    element = torch.finfo(dtype).bits // 8
    for span in opts.keys:
        mask = site_mask(dtype, device, span)
        variants = site_variants(names, mask, kernel_runs)
        for family in [m for m in opts.models.split(",") if m]:
            per_step = {name: 0.0 for name in variants}
            bytes_step = dict.fromkeys(TENSORS_MOVED, 0.0)
            for side, channels, heads, sites in SITES[family]:
                side = side // 4 if opts.small else side
                inputs = site_inputs(dtype, device, side, channels, heads, gen, mask)
                n, w_q, keys, values, a_orig, w_orig = inputs
                want = fused_site.reference(n, w_q, keys, values, mask.bias, mask.keep, a_orig, w_orig)
                full = 2 * side * side * channels * element  # one full-resolution [2, N, C] tensor
                for kind, tensors in TENSORS_MOVED.items():
                    bytes_step[kind] += tensors * full * sites
                errors: dict[str, str] = {}
                measurements = {}
                with torch.inference_mode():
                    for name, site in variants.items():
                        unfit = set(fused_site._UNFIT)
                        try:  # a tile shape this GPU cannot run (Triton's out-of-resources) is reported, not fatal
                            got = site(*inputs).double()
                            if fused_site._UNFIT != unfit:  # (the op computed it with torch's kernels instead)
                                raise RuntimeError("does not fit this GPU: the op fell back to the three kernels")
                            measurements[name] = device_timer(lambda site=site: site(*inputs), opts.calls, device)
                        except Exception as exc:
                            errors[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                            continue
                        errors[name] = f"{float((got - want).abs().max() / want.abs().max()):.1e}"
                    results = common.interleaved(measurements, opts.repeats, opts.warmup)
                base = common.median(results["three"]["time"]) if "three" in results else float("nan")
                for name in variants:
                    times = results[name]["time"] if name in results else [float("nan")]
                    t = common.median(times)
                    per_step[name] += t * sites
                    moved = TENSORS_MOVED[name.partition(":")[0]] * full
                    rows.append([family, span, side * side, channels, heads, sites, name, t * 1e6, t / base,
                                 100 * common.spread(times), errors[name], moved / common.H100_BYTES * 1e6])
            for name, t in per_step.items():
                moved = bytes_step[name.partition(":")[0]]
                step_rows.append([family, span, sum(s[3] for s in SITES[family]), name, t * 1e3,
                                  (t - per_step.get("three", float("nan"))) * 1e3, moved / 1e9,
                                  moved / common.H100_BYTES * 1e3])
    report.table("µs per site call (interleaved medians)",
                 ["model", "keys", "tokens", "channels", "heads", "sites", "variant", "µs/call", "vs three",
                  "noise ±%", "rel. error vs float64", "bytes at 3.35 TB/s µs"], rows)
    report.table("per U-Net call (all sites)", ["model", "keys", "sites", "variant", "ms/step", "ms vs three",
                                                 "GB moved", "GB at 3.35 TB/s ms"], step_rows)
    if opts.queries:
        query_tables(report, opts, device, dtype, site_mask(dtype, device, opts.keys[0]), kernel_runs)
    report.notes.append("rows 2; keys: the attended span (a prompt of keys - 4 tokens and an empty negative, 64 keys "
                        "being a 60-token prompt in the 129-token bucket); the query layouts at the first of --keys.")
    if device.type == "cuda":
        report.notes.append("device time per call: each variant's calls captured in a CUDA graph and replayed "
                            "(no launch overhead, as in a sampling step under reduce-overhead).")
    if opts.small:
        report.notes.append("--small: CPU at a 16x16 latent; per-call costs here say nothing about a GPU's.")
    report.emit(opts)


if __name__ == "__main__":
    main()
