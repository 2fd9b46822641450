"""Reading a training batch's LLM features from the feature cache: one read thread vs several.

    python bench/cache_reads.py            # 8B shapes (32 layers x 4096), batch 16, 48-token captions
    python bench/cache_reads.py --small    # the same shapes, fewer repeats (it is a host-side benchmark)

What the trainer's prefetch thread does per batch (feature_cache.compact_features, the bulk of its
"host prep"): allocate the batch buffer (page-locked on CUDA, as the trainer's) and have each sample's
stored hidden state and scores copied into it from a cache shard (stored_tensor.read_all: one preadv
per tensor, on up to READ_THREADS threads). The shard is written once into a temporary folder and read
from the page cache, as in an epoch after the first. Baseline: the same reads on one thread.
Interleaved repeats, medians.

A second table: the same batch collated by the trainer's prefetcher (prefetch.Prefetcher) with 1, 2 or 3 batches
prepared side by side (train.py --prefetch-batches), the reads on READ_THREADS threads: milliseconds per batch
delivered when the taker never waits, i.e. the pace the data path alone allows.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse() -> Any:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=48, help="mean caption length in tokens (lengths vary +-4)")
    p.add_argument("--layers", type=int, default=32, help="LLM layers (scores stored per layer)")
    p.add_argument("--width", type=int, default=4096, help="LLM hidden size")
    p.add_argument("--read-threads", default=None, help="comma list of read-thread counts to compare (default 1,READ_THREADS)")
    p.add_argument("--prefetch-batches", default="1,2,3", help="comma list of prefetch depths for the second table")
    p.add_argument("--no-pin", action="store_true",
                   help="a pageable batch buffer on CUDA too (default there: page-locked, as the trainer's)")
    opts = p.parse_args()
    common.defaults(opts, repeats=7 if opts.small else 15, warmup=2)
    if opts.clock == "auto":
        opts.clock = "wall"  # the point is threads overlapping: process CPU time would add theirs up
    return opts


def main() -> None:
    opts = parse()
    device = common.setup_comfy(opts)
    import torch
    from safetensors.torch import save_file

    from llmdiff_core.features import LLMSpec
    from llmdiff_core.training import feature_cache as fc, prefetch, stored_tensor as st

    opts.pin = device.type == "cuda" and not opts.no_pin

    counts = [int(t) for t in (opts.read_threads or f"1,{st.READ_THREADS}").split(",")]
    spec = fc.CacheSpec({}, LLMSpec("llama", "bench", opts.width, opts.layers), 129, [0], True, "bf16")
    report = common.Report("Cache reads per training batch (feature_cache.compact_features)", common.env_header(
        device, opts.root, batch=opts.batch, tokens=opts.tokens, llm=f"{opts.width}x{opts.layers}", pin=opts.pin,
        read_threads_default=st.READ_THREADS, repeats=opts.repeats, warmup=opts.warmup))
    with tempfile.TemporaryDirectory(prefix="llmdiff-bench-reads-") as tmp:
        path = Path(tmp) / "rank0-00000.safetensors"
        lengths = [opts.tokens - 4 + i % 9 for i in range(opts.batch)]
        save_file({name: t for i, n in enumerate(lengths) for name, t in (
            (f"{i}.scores", torch.randn(opts.layers, n, opts.width).bfloat16()),
            (f"{i}.hidden", torch.randn(1, n, opts.width).bfloat16()),
            (f"{i}.mask", torch.ones(n, dtype=torch.uint8)))}, str(path))
        samples = []
        for i in range(opts.batch):
            places: dict[str, Any] = st.stored_tensors(path, i)
            places["mask"] = places["mask"].load()
            samples.append(fc.CachedSample(str(i), i, 0, i, "", (0, 0, 0, 0), places))
        mib = sum(s.tensors[k].nbytes for s in samples for k in ("hidden", "scores")) / 2**20

        def use(n: int) -> None:  # a fresh pool of n threads
            if st._pool is not None:
                st._pool[1].shutdown()
            st.READ_THREADS, st._pool = n, None

        def measured(n: int) -> Any:
            def once() -> float:
                use(n)
                fc.compact_features(samples[:2], spec, pin=opts.pin)  # starts the pool's threads, untimed
                t0 = common.now()
                fc.compact_features(samples, spec, pin=opts.pin)
                return common.now() - t0
            return once

        def prefetched(depth: int, batches: int = 6) -> Any:
            def once() -> float:
                p = prefetch.Prefetcher(lambda: samples, lambda picked: fc.compact_features(picked, spec, pin=opts.pin),
                                    depth)
                try:
                    p.take()  # the threads started, the first batches under way: untimed
                    t0 = common.now()
                    for _ in range(batches):
                        p.take()
                    return (common.now() - t0) / batches
                finally:
                    p.close()
            return once

        default = st.READ_THREADS
        depths = [int(d) for d in opts.prefetch_batches.split(",")]
        try:
            results = common.interleaved({str(n): measured(n) for n in counts}, opts.repeats, opts.warmup)
            use(default)
            paced = common.interleaved({str(d): prefetched(d) for d in depths}, opts.repeats, opts.warmup)
        finally:
            use(default)
    base = common.median(results[str(counts[0])]["time"])
    rows = []
    for n in counts:
        t = common.median(results[str(n)]["time"])
        rows.append([n, opts.batch, round(mib, 1), t * 1e3, mib / 1024 / t, base / t,
                     100 * common.spread(results[str(n)]["time"])])
    report.table("median ms per batch (interleaved)", ["read threads", "batch", "MiB read", "ms", "GiB/s",
                                                        f"speed-up vs {counts[0]}", "noise ±%"], rows)
    report.notes.append("the trainer uses READ_THREADS = min(4, CPU count) threads; ms = allocate the batch buffer, "
                        "zero the padding, read every sample's hidden state and scores (stored_tensor.read_all).")
    one = common.median(paced[str(depths[0])]["time"])
    report.table(f"ms per batch through the prefetcher, the taker never waiting ({default} read threads)",
                 ["batches side by side", "ms per batch", "GiB/s", f"speed-up vs {depths[0]}", "noise ±%"],
                 [[d, common.median(paced[str(d)]["time"]) * 1e3, mib / 1024 / common.median(paced[str(d)]["time"]),
                   one / common.median(paced[str(d)]["time"]), 100 * common.spread(paced[str(d)]["time"])]
                  for d in depths])
    report.emit(opts)


if __name__ == "__main__":
    main()
