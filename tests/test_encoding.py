"""The score encoding (DESIGN.md §1.1) against a slow, literal reference, for every tiny LLM family.

Reference for s_l: run block l alone on the single token H_{l-1}[:, p] with that token's own
position and no mask (attention over one key: the token sees only itself), for every p.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import pytest
import torch
from tiny_llms import FAMILIES, MULTIMODAL_FAMILIES, SLIDING_WINDOW, make_tiny_llm

from llmdiff_core import encoding
from llmdiff_core.encoding import encode, tokenize
from llmdiff_core.errors import LLMDiffError
from llmdiff_core.llm import LoadedLLM, load_llm

ALL_FAMILIES = FAMILIES + MULTIMODAL_FAMILIES
MAX_TOKENS = 40
LONG = "a photo of a cat sitting on a wooden chair"  # > SLIDING_WINDOW tokens: Gemma's windows bite
PROMPTS = [LONG, "", "café 东京 🍜"]  # different lengths (padding), empty, non-ASCII


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llms")
    for family in ALL_FAMILIES:
        make_tiny_llm(family, root / family)
    return root


@pytest.fixture(scope="module")
def llms(llm_dir: Path) -> dict[str, LoadedLLM]:
    return {family: load_llm(str(llm_dir / family)) for family in ALL_FAMILIES}


# --- the literal reference ------------------------------------------------------------------------

def _one_token_kwargs(loaded: LoadedLLM, layer: int, p: int, x: torch.Tensor) -> dict:
    """Block kwargs for a lone token at position p. GPT-2 adds its positions before block 1."""
    decoder = loaded.decoder()
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        return {}
    pos = torch.tensor([[p]])
    if "layer_type" in inspect.signature(rotary.forward).parameters:  # Gemma 3: per-layer-type rope
        cos_sin = rotary(x, pos, loaded.text_config.layer_types[layer])
    else:
        cos_sin = rotary(x, pos)
    return {"position_embeddings": cos_sin, "position_ids": pos}


def _reference_scores(loaded: LoadedLLM, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """s_l at every real token, from the block run on each token alone. hidden: [B, L+1, n, D]."""
    ref = torch.zeros_like(hidden[:, 1:])
    with torch.no_grad():
        for layer, block in enumerate(loaded.decoder_blocks()):
            for p in range(max(lengths)):
                x = hidden[:, layer, p:p + 1]
                out = block(x, attention_mask=None, **_one_token_kwargs(loaded, layer, p, x))
                out = out[0] if isinstance(out, tuple) else out
                ref[:, layer, p] = hidden[:, layer + 1, p] - out[:, 0]
    real = (torch.arange(hidden.shape[2]) < torch.tensor(lengths)[:, None])
    return ref * real[:, None, :, None]


def _hf_hidden(loaded: LoadedLLM, texts: list[str]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, list[int]]:
    """Hugging Face's own output_hidden_states (the last one has the final norm applied)."""
    batch = tokenize(loaded, texts, MAX_TOKENS)
    with torch.no_grad():
        out = loaded.decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               output_hidden_states=True)
    return out.hidden_states, out.last_hidden_state, batch.lengths


def _final_norm(loaded: LoadedLLM) -> torch.nn.Module:
    decoder = loaded.decoder()
    return decoder.norm if hasattr(decoder, "norm") else decoder.ln_f


# --- equivalence ----------------------------------------------------------------------------------

@pytest.mark.parametrize("texts", [PROMPTS, [LONG]], ids=["padded", "single"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_scores_equal_literal_reference(llms: dict[str, LoadedLLM], family: str, texts: list[str]) -> None:
    loaded = llms[family]
    feats = encode(loaded, texts, max_tokens=MAX_TOKENS)
    lengths = tokenize(loaded, texts, MAX_TOKENS).lengths
    assert max(lengths) > SLIDING_WINDOW
    ref = _reference_scores(loaded, feats.hidden, lengths)
    torch.testing.assert_close(feats.scores, ref, atol=1e-5, rtol=1e-5)
    # The scores carry signal (so the comparison above can fail): context changes every later token.
    assert feats.scores[0, :, 1:lengths[0]].abs().mean() > 0.05


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_hidden_states_equal_hf(llms: dict[str, LoadedLLM], family: str) -> None:
    loaded = llms[family]
    feats = encode(loaded, PROMPTS, max_tokens=MAX_TOKENS)
    hf, hf_last, lengths = _hf_hidden(loaded, PROMPTS)
    L = loaded.spec.num_layers
    with torch.no_grad():
        normed_last = _final_norm(loaded)(feats.hidden[:, L])
    for b, n in enumerate(lengths):
        for layer in range(L):  # HF's hidden states before the last are pre-final-norm, like ours
            torch.testing.assert_close(feats.hidden[b, layer, :n], hf[layer][b, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(normed_last[b, :n], hf_last[b, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_padding_does_not_leak(llms: dict[str, LoadedLLM], family: str) -> None:
    """Each prompt encodes the same alone (no padding, sdpa's mask-free path) as inside a padded batch."""
    loaded = llms[family]
    batch = encode(loaded, PROMPTS, max_tokens=MAX_TOKENS)
    for i, text in enumerate(PROMPTS):
        alone = encode(loaded, [text], max_tokens=MAX_TOKENS)
        torch.testing.assert_close(batch.hidden[i], alone.hidden[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch.scores[i], alone.scores[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_eager_float_masks_match_sdpa_bool_masks(llm_dir: Path, llms: dict[str, LoadedLLM], family: str) -> None:
    """Eager attention gets additive float masks, sdpa boolean ones: same features either way."""
    eager = load_llm(str(llm_dir / family))
    eager.model.set_attn_implementation("eager")
    assert eager.text_config._attn_implementation == "eager"
    a = encode(eager, PROMPTS, max_tokens=MAX_TOKENS)
    b = encode(llms[family], PROMPTS, max_tokens=MAX_TOKENS)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.hidden, b.hidden, atol=1e-5, rtol=1e-5)


def test_reference_catches_a_causal_context_free_pass(llms: dict[str, LoadedLLM],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Feeding the causal mask to the context-free half (instead of the diagonal one) must be caught."""
    loaded = llms["llama"]
    real = encoding._stacked_mask

    def causal_twice(mask: torch.Tensor | None, pad_mask: torch.Tensor, batch: int, n: int) -> torch.Tensor:
        causal = real(mask, pad_mask, batch, n)[:batch]
        return torch.cat([causal, causal])

    monkeypatch.setattr(encoding, "_stacked_mask", causal_twice)
    feats = encode(loaded, PROMPTS, max_tokens=MAX_TOKENS)
    ref = _reference_scores(loaded, feats.hidden, tokenize(loaded, PROMPTS, MAX_TOKENS).lengths)
    assert feats.scores.abs().max() < 1e-5  # causal minus causal
    assert (feats.scores - ref).abs().max() > 0.1


def test_bos_score_is_zero(llms: dict[str, LoadedLLM]) -> None:
    """BOS sees only itself in the causal pass too, so its context contribution is exactly nothing."""
    feats = encode(llms["qwen2"], PROMPTS, max_tokens=MAX_TOKENS)
    assert feats.scores[:, :, 0].abs().max() < 1e-5
    assert feats.hidden[:, 1:, 0].abs().max() > 0.1  # while BOS's hidden states are kept


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sliding_window_layers_are_exercised(llm_dir: Path, llms: dict[str, LoadedLLM], family: str) -> None:
    """Gemma's sliding layers (window 4) really cut the context: widening the window changes every
    token from position 4 on and none before it."""
    wide = load_llm(str(llm_dir / family))
    wide.text_config.sliding_window = 10_000
    a = encode(llms[family], [LONG], max_tokens=MAX_TOKENS).scores[0]
    b = encode(wide, [LONG], max_tokens=MAX_TOKENS).scores[0]
    torch.testing.assert_close(a[:, :SLIDING_WINDOW], b[:, :SLIDING_WINDOW], atol=1e-5, rtol=1e-5)
    n = tokenize(wide, [LONG], MAX_TOKENS).lengths[0]
    assert (a[:, SLIDING_WINDOW:n] - b[:, SLIDING_WINDOW:n]).abs().amax(dim=(0, 2)).min() > 1e-3


def _mask_given_to_first_block(loaded: LoadedLLM, texts: list[str]) -> object:
    """The attention mask the model itself hands block 1 while encode runs (seen before encode's hook)."""
    seen: list[object] = []
    block = loaded.decoder_blocks()[0]
    hooks_before = (len(block._forward_pre_hooks), len(block._forward_hooks))  # HF keeps its own capture hooks
    handle = block.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("attention_mask", "absent")),
                                             with_kwargs=True)
    try:
        encode(loaded, texts, max_tokens=MAX_TOKENS)
    finally:
        handle.remove()
    assert (len(block._forward_pre_hooks), len(block._forward_hooks)) == hooks_before  # encode removed its hooks
    assert len(seen) == 1
    return seen[0]


def test_masks_of_each_kind_are_exercised(llm_dir: Path, llms: dict[str, LoadedLLM]) -> None:
    """sdpa without padding: no mask (pure-causal fast path); sdpa with padding: bool; eager: additive float."""
    assert _mask_given_to_first_block(llms["llama"], [LONG]) is None
    assert _mask_given_to_first_block(llms["llama"], PROMPTS).dtype == torch.bool
    assert _mask_given_to_first_block(llms["gemma2"], PROMPTS).dtype == torch.float32


# --- mask, bucket, dtype --------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mask_and_bucket(llms: dict[str, LoadedLLM], family: str) -> None:
    loaded = llms[family]
    feats = encode(loaded, PROMPTS, max_tokens=MAX_TOKENS)
    lengths = tokenize(loaded, PROMPTS, MAX_TOKENS).lengths
    L, D = loaded.spec.num_layers, loaded.spec.hidden_size
    assert feats.hidden.shape == (3, L + 1, MAX_TOKENS, D) and feats.scores.shape == (3, L, MAX_TOKENS, D)
    assert feats.hidden.dtype == feats.scores.dtype == torch.float32 and feats.spec == loaded.spec
    for b, n in enumerate(lengths):
        expected = torch.zeros(MAX_TOKENS, dtype=torch.bool)
        expected[1:n] = True
        if n == 1:
            expected[0] = True  # the empty prompt keeps its BOS
        assert torch.equal(feats.mask[b], expected), (b, n)
        assert feats.hidden[b, :, n:].abs().max() == 0 and feats.scores[b, :, n:].abs().max() == 0
        assert feats.hidden[b, 0, :n].abs().sum(-1).gt(0).all()  # real tokens, BOS included, are not zeroed
    assert lengths[1] == 1


def test_bf16_on_cpu_close_to_fp32(llm_dir: Path, llms: dict[str, LoadedLLM]) -> None:
    loaded16 = load_llm(str(llm_dir / "llama"), dtype="bf16")
    assert loaded16.dtype == torch.bfloat16 and next(loaded16.model.parameters()).dtype == torch.bfloat16
    f16 = encode(loaded16, PROMPTS, max_tokens=MAX_TOKENS)
    f32 = encode(llms["llama"], PROMPTS, max_tokens=MAX_TOKENS)
    assert f16.scores.dtype == torch.float32
    rel = (f16.scores - f32.scores).norm() / f32.scores.norm()
    assert rel < 0.05, rel


# --- tokenization ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_one_leading_bos(llms: dict[str, LoadedLLM], family: str) -> None:
    loaded = llms[family]
    tok = loaded.tokenizer
    expected_bos = tok.convert_tokens_to_ids("<|endoftext|>" if family.startswith("qwen") or family == "gpt2"
                                             else "<bos>")
    batch = tokenize(loaded, PROMPTS, MAX_TOKENS)
    assert (batch.input_ids[:, 0] == expected_bos).all()
    for row, n in zip(batch.input_ids, batch.lengths, strict=True):
        assert (row[1:n] != expected_bos).all()  # exactly one BOS, none doubled
    assert batch.lengths[1] == 1  # empty prompt = BOS only
    if tok.bos_token == "<bos>":  # tokenizers that add BOS themselves: same ids as their own encoding
        assert batch.input_ids[0, :batch.lengths[0]].tolist() == tok(LONG)["input_ids"]
    assert tok.decode(batch.input_ids[2, 1:batch.lengths[2]]) == PROMPTS[2]  # non-ASCII round-trips


def test_overflow_error_names_count_limit_and_fixes(llms: dict[str, LoadedLLM]) -> None:
    loaded = llms["llama"]
    n = tokenize(loaded, [LONG], MAX_TOKENS).lengths[0]
    with pytest.raises(LLMDiffError) as err:
        encode(loaded, ["short", LONG], max_tokens=n - 1)
    msg = str(err.value)
    assert f"{n} tokens" in msg and f"max_tokens={n - 1}" in msg and "prompt 2" in msg
    assert "raise max_tokens" in msg and "truncate" in msg


def test_truncate_cuts_and_warns(llms: dict[str, LoadedLLM], caplog: pytest.LogCaptureFixture) -> None:
    loaded = llms["llama"]
    full = encode(loaded, [LONG], max_tokens=MAX_TOKENS)
    with caplog.at_level(logging.WARNING, logger="llmdiff"):
        cut = encode(loaded, [LONG, ""], max_tokens=8, overflow="truncate")
    assert "truncated to max_tokens=8" in caplog.text
    assert cut.num_tokens == 8 and cut.mask[0].sum() == 7
    # Causal: the first 8 tokens encode the same whether or not the rest followed.
    torch.testing.assert_close(cut.scores[0], full.scores[0, :, :8], atol=1e-5, rtol=1e-5)


def test_bad_arguments(llms: dict[str, LoadedLLM], monkeypatch) -> None:
    loaded = llms["gpt2"]
    with pytest.raises(LLMDiffError, match="overflow"):
        encode(loaded, ["x"], overflow="wrap")
    with pytest.raises(LLMDiffError, match="no prompts"):
        encode(loaded, [])
    with pytest.raises(LLMDiffError, match="positions"):
        encode(loaded, ["x"], max_tokens=10_000)
    with pytest.raises(LLMDiffError, match="max_tokens must be at least 1 .the BOS token., got 0"):
        encode(loaded, ["x"], max_tokens=0)
    # an attention the [causal; diagonal] mask cannot reach (its own kernels take no 4-D mask)
    monkeypatch.setattr(loaded.text_config, "_attn_implementation", "flash_attention_2", raising=False)
    with pytest.raises(LLMDiffError, match="uses attention 'flash_attention_2'; the score encoding needs one of"):
        encode(loaded, ["x"])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_per_encode_host_work_is_done_once(llms: dict[str, LoadedLLM], family: str, monkeypatch) -> None:
    """The stacked [causal; diagonal] mask is built once per distinct mask the model passes (not per
    block), a model left in training mode is switched to eval, and repeated encodes agree exactly."""
    loaded = llms[family]
    built: list[object] = []
    original = encoding._stacked_mask

    def counting(mask, *args):
        built.append(mask)
        return original(mask, *args)
    monkeypatch.setattr(encoding, "_stacked_mask", counting)
    first = encode(loaded, PROMPTS, max_tokens=MAX_TOKENS)
    assert 1 <= len(built) <= 2  # Gemma: one sliding-window and one global mask
    assert len({id(m) for m in built}) == len(built)  # each distinct mask object once
    if family == "llama":
        assert len(built) == 1
    loaded.model.train()
    try:
        again = encode(loaded, PROMPTS, max_tokens=MAX_TOKENS)
        assert not any(m.training for m in loaded.model.modules())
    finally:
        loaded.model.eval()
    for a, b in ((first.hidden, again.hidden), (first.scores, again.scores), (first.mask, again.mask)):
        assert torch.equal(a, b)
