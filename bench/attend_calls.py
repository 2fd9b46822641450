"""The adapter's per-site masked attention, call by call, at the real site shapes: the product's
llmdiff_core.attention.attend against other ways to compute the same thing.

    python bench/attend_calls.py            # GPU: SD1.5 512 px and SDXL 1024 px site shapes, fp16
    python bench/attend_calls.py --small    # CPU: the same layouts at a 16x16 latent, fp32

Why: an eager sampling step is host-bound on the GPU (docs/benchmarks.md §5c), so what an
implementation costs per call (host dispatch and kernels together) decides the per-site overhead.
In a whole sampling run the difference between two implementations is ~100 µs per site, which session
4's run could not resolve (±19-29 % step noise, §5d); here each measurement is a tight loop of the same
call (CUDA synchronised around the loop), interleaved, so the per-call cost shows directly.

Variants: product = attention.attend (torch's SDPA with the additive padding mask, backend chosen by
torch); efficient / cudnn / math = the same call under sdpa_kernel(backend), entered per call as the
product would have to; bmm = matmul-softmax-matmul; keychannel = the mask folded into the keys (an extra
head channel holding 0 / -1e4 that the query multiplies by 1, head dim padded by 8, prepared once per run
like the product's K/V), so SDPA runs unmasked and may take the flash kernel, at the price of a query copy
and an output slice per call; unmasked = SDPA without the mask (a lower bound: the flash kernel, a
different result whenever tokens are masked). Per site shape: rows 2 (CFG), the
prompt's 60 tokens and an empty negative's 1 in a 129-token bucket (span 64 keys after
SPAN_BUCKET), q [2, N, C], C / d heads as in the U-Net. "per step" weighs each shape by its number of
sites (SD1.5: 16, SDXL: 70).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# (tokens per side at 512 / 1024 px, channels, heads, sites): the cross-attention sites of each U-Net
SITES = {
    "sd15": [(64, 320, 8, 5), (32, 640, 8, 5), (16, 1280, 8, 5), (8, 1280, 8, 1)],
    "sdxl": [(64, 640, 10, 10), (32, 1280, 20, 60)],
}
VARIANTS = ("product", "efficient", "cudnn", "math", "bmm", "keychannel", "unmasked")


def parse() -> Any:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--calls", type=int, default=None, help="calls per measurement (default 200 GPU, 5 --small)")
    opts = p.parse_args()
    common.defaults(opts, repeats=5 if opts.small else 9, warmup=1 if opts.small else 2)
    opts.calls = opts.calls or (5 if opts.small else 200)
    return opts


def site_mask(dtype: Any, device: Any, keys: int = 64) -> Any:
    """The benches' per-site prompt pair (attend_calls, site_calls, gpu_checks' check 12): rows 2, a prompt of
    keys - 4 tokens (60 by default) and an empty negative in a bucket of at least 129 tokens, prepared as a run
    prepares it: a span of `keys` keys (a multiple of 32)."""
    import torch

    from llmdiff_core.attention import RunMask

    tokens = torch.zeros(2, max(129, keys + 1), dtype=torch.bool)
    tokens[0, 1:keys - 3] = True  # the prompt (BOS not attended)
    tokens[1, 1] = True  # the empty negative's one token
    mask = RunMask.prepare(tokens, dtype, device)
    assert mask.stop - mask.start == keys, (keys, mask.start, mask.stop)
    return mask


def site_keys_values(mask: Any, channels: int, heads: int, gen: Any, device: Any, dtype: Any) -> list[Any]:
    """Random keys and values of one site for site_mask's prompts, cut to its span and split into heads as a run
    entry holds them: [2, heads, keys, channels / heads] each."""
    import torch

    bucket = max(129, mask.stop)
    return [mask.heads(mask.span(torch.randn(2, bucket, channels, generator=gen)).to(device, dtype), heads)
            for _ in range(2)]


KEY_PAD = 8  # extra head channels: flash attention wants head dims in multiples of 8
MASKED = -1e4  # the extra key channel of a masked token (x the query's 1): exp(scale * -1e4) = 0 in fp16 too


def keychannel(mask: Any) -> Any:
    """attend(q, kh, vh, mask) with the mask folded into the keys: SDPA without attn_mask. The augmented K/V
    are built once per K/V pair (once per run in a product), the query is augmented per call."""
    import torch
    import torch.nn.functional as F

    prepared: dict[tuple[int, int], tuple[Any, Any]] = {}

    def augment(kh: Any, vh: Any) -> tuple[Any, Any]:
        b, h, t, d = kh.shape
        extra = kh.new_zeros(b, h, t, KEY_PAD)
        if mask.bias is not None:  # [B, 1, 1, T] 0 / -inf -> the first extra channel 0 / MASKED
            extra[..., 0] = torch.where(mask.bias[:, :, 0, :] < 0, MASKED, 0.0).to(kh.dtype).expand(b, h, t)
        return torch.cat([kh, extra], -1), torch.cat([vh, vh.new_zeros(b, h, t, KEY_PAD)], -1)

    def attend_keychannel(q: Any, kh: Any, vh: Any) -> Any:
        key = (id(kh), id(vh))
        if key not in prepared:
            prepared[key] = augment(kh, vh)
        ka, va = prepared[key]
        b, n, inner = q.shape
        heads = kh.shape[1]
        d = inner // heads
        qh = q.view(b, n, heads, d).transpose(1, 2)
        ones = q.new_ones(1, 1, 1, 1).expand(b, heads, n, 1)
        qa = torch.cat([qh, ones, q.new_zeros(1, 1, 1, 1).expand(b, heads, n, KEY_PAD - 1)], -1)
        out = F.scaled_dot_product_attention(qa, ka, va, scale=d ** -0.5)[..., :d]
        out = out.transpose(1, 2).reshape(b, n, inner)
        return out if mask.keep is None else out * mask.keep
    return attend_keychannel


def main() -> None:
    opts = parse()
    device = common.setup_comfy(opts)
    import torch

    from llmdiff_core.attention import attend
    from sampling_overhead import attend_variant

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    report = common.Report("Adapter attention per call at the site shapes", common.env_header(
        device, opts.root, dtype=str(dtype).replace("torch.", ""), calls=opts.calls, repeats=opts.repeats,
        warmup=opts.warmup))
    mask = site_mask(dtype, device)
    unmasked = dataclasses.replace(mask, bias=None, keep=None)
    impls: dict[str, Any] = {}
    for name in [v for v in opts.variants.split(",") if v]:
        if name == "product":
            impls[name] = lambda q, k, v: attend(q, k, v, mask)
        elif name == "unmasked":
            impls[name] = lambda q, k, v: attend(q, k, v, unmasked)
        elif name == "keychannel":
            impls[name] = keychannel(mask)
        elif name in VARIANTS:
            impls[name] = (lambda f: lambda q, k, v: f(q, k, v, mask))(attend_variant(name))
        else:
            raise SystemExit(f"--variants: unknown {name!r} ({', '.join(VARIANTS)})")

    rows, step_rows = [], []
    gen = torch.Generator().manual_seed(0)
    for family in [m for m in opts.models.split(",") if m]:
        per_step = {name: 0.0 for name in impls}
        failed: dict[str, str] = {}
        for side, channels, heads, sites in SITES[family]:
            side = side // 4 if opts.small else side
            n = side * side
            q = torch.randn(2, n, channels, generator=gen).to(device, dtype)
            kv = site_keys_values(mask, channels, heads, gen, device, dtype)
            want = attend(q, kv[0], kv[1], mask).float()
            errors: dict[str, float] = {}
            measurements = {}
            for name, impl in impls.items():
                try:
                    got = impl(q, *kv).float()
                    errors[name] = float((got - want).norm() / want.norm())
                except RuntimeError as exc:  # a backend this device or these shapes lack
                    failed[name] = str(exc).splitlines()[0][:60]
                    continue

                measurements[name] = common.timed(lambda impl=impl: impl(q, *kv), device, opts.calls)
            with torch.inference_mode():
                results = common.interleaved(measurements, opts.repeats, opts.warmup)
            base = common.median(results["product"]["time"]) if "product" in results else float("nan")
            for name in impls:
                if name not in results:
                    rows.append([family, n, channels, heads, sites, name, float("nan"), float("nan"), float("nan"),
                                 f"failed: {failed.get(name, '')}"])
                    per_step[name] = float("nan")
                    continue
                t = common.median(results[name]["time"])
                per_step[name] += t * sites
                rows.append([family, n, channels, heads, sites, name, t * 1e6, t / base,
                             100 * common.spread(results[name]["time"]), f"{errors[name]:.1e}"])
        for name, t in per_step.items():
            step_rows.append([family, sum(s[3] for s in SITES[family]), name, t * 1e3,
                              (t - per_step.get("product", float("nan"))) * 1e3])
    report.table("µs per call (interleaved medians)", ["model", "tokens", "channels", "heads", "sites", "variant",
                                                     "µs/call", "vs product", "noise ±%", "rel. error vs product"],
                 rows)
    report.table("per U-Net call (all sites)", ["model", "sites", "variant", "ms/step", "ms vs product"], step_rows)
    report.notes.append("unmasked is a lower bound, not a candidate: it lets the masked keys in (rel. error > 0).")
    report.notes.append("rows 2, 64 attended keys (a 60-token prompt and an empty negative in the 129-token bucket).")
    if opts.small:
        report.notes.append("--small: CPU at a 16x16 latent; per-call costs here say nothing about a GPU's.")
    report.emit(opts)


if __name__ == "__main__":
    main()
