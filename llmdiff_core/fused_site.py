"""One Triton kernel for a hybrid site's whole new path at sampling time (CUDA, opt-in).

At a hybrid site the pack computes, per U-Net call (site_patches.CoreFusion, Eq. 10 of DESIGN.md §1.2):

    A = w_orig * A_orig + keep * softmax(tau_q(n)_h K_h^T / sqrt(d) + bias) (w_new V)_h      (per head h)

as three kernels, each moving a full-resolution [N, C] tensor: tau_q's GEMM (reads n, writes q), the masked
attention (reads q, writes its output) and the fusion's addcmul (reads both outputs, writes A): ~7 N*C
elements per site and step for a few FLOPs, which is most of the adapter's sampling cost (docs/benchmarks.md
§3j). The keys are few (the attended span, at most a few hundred tokens), so one program can hold a block of
query rows, project them, attend over every key and fuse, reading n and A_orig once and writing A once:
~3 N*C. Here that is `hybrid_site`, a torch custom op, so that torch.compile traces it into the U-Net's graph
as one op and CUDA graphs capture its launch.

A second variant, fused-attention, leaves tau_q to the library GEMM and fuses the attention and the fusion
(~5 N*C): at wide sites (SDXL's 1280 channels) tau_q's FLOPs count, and a library GEMM may do them faster than
this kernel's tiles.

The default, auto, picks fused-attention for a sampling run whose U-Net replays inductor's CUDA graphs (ComfyUI's
compile wrapper with mode reduce-overhead or max-autotune, or the option triton.cudagraphs) and the three kernels
everywhere else; LLMDIFF_SITE_KERNEL or apply_adapter(site_kernel=...) names one for every run instead. Under
CUDA graphs on an H200 fused-attention added 4.0 % to a whole SD1.5 sampling step where the three kernels added
5.5 % (docs/benchmarks.md §5i); eager, both kernels made a step slower (each call's Python dispatch and launch,
§5h), and under plain inductor or the cudagraphs backend a whole step has not been timed with them. Where the
kernel does not apply (no CUDA or no Triton, an NVIDIA GPU older than Ampere or an AMD one, float32, a head wider
than MAX_HEAD_DIM, more than MAX_KEYS keys, a training call, paper mode) the pack takes the three-kernel path, and
so does a site whose tiles need more shared memory than the GPU has (found at the kernel's first launch: an RTX
4090 cannot hold 160-channel heads over 256 keys). TRITON_INTERPRET=1 runs it on the CPU (Triton's
interpreter), which is how the tests check its math without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .attention import attend_with, fuse_at_core

SITE_KERNEL_ENV = "LLMDIFF_SITE_KERNEL"
# torch: tau_q's GEMM, the masked attention and the fusion as three kernels; fused: all three in one kernel;
# fused-attention: tau_q stays a library GEMM (where a site is wide, its FLOPs count: SDXL's 1280-channel sites),
# the attention and the fusion are one kernel (~5 N*C moved instead of ~7, and ~3 for fused)
SITE_KERNELS = ("auto", "torch", "fused", "fused-attention")  # auto: kernel_for_run decides per sampling run
MAX_KEYS = 256  # one block of keys per program; longer spans take the three-kernel path
MAX_HEAD_DIM = 256  # (SD1.5's deepest sites: 8 heads of 160)
MIN_CAPABILITY = (8, 0)  # NVIDIA Ampere on (on Turing, sm_75, every tile spilled kilobytes a thread: §3w)

log = logging.getLogger("llmdiff")


def site_kernel_setting(requested: str | None = None) -> str:
    """The site kernel setting: `requested` if given, else $LLMDIFF_SITE_KERNEL, else "auto"."""
    value = requested if requested is not None else os.environ.get(SITE_KERNEL_ENV, "auto")
    if value not in SITE_KERNELS:
        raise ValueError(f"site kernel {value!r} (from {'the call' if requested is not None else SITE_KERNEL_ENV}) "
                         f"is not one of {', '.join(SITE_KERNELS)}")
    return value


def inductor_cuda_graphs(compile_kwargs: Mapping[str, Any] | None) -> bool:
    """Whether a U-Net compiled through ComfyUI's set_torch_compile_wrapper (these are its keyword arguments, kept
    in model_options["torch_compile_kwargs"]) replays inductor's CUDA graphs: mode reduce-overhead or max-autotune,
    or the option triton.cudagraphs."""
    if not compile_kwargs or compile_kwargs.get("backend") != "inductor":
        return False
    options = compile_kwargs.get("options") or {}
    if "triton.cudagraphs" in options:
        return bool(options["triton.cudagraphs"])
    return compile_kwargs.get("mode") in ("reduce-overhead", "max-autotune")


def kernel_for_run(setting: str, compile_kwargs: Mapping[str, Any] | None = None) -> str:
    """The site kernel of one sampling run: `setting` itself, or for "auto" fused-attention where the run's U-Net
    replays inductor's CUDA graphs (the one place a whole step was measured faster with it: docs/benchmarks.md
    §5i) and the three kernels ("torch") elsewhere, including calls outside a sampler."""
    if setting != "auto":
        return setting
    return "fused-attention" if inductor_cuda_graphs(compile_kwargs) else "torch"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_ready() -> bool:
    """Triton is there (it ships with torch's CUDA wheels on Linux), and torch has custom_op (2.4 on)."""
    return importlib.util.find_spec("triton") is not None and hasattr(torch.library, "custom_op")


@functools.cache
def _kernel_gpu(index: int) -> bool:
    """An NVIDIA GPU of compute capability MIN_CAPABILITY or more (ROCm's GPUs report as CUDA: never run there).
    On an older one Triton compiles the kernel with every tile spilling kilobytes a thread to local memory
    (docs/benchmarks.md §3w: sm_75), which the three kernels it replaces do not."""
    return torch.version.hip is None and tuple(torch.cuda.get_device_capability(index)) >= MIN_CAPABILITY


def applies(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int, keys: int) -> bool:
    """Whether hybrid_site can run a site of these shapes: CUDA in half precision on an NVIDIA GPU of
    MIN_CAPABILITY or more (or Triton's CPU interpreter in float32 or float16), a head of at most MAX_HEAD_DIM
    channels and at most MAX_KEYS keys. On the meta device (shapes only: the benchmarks count FLOPs and bytes
    there) it answers as for CUDA, Triton or not. (A tile that needs more shared memory than the GPU has is found
    at its first launch: the op then computes that site with torch's kernels.)"""
    shapes_fit = 0 < head_dim <= MAX_HEAD_DIM and 0 < keys <= MAX_KEYS and heads > 0
    if device.type == "meta":
        return shapes_fit and dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda":
        if dtype not in (torch.float16, torch.bfloat16):
            return False  # float32 would run tl.dot as TF32: less exact than the path it replaces
    elif not (device.type == "cpu" and _interpreted() and dtype in (torch.float32, torch.float16)):
        return False  # (the interpreter's tl.dot reads bfloat16 as raw bits)
    return shapes_fit and _triton_ready() and (device.type == "cpu" or _kernel_gpu(
        torch.cuda.current_device() if device.index is None else device.index))


def _power_of_two(x: int) -> int:
    """The least power of two >= x, at least 16 (tl.dot's smallest side)."""
    return max(16, 1 << (x - 1).bit_length())


def launch_config(head_dim: int, channels: int, tokens: int, project: bool = True, block_rows: int = 0,
                  num_warps: int = 0) -> dict[str, int]:
    """The kernel's tile sizes and warps for a site (project: the kernel computes tau_q, site kernel fused;
    block_rows, num_warps: 0 = this choice): a program holds BLOCK_N query rows of one head, padded to BLOCK_D
    channels, and every key (BLOCK_T).

    Chosen by what ptxas makes of them for sm_90 (registers and spills, docs/benchmarks.md §3t, §3w) and by
    session 21's timings on an H200 at 64 keys (§5h), by the head's padded width (BLOCK_D):
    - heads up to 64 channels: 64 rows on 8 warps (4 warps spilled at 128 keys); for fused-attention 128 rows, 9 %
      faster at SDXL's sites (it lost where it spilled, at wider heads);
    - 128 channels: 32 rows on 4 warps; 256: 64 on 8 (16 rows on 4 spilled at 128 keys and leave Hopper's 64-row
      MMA a quarter full);
    - long spans (256 keys, and 128 for fused-attention's 256-channel heads): a program's scores grow with the
      keys, and 64 rows spilled 0.3 KB a thread (heads of 64) to 2.8 KB (160) at 256 keys, so they take 32 rows on
      8 warps; 160-channel heads at 256 keys spill with every tile, least with 16 rows (0.2 / 0.9 KB).
    tests/compiled_fused_site.py compiles each for Hopper, Ampere and Ada: within shared memory (but 160-channel
    heads over 256 keys on Ada: 136 KB of its 99, which the op hands to torch's kernels), and no spill on Hopper at
    any site shape and span but that one."""
    block_d, block_t = _power_of_two(head_dim), _power_of_two(tokens)
    if block_t >= 256 or (block_d == 256 and block_t >= 128 and not project):  # long spans
        rows, warps = (16 if block_d == 256 and block_t >= 256 else 32), 8
    elif block_d == 128:
        rows, warps = 32, 4
    elif block_d == 64 and not project:
        rows, warps = 128, 8
    else:
        rows, warps = 64, 8
    return {"BLOCK_N": block_rows or rows, "BLOCK_C": 64 if channels >= 64 else _power_of_two(channels),
            "BLOCK_D": block_d, "BLOCK_T": block_t, "num_warps": num_warps or warps}


def hybrid_site(n: torch.Tensor, w_q: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
                bias: torch.Tensor | None, keep: torch.Tensor | None, a_orig: torch.Tensor,
                w_orig: torch.Tensor, block_rows: int = 0, num_warps: int = 0) -> torch.Tensor:
    """w_orig*A_orig + keep*Attn(n @ w_q^T, keys, values, bias) in one kernel.

    n: [B, N, C] the site's normed input; w_q: [H*d, C] tau_q's weight, or None when n is already tau_q(n)
    ([B, N, H*d]: site kernel fused-attention); keys, values: [B, H, T, d] (values
    already scaled by w_new); bias: [B, 1, 1, T] additive (0 / -inf) or None; keep: [B, 1, 1] or None;
    a_orig: [B, N, H*d] the original path's attention output; w_orig: a 0-d tensor. All but w_orig in one
    dtype on one device (applies() says which). block_rows, num_warps: the tiles (query rows per program, a power of
    two >= 16) and warps per program; 0 = this module's choice (bench/site_calls.py compares others)."""
    return op()(n, w_q, keys, values, bias, keep, a_orig, w_orig, block_rows, num_warps)


def reference(n: torch.Tensor, w_q: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
              bias: torch.Tensor | None, keep: torch.Tensor | None, a_orig: torch.Tensor,
              w_orig: torch.Tensor) -> torch.Tensor:
    """hybrid_site's math written out in float64 torch ops, head by head: the slow reference the tests and the
    GPU check (bench/gpu_checks.py, check 12) hold the kernel to. Not used by the pack."""
    b, rows, _ = n.shape
    heads, _, d = keys.shape[1:]
    q = (n.double() if w_q is None else n.double() @ w_q.double().T).view(b, rows, heads, d).transpose(1, 2)
    scores = q @ keys.double().transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias.double()
    out = scores.softmax(-1) @ values.double()
    if keep is not None:
        out = out * keep.double().view(b, 1, 1, 1)
    return w_orig.double() * a_orig.double() + out.transpose(1, 2).reshape(b, rows, heads * d)


@functools.cache
def op() -> Callable[..., torch.Tensor]:
    """hybrid_site's custom op, defined on first use (importing Triton is for CUDA runs only). Callers that
    torch.compile traces look it up before: defining an op is nothing to trace.

    An opaque op (torch.library.custom_op with a fake implementation), not a triton_op that inductor would
    inline: there is nothing for inductor to fuse into it, and the op then traces the same way under Triton's
    CPU interpreter, whose kernels triton_op cannot trace, as on a GPU. Triton is imported at the first launch:
    the meta device runs the fake implementation only."""
    from torch.library import custom_op
    from torch.utils.flop_counter import register_flop_formula

    @custom_op("llmdiff::hybrid_site", mutates_args=())
    def hybrid_site_op(n: torch.Tensor, w_q: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
                       bias: torch.Tensor | None, keep: torch.Tensor | None, a_orig: torch.Tensor,
                       w_orig: torch.Tensor, block_rows: int = 0, num_warps: int = 0) -> torch.Tensor:
        b, rows, channels = n.shape
        heads, tokens, head_dim = keys.shape[1], keys.shape[2], keys.shape[3]
        config = launch_config(head_dim, channels, tokens, w_q is not None, block_rows, num_warps)
        variant = (n.device, n.dtype, head_dim, w_q is not None, bias is not None, keep is not None,
                   *config.values())
        if variant in _UNFIT:
            return _with_torch(n, w_q, keys, values, bias, keep, a_orig, w_orig)
        out = torch.empty(a_orig.shape, dtype=a_orig.dtype, device=a_orig.device)
        grid = (heads, -(-rows // config["BLOCK_N"]), b)
        try:
            _launch(grid, n, w_q, keys, values, bias, keep, a_orig, w_orig, out, rows, channels, tokens, head_dim,
                    config)
        except _out_of_resources() as exc:  # found at the first launch: raised before the kernel runs
            _UNFIT.add(variant)
            log.warning("LLMDiff: the one-kernel site does not fit this GPU at heads of %d over %d keys (%s); "
                        "those sites run the three-kernel path instead", head_dim, tokens, exc)
            return _with_torch(n, w_q, keys, values, bias, keep, a_orig, w_orig)
        return out

    @hybrid_site_op.register_fake
    def _(n: torch.Tensor, w_q: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
          bias: torch.Tensor | None, keep: torch.Tensor | None, a_orig: torch.Tensor, w_orig: torch.Tensor,
          block_rows: int = 0, num_warps: int = 0) -> torch.Tensor:
        return torch.empty(a_orig.shape, dtype=a_orig.dtype, device=a_orig.device)

    @register_flop_formula(torch.ops.llmdiff.hybrid_site)
    def _flops(n: Any, w_q: Any, keys: Any, *_: Any, **__: Any) -> int:
        """(shapes) what FlopCounterMode counts: tau_q (unless w_q is None), then the scores and the values over
        the keys. The tiles' padding of a head to a power of two (SD1.5's 40, 80, 160) is not in it."""
        b, rows, channels = n
        inner, tokens = keys[1] * keys[3], keys[2]
        return (0 if w_q is None else 2 * b * rows * channels * inner) + 4 * b * rows * tokens * inner

    return hybrid_site_op


# op variants (device, dtype, head, flags, tiles) whose kernel did not fit the GPU at its first launch
_UNFIT: set[tuple[Any, ...]] = set()


def _launch(grid: tuple[int, int, int], n: torch.Tensor, w_q: torch.Tensor | None, keys: torch.Tensor,
            values: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor | None, a_orig: torch.Tensor,
            w_orig: torch.Tensor, out: torch.Tensor, rows: int, channels: int, tokens: int, head_dim: int,
            config: dict[str, int]) -> None:
    """The kernel over grid, writing out (a missing w_q, bias or keep: any pointer, never read)."""
    _kernel()[grid](
        n, n if w_q is None else w_q, keys, values, a_orig if bias is None else bias,
        a_orig if keep is None else keep, a_orig, w_orig, out,
        rows, channels, tokens, 1.0 / math.sqrt(head_dim),
        n.stride(0), n.stride(1), n.stride(2), 0 if w_q is None else w_q.stride(0),
        0 if w_q is None else w_q.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
        values.stride(0), values.stride(1), values.stride(2), values.stride(3),
        0 if bias is None else bias.stride(0), 0 if bias is None else bias.stride(3),
        0 if keep is None else keep.stride(0),
        a_orig.stride(0), a_orig.stride(1), a_orig.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=head_dim, PROJECT=w_q is not None, HAS_BIAS=bias is not None, HAS_KEEP=keep is not None,
        **config)


def _with_torch(n: torch.Tensor, w_q: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
                bias: torch.Tensor | None, keep: torch.Tensor | None, a_orig: torch.Tensor,
                w_orig: torch.Tensor) -> torch.Tensor:
    """hybrid_site's math as the three-kernel path computes it (tau_q's GEMM, attention.attend, fuse_at_core): where
    the kernel's tiles need more shared memory or threads than this GPU has (a 160-channel head over 256 keys
    takes 136 KB, an RTX 4090 has 99 KB a block)."""
    q = n if w_q is None else F.linear(n, w_q)
    return fuse_at_core(a_orig, attend_with(q, keys, values, bias, keep), w_orig)


def _out_of_resources() -> type[Exception]:
    """Triton's error for a kernel that asks a GPU for more than it has (shared memory, registers, threads)."""
    from triton.runtime.errors import OutOfResources

    return OutOfResources


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def hybrid_site_kernel(
            n_ptr, wq_ptr, k_ptr, v_ptr, bias_ptr, keep_ptr, a_ptr, wo_ptr, out_ptr,
            N, C, T, scale,
            n_sb, n_sn, n_sc, wq_si, wq_sc,
            k_sb, k_sh, k_st, k_sd, v_sb, v_sh, v_st, v_sd,
            bias_sb, bias_st, keep_sb,
            a_sb, a_sn, a_si, o_sb, o_sn, o_si,
            HEAD_DIM: tl.constexpr, PROJECT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
        # one program: head h of BLOCK_N query rows of batch row b. The heads of a row block are neighbouring
        # programs, so n's block is read from HBM about once and from L2 by the other heads.
        h = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        b = tl.program_id(2)
        row_ok = rows < N
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        col = h * HEAD_DIM + d  # this head's channels of q, A_orig and A

        if PROJECT:  # tau_q, this head's slice: q = n[b, rows] @ w_q[col]^T over C, rounded as F.linear's is
            acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                c_ok = c < C
                x = tl.load(n_ptr + b * n_sb + rows[:, None] * n_sn + c[None, :] * n_sc,
                            mask=row_ok[:, None] & c_ok[None, :], other=0.0)
                w = tl.load(wq_ptr + col[None, :] * wq_si + c[:, None] * wq_sc,
                            mask=c_ok[:, None] & d_ok[None, :], other=0.0)
                acc += tl.dot(x, w)
            q = acc.to(n_ptr.dtype.element_ty)
        else:  # n is tau_q(n) already: this head's columns
            q = tl.load(n_ptr + b * n_sb + rows[:, None] * n_sn + col[None, :] * n_sc,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        # every key at once (T <= BLOCK_T): scores, the mask, a plain softmax
        t = tl.arange(0, BLOCK_T)
        t_ok = t < T
        k = tl.load(k_ptr + b * k_sb + h * k_sh + t[None, :] * k_st + d[:, None] * k_sd,
                    mask=d_ok[:, None] & t_ok[None, :], other=0.0)
        s = tl.dot(q, k) * scale
        if HAS_BIAS:
            s += tl.load(bias_ptr + b * bias_sb + t * bias_st, mask=t_ok, other=0.0).to(tl.float32)[None, :]
        s = tl.where(t_ok[None, :], s, float("-inf"))
        p = tl.exp(s - tl.max(s, axis=1)[:, None])
        v = tl.load(v_ptr + b * v_sb + h * v_sh + t[:, None] * v_st + d[None, :] * v_sd,
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        o = tl.dot(p.to(v.dtype), v) / tl.sum(p, axis=1)[:, None]
        if HAS_KEEP:  # a row with nothing to attend to contributes nothing (RunMask.keep)
            o = o * tl.load(keep_ptr + b * keep_sb).to(tl.float32)

        # the fusion: w_orig * A_orig + (w_new * A_new), rounded once
        out_mask = row_ok[:, None] & d_ok[None, :]
        a = tl.load(a_ptr + b * a_sb + rows[:, None] * a_sn + col[None, :] * a_si, mask=out_mask, other=0.0)
        fused = tl.load(wo_ptr).to(tl.float32) * a.to(tl.float32) + o
        tl.store(out_ptr + b * o_sb + rows[:, None] * o_sn + col[None, :] * o_si,
                 fused.to(out_ptr.dtype.element_ty), mask=out_mask)

    return hybrid_site_kernel
