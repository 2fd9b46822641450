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
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from attend_calls import SITES, site_keys_values, site_mask  # noqa: E402

# query rows per program / warps: the fused:<tile> variants (launch_config's own: 64/8, or 32/4 for 128-wide heads)
TILES = ("16/4", "32/4", "32/8", "64/4", "128/8")
ATTENTION_TILES = ("32/4", "128/8")  # fused-attention:<tile> variants
# full-resolution [rows, N, C] tensors each variant kind reads or writes per site (fused_site's docstring)
TENSORS_MOVED = {"three": 7, "fused": 3, "fused-attention": 5}


def parse() -> Any:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--variants", default=None,
                   help="comma list: three, fused, fused:<rows>/<warps>, fused-attention, fused-attention:<rows>/"
                        f"<warps> (default where the kernel runs: three, fused, fused:{', fused:'.join(TILES)}, "
                        f"fused-attention, fused-attention:{', fused-attention:'.join(ATTENTION_TILES)}; else three)")
    p.add_argument("--calls", type=int, default=None, help="calls per measurement (default 50 GPU, 3 --small)")
    opts = p.parse_args()
    common.defaults(opts, repeats=3 if opts.small else 7, warmup=1)
    opts.calls = opts.calls or (3 if opts.small else 50)
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
    mask = site_mask(dtype, device)
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

    rows, step_rows = [], []
    gen = torch.Generator().manual_seed(0)
    element = torch.finfo(dtype).bits // 8
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
                    try:  # a tile shape this GPU cannot run (Triton's out-of-resources) is reported, not fatal
                        got = site(*inputs).double()
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
                rows.append([family, side * side, channels, heads, sites, name, t * 1e6, t / base,
                             100 * common.spread(times), errors[name], moved / common.H100_BYTES * 1e6])
        for name, t in per_step.items():
            moved = bytes_step[name.partition(":")[0]]
            step_rows.append([family, sum(s[3] for s in SITES[family]), name, t * 1e3,
                              (t - per_step.get("three", float("nan"))) * 1e3, moved / 1e9,
                              moved / common.H100_BYTES * 1e3])
    report.table("µs per site call (interleaved medians)",
                 ["model", "tokens", "channels", "heads", "sites", "variant", "µs/call", "vs three", "noise ±%",
                  "rel. error vs float64", "bytes at 3.35 TB/s µs"], rows)
    report.table("per U-Net call (all sites)", ["model", "sites", "variant", "ms/step", "ms vs three", "GB moved",
                                                 "GB at 3.35 TB/s ms"], step_rows)
    report.notes.append("rows 2, 64 attended keys (a 60-token prompt and an empty negative in the 129-token bucket).")
    if device.type == "cuda":
        report.notes.append("device time per call: each variant's calls captured in a CUDA graph and replayed "
                            "(no launch overhead, as in a sampling step under reduce-overhead).")
    if opts.small:
        report.notes.append("--small: CPU at a 16x16 latent; per-call costs here say nothing about a GPU's.")
    report.emit(opts)


if __name__ == "__main__":
    main()
