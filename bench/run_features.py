"""What a sampling run does with its prompts' LLM features before its first step, once per run
(adapter_runtime.AdapterRuntime._build_entry, docs/benchmarks.md §3n): the distinct rows of the call, only what
the score encoding reads (H_0 and the scores), only up to the attended span's end, moved to the U-Net's device.

    python bench/run_features.py            # 8B shapes (32 layers x 4096), bf16 on the CPU as Text Encode
                                            # leaves them, a positive of 20 / 60 / 120 tokens + an empty negative
    python bench/run_features.py --small    # the same shapes, fewer repeats

Variants, interleaved (each move goes through llmdiff_core.features.moved, which on CUDA stages pageable memory
in page-locked memory since session 23, except where a variant says otherwise):
- `join, then cut`: the rows joined over the whole token bucket, the span cut from the result and moved (the
  entry before session 11: a host copy of the whole bucket, then a second one of the span to move it);
- `cut, join, move`: the span decided on the key mask first, the rows cut, joined on the host, moved;
- `cut, move, join` (the product, FeatureBatch.distinct with a device): each prompt's cut rows moved, joined on
  the device; on CUDA each through page-locked staging (torch's caching host allocator: allocated once, then
  reused), moved asynchronously. On a CPU device it is the same work as the one before.
On CUDA, two more:
- `cut, move, join, pageable`: the product of sessions 11-22, each cut moved straight from pageable memory
  (session 12: ~7 GB/s on the H100, 3-9 ms per run; session 23's H200: 2.9-9.3 ms against 1.8-4.3 staged);
- `stored pinned, whole bucket`: the features kept page-locked from the start (what Text Encode would have to
  do), each prompt's read tensors moved whole and asynchronously, no host copy at all, cut and joined on the
  device.
Timed up to the features on the device (a CUDA sync included), so on a GPU it holds the host-to-device copies
too. All give the same tensors (checked).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse() -> Any:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", default="20,60,120", help="the positive prompt's tokens, BOS included")
    p.add_argument("--max-tokens", type=int, default=128, help="the token bucket (Text Encode's max_tokens)")
    p.add_argument("--layers", type=int, default=32, help="LLM layers")
    p.add_argument("--width", type=int, default=4096, help="LLM hidden size")
    opts = p.parse_args()
    common.defaults(opts, repeats=3 if opts.small else 9, warmup=1 if opts.small else 2)
    if opts.clock == "auto":  # copies: the wall clock is what a run waits for, also on the CPU
        opts.clock = "wall"
    return opts


def main() -> None:
    opts = parse()
    device = common.setup_comfy(opts)
    import torch

    from llmdiff_core.attention import RunMask
    from llmdiff_core.conditioning import FeatureBatch, FeaturePart
    from llmdiff_core.features import LLMFeatures, LLMSpec, stored_values

    spec = LLMSpec("llama", "bench", opts.width, opts.layers)
    read = ([0], True)  # AdapterConfig.features_read() of the score encoding with c0 = embeddings
    T = opts.max_tokens

    def prompt(tokens: int, seed: int) -> LLMFeatures:
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(1, opts.layers + 1, T, opts.width, generator=g).bfloat16()
        scores = torch.randn(1, opts.layers, T, opts.width, generator=g).bfloat16()
        mask = torch.zeros(1, T, dtype=torch.bool)
        mask[0, 1:tokens] = True  # BOS not attended
        return LLMFeatures(spec, hidden, scores, mask)

    def span_end(key_mask: torch.Tensor) -> int:  # as the entry decides it (host mask, fp16 U-Net)
        return RunMask.prepare(key_mask, torch.float16, device).read_stop

    def join_then_cut(batch: FeatureBatch) -> LLMFeatures:
        features, _ = batch.distinct(read)
        return features.first_tokens(span_end(features.mask)).to(device)

    def cut_join_move(batch: FeatureBatch) -> LLMFeatures:
        return batch.distinct(read, tokens=span_end(batch.distinct_mask()[0]))[0].to(device)

    def cut_move_join(batch: FeatureBatch) -> LLMFeatures:
        return batch.distinct(read, tokens=span_end(batch.distinct_mask()[0]), device=device)[0]

    def moved_pageable(t: torch.Tensor) -> torch.Tensor:
        """t on the device straight from its pageable memory (only what it stores: its broadcast axes stay views)."""
        return stored_values(t).to(device).expand(t.shape)

    def parts_of(batch: FeatureBatch) -> list[LLMFeatures]:
        return [part.features.reading(*read) for part in batch.parts]

    def cut_move_join_pageable(batch: FeatureBatch) -> LLMFeatures:
        n = span_end(batch.distinct_mask()[0])
        cut = [f.first_tokens(n) for f in parts_of(batch)]
        return LLMFeatures.cat([LLMFeatures(spec, moved_pageable(f.hidden), moved_pageable(f.scores),
                                            f.mask.to(device)) for f in cut])

    def stored_pinned(batch: FeatureBatch) -> LLMFeatures:  # (moved: from pinned memory, asynchronously)
        n = span_end(batch.distinct_mask()[0])
        return LLMFeatures.cat([f.to(device).first_tokens(n) for f in parts_of(batch)])

    def pinned(features: LLMFeatures) -> LLMFeatures:
        return LLMFeatures(spec, features.hidden.pin_memory(), features.scores.pin_memory(), features.mask)

    rows = []
    for tokens in [int(x) for x in opts.prompt_tokens.split(",") if x]:
        pos, neg = prompt(tokens, 1), prompt(1, 2)
        batch = FeatureBatch((FeaturePart(pos, (0,)), FeaturePart(neg, (0,))))
        variants = {"join, then cut": (join_then_cut, batch), "cut, join, move": (cut_join_move, batch),
                    "cut, move, join": (cut_move_join, batch)}
        if device.type == "cuda":  # (page-locked memory needs CUDA)
            variants["cut, move, join, pageable"] = (cut_move_join_pageable, batch)
            variants["stored pinned, whole bucket"] = (stored_pinned, FeatureBatch(
                (FeaturePart(pinned(pos), (0,)), FeaturePart(pinned(neg), (0,)))))
        now = cut_move_join(batch)
        for fn, b in variants.values():
            other = fn(b)
            if not all(torch.equal(getattr(other, n).cpu(), getattr(now, n).cpu()) for n in ("hidden", "scores", "mask")):
                raise SystemExit("the variants gave different features")
        results = common.interleaved({name: common.timed(lambda fn=fn, b=b: fn(b), device)
                                      for name, (fn, b) in variants.items()}, opts.repeats, opts.warmup)
        base = common.median(results["join, then cut"]["time"])
        moved = sum(t.untyped_storage().nbytes() for t in (now.hidden, now.scores)) / 2**20
        for name in variants:
            t = common.median(results[name]["time"])
            rows.append([tokens, now.num_tokens, name, t * 1e3, base / t, 100 * common.spread(results[name]["time"]),
                         moved])
    report = common.Report("A sampling run's LLM features, once per run: distinct rows cut to the span and moved",
                           common.env_header(device, opts.root, llm=f"{opts.width}x{opts.layers}", max_tokens=T,
                                             stored="bf16 on the CPU", repeats=opts.repeats, warmup=opts.warmup,
                                             clock=opts.clock))
    report.table("per run, a positive prompt + an empty negative (medians, interleaved)",
                 ["prompt tokens", "span end", "variant", "ms", "speed-up", "noise ±%", "MiB moved"], rows)
    report.notes.append("span end = RunMask.read_stop (the attended tokens rounded up to 32): all the entry copies "
                        "and encodes. On a CPU device the copy to it is free, so the CPU rows are the host's "
                        "copying alone; fresh allocations of tens of MiB fault in their pages, hence the noise. "
                        "MiB moved: what the product moves; 'stored pinned, whole bucket' moves every token of "
                        "what the encoding reads (the 120-token row's size) and cuts on the device.")
    report.emit(opts)


if __name__ == "__main__":
    main()
