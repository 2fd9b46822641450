"""--unet-fp8: the frozen U-Net's linear layers as float8 GEMMs while training the adapter (opt-in).

Why: compiled SDXL training is bound by the frozen U-Net's library kernels (docs/benchmarks.md §5g: 181 ms
of kernels in a 213 ms step, its GEMMs the largest share). An H100 does float8 GEMMs at twice the bf16
rate, and the adapter's gradient only needs the U-Net's activation gradients.

How: the weights are frozen, so each one is cast to float8 e4m3 once per run, with one scale per tensor,
in the two layouts torch._scaled_mm takes: W for the forward y = x Wᵀ + b and Wᵀ for the backward's
dx = dy W. The activation is cast per call (e4m3, scaled by its amax) and the output gradient in e5m2
(range before precision), the recipe of torchao's float8 training. No weight gradient is ever computed.
torchao's Float8Linear is not used because it casts the weights again in every forward and backward and
always computes a weight gradient, the work a frozen U-Net does not need.

It changes the numbers (e4m3 keeps 3 mantissa bits): an opt-in for speed, measured by
bench/training_throughput.py --unet-fp8. Convolutions and attention stay in the U-Net's dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from ..errors import LLMDiffError

FORWARD_DTYPE = torch.float8_e4m3fn  # activations and weights
GRADIENT_DTYPE = torch.float8_e5m2  # output gradients: wider range, fewer mantissa bits
MIN_ROWS = 64  # fewer rows (the time and label embeddings: one per sample) gain nothing from float8
_W, _W_T, _W_SCALE = "llmdiff_fp8_weight", "llmdiff_fp8_weight_t", "llmdiff_fp8_scale"


def to_float8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """t as float8 with one fp32 scale: t ≈ q * scale, the largest |t| mapped to the format's largest value.
    q is row-major, as CUDA's _scaled_mm needs its first operand (a gradient can arrive column-major: SDXL's
    proj_out output is permuted to b c h w)."""
    limit = torch.finfo(dtype).max
    scale = t.detach().abs().amax().float().clamp(min=1e-12) / limit
    return (t.float() / scale).clamp(-limit, limit).to(dtype).contiguous(), scale


class _Float8FrozenLinear(torch.autograd.Function):
    """y = x Wᵀ + b on float8 operands, with dx = dy W on the backward; W and b get no gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        xq, x_scale = to_float8(x, FORWARD_DTYPE)
        # _scaled_mm takes a row-major first and a column-major second operand: weight (N, K) row-major is
        # Wᵀ (K, N) column-major. A bias is added in the GEMM's epilogue where the output dtype allows it.
        fused_bias = bias is not None and bias.dtype == x.dtype and x.dtype in (torch.bfloat16, torch.float16)
        y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale, bias=bias if fused_bias else None,
                             out_dtype=x.dtype, use_fast_accum=True)
        if bias is not None and not fused_bias:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(weight_t, scale)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        weight_t, scale = ctx.saved_tensors
        gq, g_scale = to_float8(grad_y, GRADIENT_DTYPE)
        # accumulation in full precision for the gradient (torchao's choice too): fast accumulation loses
        # small contributions, which the gradient needs more than the forward
        grad_x = torch._scaled_mm(gq, weight_t.t(), scale_a=g_scale, scale_b=scale, out_dtype=grad_y.dtype,
                                  use_fast_accum=False)
        return grad_x, None, None, None, None


def float8_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The forward a converted layer runs: float8 for enough rows on the weights' device, else its own."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    weight = getattr(module, _W)
    if rows < MIN_ROWS or x.device != weight.device or _comfy_casts(module):
        # (ComfyUI may offload or patch a layer after the conversion: then its own forward)
        return type(module).forward(module, x)
    y = _Float8FrozenLinear.apply(x.reshape(rows, x.shape[-1]), weight, getattr(module, _W_T),
                                  getattr(module, _W_SCALE), module.bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def check_float8_device(device: torch.device) -> None:
    """A clear error where float8 GEMMs do not run: CUDA before Ada/Hopper, or devices torch lacks them on."""
    if device.type == "cpu":
        return  # torch's CPU kernel (slow; what the tests run)
    if device.type == "cuda":
        import comfy.model_management as mm

        if mm.supports_fp8_compute(device):
            return
        major, minor = torch.cuda.get_device_capability(device)
        raise LLMDiffError(f"--unet-fp8 needs float8 GEMMs: an NVIDIA GPU of compute capability 8.9 or newer "
                           f"(Ada, Hopper, Blackwell) and torch 2.3 or newer; this one is {major}.{minor}. "
                           "Train without --unet-fp8")
    raise LLMDiffError(f"--unet-fp8 runs on CUDA (compute capability 8.9+) or the CPU, not on {device.type}; "
                       "train without --unet-fp8")


def _comfy_casts(module: nn.Module) -> bool:
    """ComfyUI casts or patches this layer's weights per call (an offloaded or LoRA-patched layer)."""
    return bool(getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None)
                or getattr(module, "bias_function", None))


def convertible(module: nn.Module) -> bool:
    """A frozen linear layer whose sizes _scaled_mm takes (multiples of 16) and whose stored weight is the one it
    multiplies by (no per-call cast: float8 copies of such a layer would only take memory)."""
    return (isinstance(module, nn.Linear) and not module.weight.requires_grad and not _comfy_casts(module)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def use_float8_linears(unet: nn.Module, device: torch.device) -> tuple[int, Callable[[], None]]:
    """Every frozen linear layer of the U-Net runs float8_linear; returns how many, and the undo.

    The float8 weights are buffers of their layer (not saved: persistent=False), so they follow the layer
    when ComfyUI moves the model and count as the compiled graph's static inputs (a CUDA-graph replay does
    not copy them)."""
    check_float8_device(device)
    converted: list[nn.Linear] = []
    with torch.no_grad():
        for module in unet.modules():
            if not convertible(module):
                continue
            weight, scale = to_float8(module.weight, FORWARD_DTYPE)
            module.register_buffer(_W, weight, persistent=False)
            module.register_buffer(_W_T, weight.t().contiguous(), persistent=False)
            module.register_buffer(_W_SCALE, scale, persistent=False)
            module.forward = functools.partial(float8_linear, module)  # type: ignore[method-assign]
            converted.append(module)

    def undo() -> None:
        for module in converted:
            del module.forward  # back to the class's method
            for name in (_W, _W_T, _W_SCALE):
                delattr(module, name)
    return len(converted), undo

