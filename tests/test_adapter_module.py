"""The adapter module's invariants and the score encoder's math; the tiny U-Net factory itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import comfy.supported_models

import tiny_unets
from llmdiff_core.adapter import LLMDiffAdapter
from llmdiff_core.config import AdapterConfig
from llmdiff_core.features import LLMFeatures, LLMSpec
from llmdiff_core.unet_sites import find_sites
from tiny_unets import make_adapter, make_adapter_config, tiny_llm_spec, tiny_sd15, tiny_sd15_minimal, tiny_sdxl

SPEC = tiny_llm_spec(hidden_size=48, num_layers=5)


def _config(**overrides: object) -> AdapterConfig:
    return make_adapter_config(tiny_sd15_minimal(), SPEC, **overrides)


def _features(spec: LLMSpec = SPEC, batch: int = 3, tokens: int = 6, seed: int = 0) -> LLMFeatures:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, spec.num_layers + 1, tokens, spec.hidden_size, generator=gen)
    scores = torch.randn(batch, spec.num_layers, tokens, spec.hidden_size, generator=gen)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    return LLMFeatures(spec, hidden, scores, mask)


# --- tiny U-Nets --------------------------------------------------------------------------------
SD15_KEYS = ([("input", b, 0) for b in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)]
             + [("output", b, 0) for b in range(3, 12)])


def test_tiny_sd15_has_the_real_sites() -> None:
    specs, modules = find_sites(tiny_sd15().model.diffusion_model)
    assert [s.key for s in specs] == SD15_KEYS
    assert [s.transformer_index for s in specs] == list(range(16))
    assert {s.context_dim for s in specs} == {tiny_unets.SD15_CONTEXT_DIM} and len(modules) == 16


def test_tiny_sdxl_has_the_real_sites() -> None:
    specs, _ = find_sites(tiny_sdxl().model.diffusion_model)
    per_block: dict[tuple[str, int], int] = {}
    for s in specs:
        per_block[s.block] = per_block.get(s.block, 0) + 1
    assert len(specs) == 70
    assert per_block == {("input", 4): 2, ("input", 5): 2, ("input", 7): 10, ("input", 8): 10, ("middle", 0): 10,
                         ("output", 0): 10, ("output", 1): 10, ("output", 2): 10,
                         ("output", 3): 2, ("output", 4): 2, ("output", 5): 2}
    assert {s.context_dim for s in specs} == {tiny_unets.SDXL_CONTEXT_DIM}
    assert tiny_sdxl().model.adm_channels == 2816


def test_tiny_minimal_sites() -> None:
    specs, _ = find_sites(tiny_sd15_minimal().model.diffusion_model)
    assert [s.block for s in specs] == [("input", 1), ("input", 3), ("middle", 0)] + [("output", i) for i in range(4)]


@pytest.mark.parametrize("builder", [tiny_sd15, tiny_sdxl, tiny_sd15_minimal])
def test_tiny_unet_output_depends_on_context(builder: object) -> None:
    """No zero-initialised output layer left: the context reaches the prediction."""
    model = builder().model
    unet = model.diffusion_model
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    ctx = torch.randn(1, 5, find_sites(unet)[0][0].context_dim, generator=gen)
    extra = {"y": torch.randn(1, model.adm_channels, generator=gen)} if model.adm_channels else {}
    t = torch.tensor([500.0])
    with torch.no_grad():
        out, out2 = unet(x, t, context=ctx, **extra), unet(x, t, context=-ctx, **extra)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out - out2).abs().max() > 1e-3


def test_tiny_unet_weights_are_deterministic() -> None:
    rebuilt = tiny_unets._build(comfy.supported_models.SD15, tiny_unets._SD15_MINIMAL_CONFIG)
    want = tiny_sd15_minimal().model.state_dict()
    got = rebuilt.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_tiny_unets_are_independent_clones() -> None:
    a, b = tiny_sd15(), tiny_sd15()
    assert a is not b and a.model is b.model
    a.model_options["transformer_options"]["probe"] = 1
    assert "probe" not in b.model_options["transformer_options"]
    assert "probe" not in tiny_sd15().model_options["transformer_options"]


# --- adapter invariants -------------------------------------------------------------------------
def _assert_identity_gates(adapter: LLMDiffAdapter) -> None:
    w_orig, w_new = adapter.gate_weights()
    assert torch.equal(w_orig, torch.ones(len(adapter.sites)))
    assert torch.equal(w_new, torch.zeros(len(adapter.sites)))


def test_fresh_adapter_changes_nothing() -> None:
    """w_orig = 1 and w_new = 0 exactly: at construction, after reset, and after reset of a trained one."""
    config = _config()
    _assert_identity_gates(LLMDiffAdapter(config))
    _assert_identity_gates(make_adapter(config, seed=0))
    trained = make_adapter(config, seed=0, trained=True)
    assert (trained.gate_weights()[1] != 0).all()
    trained.reset_parameters()
    _assert_identity_gates(trained)
    assert torch.equal(trained.encoder.gate, torch.full((SPEC.num_layers,), config.gate_init))


def test_reset_copies_unet_query_projections() -> None:
    mp = tiny_sd15()
    attn2 = find_sites(mp.model.diffusion_model)[1]
    adapter = make_adapter(make_adapter_config(mp, SPEC), seed=0, model_patcher=mp)
    for site, module in zip(adapter.sites, attn2):
        assert torch.equal(site.to_q.weight, module.to_q.weight)
        assert site.to_q.weight.data_ptr() != module.to_q.weight.data_ptr()  # a copy, not shared
    with pytest.raises(ValueError, match="3 query weights for 16 sites"):
        adapter.reset_parameters([m.to_q.weight for m in attn2[:3]])


def test_make_adapter_is_deterministic() -> None:
    config = _config(original_path="llm")
    a, b = make_adapter(config, seed=5, trained=True), make_adapter(config, seed=5, trained=True)
    c = make_adapter(config, seed=6, trained=True)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.sites[0].to_k.weight, c.sites[0].to_k.weight)


# --- the score encoder --------------------------------------------------------------------------
def _reference_encoding(adapter: LLMDiffAdapter, f: LLMFeatures, encoding: str, c0: str) -> torch.Tensor:
    """DESIGN.md §1.1 written out literally: one layer at a time, then the LayerNorm."""
    L = f.spec.num_layers
    enc = adapter.encoder
    if encoding == "score":
        c = f.hidden[:, 0].clone() if c0 == "embeddings" else torch.zeros_like(f.hidden[:, 0])
        for layer in range(L):
            c = c + enc.gate[layer] * f.scores[:, layer]
    elif encoding == "last":
        c = f.hidden[:, L]
    elif encoding == "mean":
        c = sum(f.hidden[:, layer] for layer in range(1, L + 1)) / L
    else:
        k = int(encoding.split(":")[1])
        c = f.hidden[:, k if k >= 0 else L + 1 + k]
    mu = c.mean(-1, keepdim=True)
    var = ((c - mu) ** 2).mean(-1, keepdim=True)
    return (c - mu) / torch.sqrt(var + enc.norm.eps) * enc.norm.weight + enc.norm.bias


@pytest.mark.parametrize("c0", ["embeddings", "zeros"])
@pytest.mark.parametrize("encoding", ["score", "last", "mean", "layer:0", "layer:2", "layer:-1"])
def test_encoding_matches_the_formula(encoding: str, c0: str) -> None:
    adapter = make_adapter(_config(encoding=encoding, c0=c0), seed=1, trained=True)
    assert adapter.encoder.gate.unique().numel() == SPEC.num_layers  # per-layer gates really differ
    f = _features()
    with torch.no_grad():
        got = adapter.encode(f)
        want = _reference_encoding(adapter, f, encoding, c0)
    assert got.shape == (3, 6, SPEC.hidden_size) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c0", ["embeddings", "zeros"])
@pytest.mark.parametrize("encoding", ["score", "last", "mean", "layer:2"])
def test_features_read_are_all_the_encoding_reads(encoding: str, c0: str) -> None:
    """features_read() says what a sampling run moves to the device (and training caches): the features
    with everything else replaced by another position's values encode to the same bits, and the view
    copies and moves only what is read."""
    config = _config(encoding=encoding, c0=c0)
    adapter = make_adapter(config, seed=1, trained=True)
    f = _features()
    layers, scores = config.features_read()
    scrambled = LLMFeatures(SPEC, f.hidden.clone(), f.scores.clone(), f.mask)
    unread = [i for i in range(SPEC.num_layers + 1) if i not in layers]
    scrambled.hidden[:, unread] = torch.randn(scrambled.hidden[:, unread].shape)
    if not scores:
        scrambled.scores.normal_()
    read_only = f.reading(layers, scores)
    with torch.no_grad():
        want = adapter.encode(f)
        assert torch.equal(adapter.encode(scrambled), want)  # the unread positions really are unread
        assert torch.equal(adapter.encode(read_only), want)
        assert torch.equal(adapter.encode(LLMFeatures.cat([read_only.select([2, 0]), read_only.select([1])])),
                           want[[2, 0, 1]])
    moved = read_only.select([1, 2]).to(dtype=torch.float64)  # stand-in for the move to the U-Net's device
    moved_bytes = moved.hidden.untyped_storage().nbytes() + moved.scores.untyped_storage().nbytes()
    layers_moved = (SPEC.num_layers + 1 if len(layers) > 1 else len(layers)) + (SPEC.num_layers if scores else 0)
    one_layer = 2 * f.num_tokens * SPEC.hidden_size * 8  # 2 rows, float64
    assert moved_bytes <= layers_moved * one_layer + 2 * 2 * 8  # + one broadcast element per row and tensor


def test_c0_choice_matters_only_for_score() -> None:
    f = _features()
    for encoding, differs in (("score", True), ("mean", False)):
        a = make_adapter(_config(encoding=encoding, c0="embeddings"), seed=1, trained=True).encode(f)
        b = make_adapter(_config(encoding=encoding, c0="zeros"), seed=1, trained=True).encode(f)
        assert (not torch.equal(a, b)) == differs, encoding


def _noise_probe(adapter: LLMDiffAdapter) -> None:
    """Make the LayerNorm linear: with eps far above var(c), norm(c) = (c - mean c) / sqrt(eps).

    The Langevin noise is added before the norm; this way the test can read it back from outside.
    """
    with torch.no_grad():
        adapter.encoder.norm.weight.fill_(1.0)
        adapter.encoder.norm.bias.zero_()
    adapter.encoder.norm.eps = 1e8


def test_noise_only_when_asked_with_the_langevin_variance() -> None:
    adapter = make_adapter(_config(), seed=2, trained=True)
    with torch.no_grad():
        adapter.encoder.rho.copy_(torch.linspace(-2.0, 1.0, SPEC.num_layers))
    _noise_probe(adapter)
    f = _features(batch=4, tokens=32)
    with torch.no_grad():
        clean = adapter.encode(f)
        assert torch.equal(clean, adapter.encode(f))  # no noise unless asked
        eps = torch.randn(f.batch_size, f.num_tokens, SPEC.hidden_size, generator=torch.Generator().manual_seed(0))
        noisy = adapter.encode(f, eps=eps)
        with pytest.raises(ValueError, match="Langevin draws of shape"):  # draws for other tokens are refused
            adapter.encode(f, eps=eps[:, :-1])
    eps_noise = (noisy - clean) * 1e4  # undo the 1/sqrt(1e8) of the probe
    D = SPEC.hidden_size
    want = (2.0 * F.softplus(adapter.encoder.rho)).sum().item() * (1 - 1 / D)  # minus the row mean
    got = eps_noise.var().item()
    assert abs(got / want - 1) < 0.1, (got, want)  # 6144 samples: std error ~2%
    assert abs(eps_noise.mean().item()) < 0.05 * want ** 0.5
