"""--unet-fp8 (training/float8_linears.py): the frozen U-Net's linear layers as float8 GEMMs.

The math against a slow float32 reference of the same roundings (torch's CPU _scaled_mm computes what the
GPU one does, in float32), the backward's activation gradient and no weight gradient, which layers are
converted and that the undo restores them, the layers that keep their own forward, and the errors on
devices without float8 GEMMs. The training run itself is in test_train_run.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmdiff_core.errors import LLMDiffError
from llmdiff_core.training import float8_linears as f8
from tiny_unets import tiny_sd15


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as float8 `dtype` with one amax scale, back in float32 (the slow reference of f8.to_float8)."""
    limit = torch.finfo(dtype).max
    scale = t.double().abs().max() / limit
    return ((t.double() / scale).to(dtype).double() * scale).float()


def frozen_linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(k, n, bias=bias)
    layer.requires_grad_(False)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_product_of_the_rounded_operands(dtype: torch.dtype, bias: bool) -> None:
    layer = frozen_linear(64, 48, bias).to(dtype)
    x = (torch.randn(3, 40, 64) * 3).to(dtype)  # 120 rows: the float8 path
    count, undo = f8.use_float8_linears(layer, torch.device("cpu"))
    assert count == 1
    try:
        y = layer(x)
    finally:
        undo()
    reference = F.linear(rounded(x.float(), torch.float8_e4m3fn), rounded(layer.weight.float(), torch.float8_e4m3fn),
                         None if layer.bias is None else layer.bias.float())
    assert y.dtype == dtype and y.shape == (3, 40, 48)
    tol = dict(rtol=0, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)  # (bf16's output)
    torch.testing.assert_close(y.float(), reference, **tol)
    exact = layer(x).float()  # the layer's own forward again after the undo
    assert 0.005 < (y.float() - exact).norm() / exact.norm() < 0.08  # float8's error: there, and small


def test_backward_gives_the_activation_gradient_of_the_rounded_operands_and_no_weight_gradient() -> None:
    layer = frozen_linear(64, 32)
    x = torch.randn(80, 64, requires_grad=True)
    grad_y = torch.randn(80, 32) * 1e-3
    _, undo = f8.use_float8_linears(layer, torch.device("cpu"))
    try:
        layer(x).backward(grad_y)
    finally:
        undo()
    reference = rounded(grad_y, torch.float8_e5m2) @ rounded(layer.weight, torch.float8_e4m3fn)
    torch.testing.assert_close(x.grad, reference, rtol=0, atol=1e-7)
    exact = grad_y @ layer.weight
    assert (x.grad - exact).norm() / exact.norm() < 0.2  # e5m2: 2 mantissa bits
    assert layer.weight.grad is None and layer.bias.grad is None


def test_gemm_operands_have_the_layouts_cuda_takes(monkeypatch) -> None:
    """CUDA's _scaled_mm takes a row-major first and a column-major second operand (the CPU's takes any): an
    output gradient that arrives column-major (b c h w after SDXL's proj_out, batch 1) is cast row-major."""
    layers: list[tuple[bool, bool]] = []
    scaled_mm = torch._scaled_mm

    def spy(a: torch.Tensor, b: torch.Tensor, **kw) -> torch.Tensor:
        layers.append((a.is_contiguous(), b.t().is_contiguous()))
        return scaled_mm(a, b, **kw)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    layer = frozen_linear(64, 32)
    x = torch.randn(1, 80, 64, requires_grad=True)
    _, undo = f8.use_float8_linears(layer, torch.device("cpu"))
    try:
        y = layer(x)
        grad = torch.randn(1, 32, 80).transpose(1, 2)  # (1, 80, 32), column-major as (80, 32)
        assert not grad.reshape(80, 32).is_contiguous()
        y.backward(grad)
    finally:
        undo()
    assert layers == [(True, True), (True, True)]  # forward, backward


def test_the_frozen_unet_linears_are_converted_and_the_undo_restores_them() -> None:
    unet = copy.deepcopy(tiny_sd15().model.diffusion_model)  # (tiny_sd15's clones share one U-Net: not that)
    unet.requires_grad_(False)
    linears = [m for m in unet.modules() if isinstance(m, nn.Linear)]
    trainable = linears[5]
    trainable.weight.requires_grad_(True)  # not frozen: keeps its own forward (its weight gradient)
    keys = set(unet.state_dict())
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10.0, 500.0])
    context = torch.randn(2, 77, 64)
    with torch.no_grad():
        before = unet(x, t, context=context)
        count, undo = f8.use_float8_linears(unet, torch.device("cpu"))
        assert count == len(linears) - 1
        assert set(unet.state_dict()) == keys  # the float8 weights are never saved
        assert "forward" not in vars(trainable)
        assert all(vars(m)["forward"].func is f8.float8_linear for m in linears if m is not trainable)
        converted = unet(x, t, context=context)
        undo()
        after = unet(x, t, context=context)
    assert set(unet.state_dict()) == keys and not any("forward" in vars(m) for m in linears)
    assert not any(name.startswith("llmdiff_fp8") for name, _ in unet.named_buffers())
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert 0 < (converted - before).abs().max() < 0.1 * before.abs().max()  # float8 ran, the result close


@pytest.mark.parametrize("case", ["few rows", "ComfyUI casts its weights later", "ComfyUI casts its weights",
                                  "unaligned sizes"])
def test_layers_float8_does_not_suit_keep_their_own_forward(case: str) -> None:
    layer = frozen_linear(64, 40 if case == "unaligned sizes" else 48)
    x = torch.randn(8 if case == "few rows" else 128, 64)
    expected = layer(x)
    if case == "ComfyUI casts its weights":  # cast per call already: not converted (its float8 copies go unused)
        layer.comfy_cast_weights = True
    count, undo = f8.use_float8_linears(layer, torch.device("cpu"))
    try:
        if case == "ComfyUI casts its weights later":  # offloaded after the conversion (lowvram): its cast path
            layer.comfy_cast_weights = True
        assert count == (0 if case in ("unaligned sizes", "ComfyUI casts its weights") else 1)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    finally:
        undo()


def test_devices_without_float8_gemms_get_a_clear_error(monkeypatch) -> None:
    import comfy.model_management as mm

    layer = frozen_linear(64, 48)
    with pytest.raises(LLMDiffError, match=r"--unet-fp8 runs on CUDA .* not on mps"):
        f8.use_float8_linears(layer, torch.device("mps"))
    monkeypatch.setattr(mm, "supports_fp8_compute", lambda device=None: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    with pytest.raises(LLMDiffError, match=r"compute capability 8.9 .* this one is 8.6"):
        f8.use_float8_linears(layer, torch.device("cuda"))
    assert "forward" not in vars(layer)  # nothing converted before the error
