"""The loss in x0 space equals the standard epsilon / v losses under ComfyUI's own model_sampling;
min-SNR weighting; per-sample draws; LR schedule; EMA."""

from __future__ import annotations

import math

import pytest
import torch

import comfy.model_sampling as cms
import comfy.supported_models
from llmdiff_core.training import objective
from llmdiff_core.training.ema import EMA
from llmdiff_core.training.schedule import lr_lambda


def _sampling(kind: type) -> object:
    class MS(cms.ModelSamplingDiscrete, kind):
        pass
    return MS(comfy.supported_models.SD15({}))


@pytest.mark.parametrize("kind,prediction", [(cms.EPS, "eps"), (cms.V_PREDICTION, "v")])
def test_x0_space_loss_is_the_standard_loss(kind: type, prediction: str) -> None:
    ms = _sampling(kind)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5.0, 500.0, 990.0])
    sigma = ms.sigma(t)
    x_t = ms.noise_scaling(sigma, eps, x0)
    model_out = torch.randn(3, 4, 8, 8, generator=g)  # what a U-Net would predict (eps or v)
    x0_hat = ms.calculate_denoised(sigma, model_out, x_t)
    if prediction == "eps":
        target = eps
    else:  # v = alpha * eps - sigma_vp * x0 in the variance-preserving form
        alpha = 1 / torch.sqrt(1 + sigma ** 2)
        target = alpha.view(-1, 1, 1, 1) * eps - (sigma * alpha).view(-1, 1, 1, 1) * x0
    standard = (model_out - target).pow(2).flatten(1).mean(1)
    ours = objective.diffusion_loss(x0_hat, x0, sigma, prediction)
    torch.testing.assert_close(ours, standard, rtol=1e-4, atol=1e-5)
    # min-SNR-gamma: standard weight min(snr, gamma)/snr (eps) or /(snr+1) (v)
    snr = 1 / sigma.double() ** 2
    w = torch.clamp(snr, max=5.0) / (snr if prediction == "eps" else snr + 1)
    torch.testing.assert_close(objective.diffusion_loss(x0_hat, x0, sigma, prediction, 5.0),
                               (w * standard.double()).float(), rtol=1e-4, atol=1e-5)


def test_draws_depend_only_on_the_sample_seed() -> None:
    a = objective.draw([11, 22, 33], (4, 2, 2), 1000, 0.5)
    b = objective.draw([22], (4, 2, 2), 1000, 0.5)
    assert int(a.timesteps[1]) == int(b.timesteps[0])
    assert torch.equal(a.noise[1], b.noise[0]) and a.drop_caption[1] == b.drop_caption[0]
    many = objective.draw(list(range(2000)), (1, 1, 1), 1000, 0.1)
    assert 0.07 < sum(many.drop_caption) / 2000 < 0.13
    assert int(many.timesteps.min()) >= 0 and int(many.timesteps.max()) <= 999



def test_offset_noise_shifts_each_channel_of_a_sample_by_one_draw() -> None:
    shape = (4, 8, 8)
    plain = objective.draw([1, 2, 3], shape, 1000, 0.0)
    offset = objective.draw([1, 2, 3], shape, 1000, 0.0, noise_offset=0.1)
    assert torch.equal(plain.timesteps, offset.timesteps)
    shift = offset.noise - plain.noise  # the same base noise, plus the offset
    torch.testing.assert_close(shift, shift[..., :1, :1].expand_as(shift))  # constant over the pixels
    assert bool((shift[..., 0, 0] != 0).all())
    seeds = list(range(500))
    shifts = (objective.draw(seeds, shape, 1000, 0.0, noise_offset=0.1).noise
              - objective.draw(seeds, shape, 1000, 0.0).noise)[:, :, 0, 0]
    assert float(shifts.std()) == pytest.approx(0.1, rel=0.1)  # N(0, offset^2) per sample and channel

def test_lr_schedule() -> None:
    f = lr_lambda(10, 110, "cosine", 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert lr_lambda(0, 100, "constant")(50) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32 (one foreach call)", "bf16 (per tensor)"])
def test_ema(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    foreach_calls = []
    lerp = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: foreach_calls.append(1) or lerp(*a))
    m = torch.nn.Linear(2, 2).to(dtype)
    ema = EMA(m, decay=0.5)
    start = m.weight.detach().float().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)  # warm-up decay: min(0.5, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.shadow["weight"], d * start + (1 - d) * m.weight.detach().float())
    assert ema.shadow["weight"].dtype == torch.float32
    # fp32 parameters: one foreach call for every shadow; others cast per tensor
    assert len(foreach_calls) == (1 if dtype == torch.float32 else 0)
    ema.update(m)  # then min(0.5, 3/12)
    d2 = 3 / 12
    torch.testing.assert_close(ema.shadow["weight"], d2 * (d * start + (1 - d) * m.weight.detach().float())
                               + (1 - d2) * m.weight.detach().float())
    other = torch.nn.Linear(2, 2).to(dtype)
    ema2 = EMA(other, 0.5)
    ema2.load_state_dict(ema.state_dict())
    ema2.copy_to(other)
    torch.testing.assert_close(other.weight, ema.shadow["weight"].to(dtype))
    assert not math.isnan(float(other.bias.detach().sum()))


def test_tracker_rate_is_the_recent_pace_and_memory_is_reported_on_cuda(tmp_path, monkeypatch) -> None:
    """img/s in the bar and the logs is the pace of the last RATE_WINDOW steps: a first step that sat for
    minutes compiling (or a validation pause) drops out of it instead of holding the rate down for hours.
    The peak GPU memory is logged on CUDA only (the allocator's statistics: no sync)."""
    from llmdiff_core.training import tracking

    clock = [0.0]
    monkeypatch.setattr(tracking.time, "perf_counter", lambda: clock[0])
    tracker = tracking.Tracker(tmp_path, enabled=True, tensorboard=False, progress=False, total_steps=100,
                               start_step=0)
    clock[0] = 300.0  # the first step: 16 images after a 5-minute compile
    assert tracker.step_done(1, 16, 1.0, 1e-4) == pytest.approx(16 / 300)
    rates = []
    for step in range(2, 2 + 2 * tracking.RATE_WINDOW):
        clock[0] += 0.5  # then 32 img/s
        rates.append(tracker.step_done(step, 16, 1.0, 1e-4))
    assert rates[0] == pytest.approx(32.0)  # the last step's pace, not 32 images over 300.5 s
    assert rates[-1] == pytest.approx(32.0)
    clock[0] += 60.0  # a validation pause: it counts once, then leaves the window
    paused = tracker.step_done(100, 16, 1.0, 1e-4)
    assert paused < 32.0 / 2
    for step in range(101, 101 + tracking.RATE_WINDOW):
        clock[0] += 0.5
        last = tracker.step_done(step, 16, 1.0, 1e-4)
    assert last == pytest.approx(32.0)
    tracker.close()

    assert tracking.device_memory(torch.device("cpu")) == {}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30 + 2**29)
    assert tracking.device_memory(torch.device("cuda", 0)) == {"gpu_peak_gib": 3.5}
