"""Where the adapter's per-step sampling overhead goes (profile, not a benchmark table of record).

    python bench/profile_sampling.py --small [--model sd15|sdxl] [--mode clip|llm] [--steps 20] [--compile inductor]

Runs the unpatched and the patched model through comfy.sample.sample (warm, same inputs) and prints:
  1. cProfile of the patched run: every llmdiff_core function, calls and time per sampling step; then
     every Python function's own host time per step, patched minus unpatched (under CUDA graphs the
     device runs a step as one launch: an overhead above the kernels' is host time, and this says whose);
  2. torch.profiler: aten ops per step, patched minus unpatched (count and self CPU time). On a GPU
     each extra aten op is (at least) one more kernel launch, which is what a launch-bound eager step
     pays for; on a CPU it is the dispatcher + allocator overhead of the op;
  3. a census of what the patches do per step that is constant per run (casts, mask moves);
  4. on CUDA, the device kernels per step, patched minus unpatched (count and device time): with --compile
     (both models under ComfyUI's torch.compile wrapper, as TorchCompileModel makes them) this is what the
     compiled graph adds per step, the part of the overhead no host-side work explains. Warm-up runs have
     the profiled length (a compiled U-Net compiles again at its first run of another step count), and each
     model runs once unprofiled right before its profile (CUDA-graph trees may record again after a switch).
Works on CPU (--small) and on CUDA (real shapes; add --small for the tiny ones).
"""

from __future__ import annotations

import cProfile
import pstats
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import device_gaps  # noqa: E402


def parse() -> Any:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    p.add_argument("--mode", choices=("clip", "llm"), default="clip")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--llm", choices=("tiny", "1b", "8b"), default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--top", type=int, default=25, help="rows per table")
    p.add_argument("--compile", default=None, metavar="BACKEND",
                   help="profile both models under ComfyUI's torch.compile wrapper (inductor, cudagraphs, ...; "
                        f"{common.HOST_ONLY}: graphs that launch nothing after their first call, so the host-time "
                        "table is a step's host work alone)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode with --compile inductor")
    opts = p.parse_args()
    common.defaults(opts, repeats=1, warmup=1)
    opts.llm = opts.llm or ("tiny" if opts.small else "8b")
    opts.tokens = opts.tokens or (32 if opts.small else 128)
    opts.prompt_tokens = opts.prompt_tokens or (20 if opts.small else 60)
    return opts


def main() -> None:
    opts = parse()
    device = common.setup_comfy(opts)
    import torch
    from torch.profiler import ProfilerActivity, profile

    import builders
    import comfy.model_management as mm
    import comfy.sample
    from llmdiff_core.comfy_patch import apply_adapter, forget_kept_entries

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    spec = builders.llm_spec(opts.llm)
    shape = builders.unet_shape(opts.model, opts.small)
    base = builders.build_unet(opts.model, opts.small, dtype, device, offload_device=mm.unet_offload_device())
    batch = opts.rows // 2
    clip_pos, clip_neg = builders.clip_conditioning(shape, batch, 1), builders.clip_conditioning(shape, batch, 2)
    pos, neg = builders.prompt_pair(shape, spec, opts.tokens, opts.prompt_tokens, 0, batch)
    patched = apply_adapter(base, builders.build_adapter(base, spec, opts.mode, max_tokens=opts.tokens))
    if opts.compile:  # the warm-up below compiles each (its own graph of the same U-Net code)
        base, patched = (common.comfy_compiled(m, opts.compile, opts.compile_mode) for m in (base, patched))
    noise = torch.randn(batch, 4, shape.latent, shape.latent, generator=torch.Generator().manual_seed(0))

    def run(mp: Any, positive: list, negative: list, steps: int) -> None:
        forget_kept_entries(mp)  # every run builds its entry, as for a new prompt: what sessions before 14 profiled
        with torch.inference_mode():
            comfy.sample.sample(mp, noise, steps, 5.0, "euler", "normal", positive, negative, torch.zeros_like(noise),
                                disable_pbar=True, seed=0)
        common.sync(device)

    # warm-up runs of the profiled length: ComfyUI hands the U-Net transformer_options["sample_sigmas"], [steps + 1],
    # so a compiled U-Net warmed up on 2 steps compiles again (that dim dynamic) at its first 20-step run
    for _ in range(max(1, opts.warmup)):
        run(base, clip_pos, clip_neg, opts.steps)
        run(patched, pos, neg, opts.steps)
    steps = opts.steps
    compiled = "" if not opts.compile else f", compiled ({opts.compile}" + (
        f", mode {opts.compile_mode})" if opts.compile_mode else ")")
    print(f"### Profile: {opts.model} {'small' if opts.small else 'real'} {shape.pixels} px, {opts.rows} rows, "
          f"{'hybrid (clip)' if opts.mode == 'clip' else 'paper (llm)'}, {steps} steps{compiled}\n")
    print(", ".join(f"{k} {v}" for k, v in common.env_header(device, opts.root).items()), "\n")

    # 1. cProfile: the pack's own Python, per step; then every function's host time, patched minus unpatched
    def python_profile(mp: Any, positive: list, negative: list) -> pstats.Stats:
        run(mp, positive, negative, steps)  # (after a switch of models: see ops_of)
        prof = cProfile.Profile()
        prof.enable()
        run(mp, positive, negative, steps)
        prof.disable()
        return pstats.Stats(prof)

    base_stats = python_profile(base, clip_pos, clip_neg)
    stats = python_profile(patched, pos, neg)
    total = stats.total_tt
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if "llmdiff_core" in file:
            rows.append([f"{Path(file).name}:{line} {func}", nc / steps, tt / steps * 1e3, ct / steps * 1e3])
    rows.sort(key=lambda r: -r[3])
    print(f"**cProfile, patched run: llmdiff_core functions per step** (whole step: {total / steps * 1e3:.2f} ms "
          f"under the profiler)\n")
    print(common.markdown_table(["function", "calls/step", "own ms/step", "cumulative ms/step"], rows[:opts.top]))
    print()
    host_difference(base_stats, stats, steps, opts.top)

    # 2. torch.profiler: aten ops per step, patched minus unpatched
    def ops_of(mp: Any, positive: list, negative: list) -> tuple[Counter, Counter, Counter, Counter]:
        """aten calls and their self time; device kernels and their device time (CUDA), per run."""
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        # First a run of the same model, unprofiled: after a switch of models CUDA-graph trees may warm up and
        # record again, and that belongs outside the profile (H100, session 12: the profiled unpatched run held
        # two eager U-Net calls, ~1 ms per step of kernels that are no replay's: the warm-up had run 2 steps, so
        # the 20-step run compiled again, and CUDA-graph trees warmed up and recorded the new graph).
        run(mp, positive, negative, steps)
        with profile(activities=acts) as p:
            run(mp, positive, negative, steps)
        count, self_us, kernels, kernel_us = Counter(), Counter(), Counter(), Counter()
        for e in p.key_averages():
            if e.key.startswith("aten::"):
                count[e.key] += e.count
                self_us[e.key] += e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
            elif device_gaps.is_device_work(e) and e.self_device_time_total > 0:
                kernels[kernel_family(e.key)] += e.count
                kernel_us[kernel_family(e.key)] += e.self_device_time_total
        return count, self_us, kernels, kernel_us

    c0, t0, k0, kt0 = ops_of(base, clip_pos, clip_neg)
    c1, t1, k1, kt1 = ops_of(patched, pos, neg)
    keys = sorted(set(c0) | set(c1), key=lambda k: -(abs(c1[k] - c0[k]) + abs(t1[k] - t0[k]) / 1e3))
    table = [[k, c0[k] / steps, c1[k] / steps, (c1[k] - c0[k]) / steps, (t1[k] - t0[k]) / steps / 1e3]
             for k in keys if c1[k] != c0[k] or abs(t1[k] - t0[k]) > 1]
    clock = "CUDA" if device.type == "cuda" else "CPU"
    print(f"**aten ops per step: unpatched vs patched** (self {clock} time)\n")
    print(common.markdown_table(["op", "unpatched calls/step", "patched calls/step", "extra calls/step",
                                 f"extra self {clock} ms/step"], table[:opts.top]))
    extra_calls = sum(c1.values()) - sum(c0.values())
    print(f"\nextra aten calls per step: {extra_calls / steps:.0f} "
          f"({extra_calls / steps / len(builders.find_sites(base.model.diffusion_model)[0]):.1f} per site); "
          f"unpatched step: {sum(c0.values()) / steps:.0f} aten calls\n")

    # 3. work per step that is constant per run
    casts = sum(c1[k] - c0[k] for k in ("aten::to", "aten::_to_copy", "aten::copy_"))
    print(f"- casts/copies per step added by the patches (aten::to/_to_copy/copy_): {casts / steps:.0f}")
    mask_conv = c1["aten::where"] - c0["aten::where"]
    print(f"- bool attention mask turned into an additive one inside SDPA, per step: {mask_conv / steps:.0f} "
          f"aten::where (the mask is constant over the run)")
    items = c1["aten::item"] - c0["aten::item"]
    print(f"- host syncs (aten::item) per step: unpatched {c0['aten::item'] / steps:.2f}, extra {items / steps:.2f}")
    # a replay dispatches no aten op: a convolution here is a U-Net call run eagerly
    if device.type == "cuda" and common.uses_cuda_graphs(opts.compile, opts.compile_mode):
        print(f"- CUDA graphs: aten::convolution per step (0 when every U-Net call replayed a graph): unpatched "
              f"{c0['aten::convolution'] / steps:.2f}, patched {c1['aten::convolution'] / steps:.2f}")
    print()

    # 4. what the device runs per step, by kernel (CUDA): compiled, the adapter's whole cost lies here
    if device.type == "cuda":
        kernel_table(k0, kt0, k1, kt1, steps, len(builders.find_sites(base.model.diffusion_model)[0]), opts.top)

    # 5. fixed host cost of the per-site math: one-token tensors, so nothing but Python + dispatch is timed
    host_overhead(device, opts.top)


def host_difference(base: pstats.Stats, patched: pstats.Stats, steps: int, top: int) -> None:
    """Where the patched step's extra host time goes: every Python function's own time (the C calls it makes
    included, as cProfile counts them), patched minus unpatched, per step. Under CUDA graphs the device runs a
    step as one launch, so a wall-clock overhead above the kernels' is host time, and this says whose."""
    def own(st: pstats.Stats) -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        for (file, line, func), (_cc, nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
            key = f"{'/'.join(Path(file).parts[-2:])}:{line} {func}"
            if "torchinductor" in file:  # each model's generated code has a file of its own: compare them
                key = f"inductor's generated code: {func}"
            elif func.endswith(".kernel.kernel>"):  # a generated CPU kernel, named by its code's hash
                key = "<a generated kernel>"
            calls, t = out.get(key, (0.0, 0.0))
            out[key] = (calls + nc, t + tt)
        return out
    b, p = own(base), own(patched)
    rows = [[k, b.get(k, (0, 0))[0] / steps, p.get(k, (0, 0))[0] / steps,
             (p.get(k, (0, 0))[1] - b.get(k, (0, 0))[1]) / steps * 1e3] for k in set(b) | set(p)]
    rows.sort(key=lambda r: -abs(r[3]))
    print(f"**cProfile, every function: own host time per step, patched minus unpatched** (whole step under the "
          f"profiler: unpatched {base.total_tt / steps * 1e3:.2f} ms, patched {patched.total_tt / steps * 1e3:.2f} ms)\n")
    print(common.markdown_table(["function", "unpatched calls/step", "patched calls/step", "extra own ms/step"],
                                rows[:top]))
    print()


def kernel_family(name: str) -> str:
    """A kernel's name without what tells its graph's kernels apart: inductor numbers its Triton kernels per graph
    (triton_poi_fused_addcmul_select_transpose_view_9), so the patched and the unpatched graph's kernels of the
    same fused ops compare only without the number. Library kernels keep their names (cut to 90 characters)."""
    return re.sub(r"_\d+$", "", name) if name.startswith("triton_") else name[:90]


def kernel_table(k0: Counter, kt0: Counter, k1: Counter, kt1: Counter, steps: int, sites: int, top: int) -> None:
    """Device kernels per step, unpatched vs patched: the launches and device time the adapter adds."""
    keys = sorted(set(k0) | set(k1), key=lambda k: -abs(kt1[k] - kt0[k]))
    rows = [[k, k0[k] / steps, k1[k] / steps, (kt1[k] - kt0[k]) / steps / 1e3] for k in keys
            if k1[k] != k0[k] or abs(kt1[k] - kt0[k]) > 1]
    print("**device kernels per step: unpatched vs patched** (self CUDA time)\n")
    print(common.markdown_table(["kernel", "unpatched calls/step", "patched calls/step", "extra device ms/step"],
                                rows[:top]))
    n0, n1 = sum(k0.values()) / steps, sum(k1.values()) / steps
    d0, d1 = sum(kt0.values()) / steps / 1e3, sum(kt1.values()) / steps / 1e3
    print(f"\nkernels per step: unpatched {n0:.0f}, patched {n1:.0f} ({(n1 - n0) / sites:.1f} more per site); "
          f"device time per step: unpatched {d0:.3f} ms, patched {d1:.3f} ms "
          f"({100 * (d1 / d0 - 1) if d0 else float('nan'):.1f} %, {(d1 - d0) / sites * 1e3:.1f} µs per site)\n")


def host_overhead(device: Any, top: int) -> None:
    """Per-call cost of the product's per-site functions on 1-token inputs vs the bare torch op(s) that do the
    same math (what an implementation with every per-run constant hoisted would call): the new path
    (RunEntry's tau_q weight, attend) and the fusion at the attention core (fuse_at_core), as a hybrid
    site runs them every step; the after-to_out fallback (fuse_after_out: a replace patch occupies the
    site) apart."""
    import torch
    import torch.nn.functional as F

    from llmdiff_core.attention import RunMask, attend, fuse_after_out, fuse_at_core

    def per_call_us(fn: Any, n: int = 2000) -> float:
        for _ in range(100):
            fn()
        common.sync(device)
        t0 = common.now()
        for _ in range(n):
            fn()
        common.sync(device)
        return (common.now() - t0) / n * 1e6

    dt = torch.float16 if device.type == "cuda" else torch.float32
    heads, d, t = 2, 4, 32
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dt)  # noqa: E731
    n, k, v, out = rnd(2, 1, heads * d), rnd(2, t, heads * d), rnd(2, t, heads * d), rnd(2, 1, heads * d)
    to_out = torch.nn.Linear(heads * d, heads * d).to(device, dt)
    mask = torch.zeros(2, t, dtype=torch.bool, device=device)
    mask[0, 1:20], mask[1, 0] = True, True
    rm = RunMask.prepare(mask, dt, device)
    kh_prepared, vh_prepared = rm.heads(rm.span(k), heads), rm.heads(rm.span(v), heads)
    additive = torch.zeros(2, 1, 1, t, device=device, dtype=dt).masked_fill(~mask[:, None, None, :], float("-inf"))
    w_q = rnd(heads * d, heads * d)  # tau_q's weight as the run's entry holds it: in the U-Net dtype, on the device
    kh, vh = (x.view(2, -1, heads, d).transpose(1, 2) for x in (k, v))
    a_orig, s_new = rnd(2, 1, heads * d), 0.5 * attend(F.linear(n, w_q), kh_prepared, vh_prepared, rm)
    w_orig = torch.tensor(0.9, device=a_orig.device)  # (ScaledSites.fusion_weights: a 0-d device tensor)
    w_scaled, b_scaled = 0.5 * to_out.weight, (1 - 0.9) * to_out.bias

    def bare_new_path() -> Any:
        qh = F.linear(n, w_q).view(2, -1, heads, d).transpose(1, 2)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=additive).transpose(1, 2).reshape(2, -1, heads * d)
    product = [
        ["new path: tau_q + masked attention (every step)", per_call_us(lambda: attend(F.linear(n, w_q), kh_prepared,
                                                                                    vh_prepared, rm)),
         per_call_us(bare_new_path), "K/V pre-split into heads, the additive mask made once per run"],
        ["fusion at the attention core (every step)", per_call_us(lambda: fuse_at_core(a_orig, s_new, w_orig)),
         per_call_us(lambda: torch.addcmul(s_new, a_orig, w_orig)), "one addcmul"],
    ]
    fallback = [
        ["fallback: fusion after to_out (a replace patch at the site)",
         per_call_us(lambda: fuse_after_out(out, s_new, to_out.weight, to_out.bias, 0.9)),
         per_call_us(lambda: torch.add(F.linear(s_new, w_scaled, b_scaled), out, alpha=0.9)),
         "w_new*W and (1-w_orig)*b made once per run: one GEMM with bias + one add"],
    ]
    print("**fixed host cost per site and step (1-token inputs: Python + dispatch only)**\n")
    print(common.markdown_table(["per-site step", "pack µs/call", "bare torch µs/call", "the bare version assumes"],
                                (product + fallback)[:top]))
    total = sum(r[1] - r[2] for r in product)
    print(f"\nhost time above bare torch on the product path: {total:.1f} µs per site per step (SD1.5: x16 sites, "
          "SDXL: x70, per U-Net call); the patches' own Python (HybridNewPath, CoreFusion) comes on top")


if __name__ == "__main__":
    main()
