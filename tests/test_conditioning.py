"""LLM features in CONDITIONING (llmdiff_core/conditioning.py).

ComfyUI's COND protocol (process_cond / can_concat / concat / size), attach_features, and the trip
through core conditioning nodes and the sampler to the U-Net: the very same feature objects, uncast.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import comfy.conds
import comfy.sample
import comfy.utils
from comfy.patcher_extension import WrappersMP

from llmdiff_core.conditioning import COND_KEY, CONDLLMDiff, FeatureBatch, attach_features
from llmdiff_core.errors import LLMDiffError
from llmdiff_core.features import LLMFeatures
from tiny_unets import SD15_CONTEXT_DIM, tiny_llm_spec, tiny_sd15_minimal

SPEC = tiny_llm_spec(hidden_size=48, num_layers=3)
TOKENS = 16


def features(batch: int, seed: int = 0, tokens: int = TOKENS, dtype: torch.dtype = torch.float32,
             spec: Any = SPEC) -> LLMFeatures:
    g = torch.Generator().manual_seed(seed)
    L, D = spec.num_layers, spec.hidden_size
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    for row in range(batch):
        mask[row, 1:2 + (row + seed) % (tokens - 1)] = True  # BOS masked, different real lengths
    return LLMFeatures(spec, torch.randn(batch, L + 1, tokens, D, generator=g).to(dtype),
                       torch.randn(batch, L, tokens, D, generator=g).to(dtype), mask)


def clip_cond(batch: int, seed: int = 0) -> list[list[Any]]:
    g = torch.Generator().manual_seed(100 + seed)
    pooled = torch.randn(batch, 1280, generator=g)
    return [[torch.randn(batch, 8, SD15_CONTEXT_DIM, generator=g), {"pooled_output": pooled}]]


# --- the COND protocol ------------------------------------------------------------------------------

def test_process_cond_repeats_rows_like_repeat_to_batch_size() -> None:
    f = features(2)
    cond = CONDLLMDiff(f)
    assert cond.rows == (0, 1)
    for batch in (1, 2, 5):
        processed = cond.process_cond(batch_size=batch, area=None)
        assert processed.cond is f  # rows only: the features object itself travels on
        assert torch.equal(f.select(list(processed.rows)).hidden, comfy.utils.repeat_to_batch_size(f.hidden, batch))
    assert cond.process_cond(3).process_cond(4).rows == (0, 1, 0, 0)


def test_can_concat_needs_same_llm_and_token_bucket() -> None:
    base = CONDLLMDiff(features(1))
    assert base.can_concat(CONDLLMDiff(features(3, seed=1)))  # other prompts, other batch: fine
    assert not base.can_concat(CONDLLMDiff(features(1, tokens=TOKENS + 8)))
    assert not base.can_concat(CONDLLMDiff(features(1, spec=tiny_llm_spec(hidden_size=48, num_layers=4))))
    assert not base.can_concat(comfy.conds.CONDCrossAttn(torch.zeros(1, TOKENS, 48)))


def test_concat_is_a_lazy_batch_that_apply_model_will_not_cast() -> None:
    a, b = features(1, seed=1, dtype=torch.float16), features(2, seed=2, dtype=torch.float16)
    batch = CONDLLMDiff(a).process_cond(2).concat([CONDLLMDiff(b).process_cond(2)])
    # BaseModel._apply_model casts keywords that have .dtype and lists of tensors: this is neither.
    assert isinstance(batch, FeatureBatch) and not isinstance(batch, list) and not hasattr(batch, "dtype")
    assert batch.num_rows == 4 and batch.parts[0].features is a and batch.parts[1].features is b
    whole = batch.materialize()
    assert torch.equal(whole.hidden, torch.cat([a.hidden, a.hidden, b.hidden]))
    assert torch.equal(whole.mask, torch.cat([a.mask, a.mask, b.mask]))
    assert whole.hidden.dtype == torch.float16
    same = CONDLLMDiff(a).process_cond(2).concat([CONDLLMDiff(b).process_cond(2)])
    assert batch.same_rows(same)
    equal_values = CONDLLMDiff(a.select([0])).process_cond(2).concat([CONDLLMDiff(b)])  # a new object
    assert not batch.same_rows(equal_values)
    assert not batch.same_rows(CONDLLMDiff(b).concat([CONDLLMDiff(a).process_cond(2)]))  # other order
    assert CONDLLMDiff(b).process_cond(3).size() == [3, TOKENS, SPEC.hidden_size]


# --- attach_features ----------------------------------------------------------------------------------

def test_attach_features_returns_new_entries_and_keeps_other_model_conds() -> None:
    other = comfy.conds.CONDRegular(torch.zeros(2, 3))
    conditioning = clip_cond(2)
    conditioning[0][1]["model_conds"] = {"other": other}
    f = features(2)
    out = attach_features(conditioning, f)
    assert out is not conditioning and out[0][1] is not conditioning[0][1]
    assert out[0][0] is conditioning[0][0]
    assert conditioning[0][1]["model_conds"] == {"other": other}  # the input is untouched
    assert out[0][1]["model_conds"]["other"] is other
    assert out[0][1]["model_conds"][COND_KEY].cond is f
    assert out[0][1]["pooled_output"] is conditioning[0][1]["pooled_output"]


def test_attach_features_splits_rows_over_entries_or_refuses() -> None:
    f = features(3, seed=4)
    split = attach_features(clip_cond(1) + clip_cond(2, seed=1), f)
    assert torch.equal(split[0][1]["model_conds"][COND_KEY].cond.hidden, f.hidden[:1])
    assert torch.equal(split[1][1]["model_conds"][COND_KEY].cond.hidden, f.hidden[1:])
    f2 = features(2)
    shared = attach_features(clip_cond(2) + clip_cond(2, seed=1), f2)  # e.g. two areas of one prompt batch
    assert all(entry[1]["model_conds"][COND_KEY].cond is f2 for entry in shared)
    with pytest.raises(LLMDiffError, match="rows"):
        attach_features(clip_cond(2), f)


# --- through core nodes and the sampler -----------------------------------------------------------------

class KeywordSpy:
    """A DIFFUSION_MODEL wrapper: the `llmdiff` keyword and the sigma of every U-Net call."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, FeatureBatch]] = []

    def __call__(self, executor: Callable, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((float(args[5]["sigmas"][0]), kwargs[COND_KEY]))
        return executor(*args, **kwargs)


def test_features_survive_core_nodes_and_reach_the_unet_uncast(node_classes: dict) -> None:
    combine = node_classes["ConditioningCombine"]().combine
    set_range = node_classes["ConditioningSetTimestepRange"]().set_range
    early, late, negative = (features(1, seed=s, dtype=torch.float16) for s in (1, 2, 3))
    positive = combine(set_range(attach_features(clip_cond(1, 1), early), 0.0, 0.5)[0],
                       set_range(attach_features(clip_cond(1, 2), late), 0.5, 1.0)[0])[0]
    assert [e[1]["model_conds"][COND_KEY].cond for e in positive] == [early, late]

    mp = tiny_sd15_minimal()  # no adapter: the U-Net simply ignores the keyword
    spy = KeywordSpy()
    mp.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "spy", spy)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        comfy.sample.sample(mp, noise, 4, 5.0, "euler", "normal", positive, attach_features(clip_cond(1, 3), negative),
                            torch.zeros_like(noise), disable_pbar=True, seed=0)

    seen = [(sigma, {id(p.features) for p in batch.parts}) for sigma, batch in spy.calls]
    assert all(isinstance(batch, FeatureBatch) for _, batch in spy.calls)
    assert all(p.features.hidden.dtype == torch.float16 for _, batch in spy.calls for p in batch.parts)
    assert set().union(*(ids for _, ids in seen)) == {id(early), id(late), id(negative)}  # the same objects
    first, last = seen[0][0], seen[-1][0]
    assert id(early) in set().union(*(ids for s, ids in seen if s == first)) and not any(
        id(late) in ids for s, ids in seen if s == first)
    assert id(late) in set().union(*(ids for s, ids in seen if s == last)) and not any(
        id(early) in ids for s, ids in seen if s == last)


def test_a_runs_features_reach_cuda_through_pinned_memory_where_comfyui_pins(monkeypatch: pytest.MonkeyPatch) -> None:
    """features.moved stages host-to-CUDA moves in page-locked memory unless ComfyUI pins none
    (--disable-pinned-memory, or a GPU it does not pin for); casts, empty tensors and other moves stay plain copies.
    (The staged copy itself needs a GPU: bench/gpu_checks.py check 14.)"""
    import comfy.model_management as mm
    from llmdiff_core.features import moved, stages

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    t = torch.randn(2, 3, 4).bfloat16()[:, :2]  # (a cut: not contiguous)
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", 1 << 30, raising=False)
    assert stages(t, cuda, None) and stages(t, cuda, torch.bfloat16)
    assert not stages(t, cuda, torch.float32)  # a cast: torch's own copy
    assert not stages(t[:, :0], cuda, None) and not stages(t, cpu, None)
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", -1, raising=False)  # --disable-pinned-memory
    assert not stages(t, cuda, None)
    assert torch.equal(moved(t, cpu), t) and moved(t, None, torch.float32).dtype == torch.float32
