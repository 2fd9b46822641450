"""Prompt text handed to the LLM, per-block weights of the advanced apply node, the gate plot."""

import numpy as np
import pytest

from llmdiff_core.block_weights import block_weights_for, parse_layer_weights
from llmdiff_core.config import SiteSpec
from llmdiff_core.errors import LLMDiffError
from llmdiff_core.prompt_text import split_prompts, strip_prompt_weights


@pytest.mark.parametrize("text, expected", [
    ("a cat", "a cat"),
    ("a (red:1.2) dress", "a red dress"),
    ("((masterpiece)), (blue sky:0.8), city", "masterpiece, blue sky, city"),
    ("(nested (words:1.1):1.3) here", "nested words here"),
    (r"logo \(tm\) and (x:-0.5)", "logo (tm) and x"),
    ("embedding:easynegative, blurry", ", blurry"),
    ("ratio 16:9 stays", "ratio 16:9 stays"),
    ("unclosed (paren", "unclosed paren"),
    ("café 東京 🐱", "café 東京 🐱"),
])
def test_strip_prompt_weights(text, expected):
    assert strip_prompt_weights(text) == expected


def test_split_prompts():
    assert split_prompts("a\n\n b \n", per_line=True) == ["a", "b"]
    assert split_prompts("a\nb", per_line=False) == ["a\nb"]
    assert split_prompts("  \n", per_line=True) == [""]


def _sites():
    layout = [("input", 1), ("input", 2), ("middle", 0), ("output", 3), ("output", 4)]
    return [SiteSpec(block=b, block_index=0, transformer_index=i, query_dim=8, heads=1, dim_head=8, context_dim=8)
            for i, b in enumerate(layout)]


def test_block_weights_groups_and_overrides():
    w = block_weights_for(_sites(), 0.5, 1.0, 2.0, "4:0, 0:1.5")
    assert w == {0: 1.5, 1: 0.5, 2: 1.0, 3: 2.0, 4: 0.0}


@pytest.mark.parametrize("bad", ["7:1.0", "x:1", "3", "1:abc"])
def test_block_weights_bad_text_names_the_problem(bad):
    with pytest.raises(LLMDiffError, match="layer_weights"):
        block_weights_for(_sites(), 1, 1, 1, bad)


def test_parse_layer_weights_accepts_newlines_and_spaces():
    assert parse_layer_weights(" 0 : 1.0 \n 3:-0.25,") == {0: 1.0, 3: -0.25}


def test_gate_plot_draws_the_gates():
    import torch

    from llmdiff_core.adapter import LLMDiffAdapter
    from llmdiff_core.config import AdapterConfig
    from llmdiff_core.features import LLMSpec
    from llmdiff_core.gate_plot import image_to_comfy, plot_gates

    cfg = AdapterConfig(base="sd15", sites=_sites(), llm=LLMSpec("llama", "tiny", 16, 3))
    adapter = LLMDiffAdapter(cfg)
    fresh = np.asarray(plot_gates(adapter, 512, 384))
    with torch.no_grad():
        adapter.a_new.copy_(torch.tensor([0.1, 0.5, 1.0, 0.2, 0.7]))
    trained = np.asarray(plot_gates(adapter, 512, 384))

    def red_pixels(img):  # below the legend, so only w_new bars count
        plot = img[70:]
        return int(((plot[..., 0] > 200) & (plot[..., 1] < 100) & (plot[..., 2] < 100)).sum())

    assert red_pixels(fresh) == 0  # w_new = 0: no bars
    assert red_pixels(trained) > 100  # w_new bars appear once the gates open
    t = image_to_comfy(plot_gates(adapter, 512, 384))
    assert t.shape == (1, 384, 512, 3) and 0.0 <= float(t.min()) and float(t.max()) <= 1.0
