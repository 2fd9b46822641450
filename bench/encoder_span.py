"""The training step's score encoding of a cached batch: over the whole token bucket vs only up to the
attended span's end (what the trainer does since session 6, docs/benchmarks.md §3j).

    python bench/encoder_span.py            # 8B shapes (32 layers x 4096), batch 16, 48-token captions
    python bench/encoder_span.py --small    # the same shapes, fewer repeats (one CPU thread: ~1 s a run)

One measurement = what a training step does with a batch's compact features before the U-Net:
encoders.expand_features (bf16 cache layers -> float32 on the device), ScoreEncoder with the Langevin
noise, and its backward (the gradient of the layer weights g_l, the noise scales and the norm). The
`bucket` variant expands to max_tokens (the trainer before §3j), `span` to attention.attended_span's
stop (the trainer now). Reported: time, the bytes autograd saves for the backward (both devices), and the
peak memory on CUDA. Interleaved repeats, medians.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse() -> Any:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=48, help="the batch's longest caption in tokens, BOS included")
    p.add_argument("--max-tokens", type=int, default=128, help="the token bucket (the trainer's --max-tokens)")
    p.add_argument("--layers", type=int, default=32, help="LLM layers")
    p.add_argument("--width", type=int, default=4096, help="LLM hidden size")
    opts = p.parse_args()
    common.defaults(opts, repeats=3 if opts.small else 15, warmup=1 if opts.small else 3)
    return opts


def main() -> None:
    opts = parse()
    device = common.setup_comfy(opts)
    import torch

    from llmdiff_core.adapter import ScoreEncoder
    from llmdiff_core.attention import attended_span
    from llmdiff_core.config import AdapterConfig, SiteSpec
    from llmdiff_core.features import LLMSpec
    from llmdiff_core.training.encoders import expand_features

    spec = LLMSpec("llama", "bench", opts.width, opts.layers)
    site = SiteSpec(("input", 1), 0, 0, 320, 8, 40, 768)  # the encoder reads no site: any one will do
    encoder = ScoreEncoder(AdapterConfig(base="sd15", sites=[site], llm=spec)).to(device)
    B, n, T = opts.batch, opts.tokens, opts.max_tokens
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, 1, n, opts.width, generator=g).bfloat16().to(device)
    scores = torch.randn(B, opts.layers, n, opts.width, generator=g).bfloat16().to(device)
    host_mask = torch.zeros(B, n, dtype=torch.bool)
    for i in range(B):  # captions of n-8 .. n tokens; BOS not attended
        host_mask[i, 1:n - i % 9] = True
    mask = host_mask.to(device)
    eps = torch.randn(B, T, opts.width, generator=g).to(device)  # drawn at the bucket, cut (as the trainer)
    widths = {"bucket": T, "span": max(attended_span(host_mask, T)[1], n)}
    saved: dict[str, float] = {}
    peaks: dict[str, float | None] = {}

    def step(name: str) -> None:
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.untyped_storage().nbytes()
            return t
        width = widths[name]
        with common.PeakMemory(device) as peak:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                features = expand_features(spec, hidden, scores, mask, (0,), width)
                c = encoder(features, eps=eps[:, :width])
            c.sum().backward()
        encoder.zero_grad(set_to_none=True)
        saved[name], peaks[name] = total[0] / 2**20, peak.peak_gib

    results = common.interleaved({name: common.timed(lambda name=name: step(name), device) for name in widths},
                                 opts.repeats, opts.warmup)
    report = common.Report("Score encoding of a cached training batch: bucket vs attended span", common.env_header(
        device, opts.root, batch=B, caption_tokens=n, max_tokens=T, llm=f"{opts.width}x{opts.layers}",
        repeats=opts.repeats, warmup=opts.warmup, clock=opts.clock))
    base = common.median(results["bucket"]["time"])
    rows = []
    for name, width in widths.items():
        t = common.median(results[name]["time"])
        rows.append([name, width, t * 1e3, base / t, 100 * common.spread(results[name]["time"]), saved[name],
                     common.gib(peaks[name])])
    report.table("expand + encode + backward, median per batch (interleaved)",
                 ["variant", "tokens encoded", "ms", "speed-up vs bucket", "noise ±%", "MiB saved for backward",
                  "peak GiB"], rows)
    report.notes.append("span = attention.attended_span of the batch's host mask (rounded to the 32-token span "
                        "buckets): the tokens the adapter's K/V read; the Langevin draws are made at the bucket "
                        "and cut, as in the trainer. peak GiB: CUDA only.")
    report.emit(opts)


if __name__ == "__main__":
    main()
