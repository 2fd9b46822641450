"""Random-weight models at real (or --small) shapes for the benchmarks. Import after common.setup_comfy.

- U-Nets: the real SD1.5 / SDXL configs, read from ComfyUI's own comfy/model_detection.py
  (unet_config_from_diffusers_unet), built through comfy.supported_models like a checkpoint load;
  --small shrinks the widths and keeps the depth lists (so the 16 / 70 cross-attention sites are real).
- LLMs: Llama-3.2-1B and Llama-3-8B shapes (transformers LlamaConfig), or a tiny Llama.
- Adapters: LLMDiffAdapter for a U-Net + LLM pair with non-zero gates (an untrained adapter, a_new = 0,
  would skip the new path entirely and measure nothing).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import zlib
from dataclasses import dataclass
from typing import Any

import torch

import comfy.model_detection
import comfy.model_patcher
import comfy.ops
import comfy.supported_models

from llmdiff_core.adapter import LLMDiffAdapter
from llmdiff_core.comfy_adapter import inference_dtype
from llmdiff_core.conditioning import attach_features
from llmdiff_core.config import AdapterConfig
from llmdiff_core.features import LLMFeatures, LLMSpec
from llmdiff_core.unet_sites import base_family, find_sites

# ---------------------------------------------------------------------------------------------------
# U-Nets

# Copies of comfy/model_detection.py (0.3.75) in case a ComfyUI version moves them; the header says
# which source was used.
_FALLBACK = {
    "SD15": {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
             'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0],
             'channel_mult': [1, 2, 4, 4],
             'transformer_depth_middle': 1, 'use_linear_in_transformer': False, 'context_dim': 768, 'num_heads': 8,
             'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], 'use_temporal_attention': False,
             'use_temporal_resblock': False},
    "SDXL": {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4,
             'model_channels': 320, 'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10],
             'channel_mult': [1, 2, 4], 'transformer_depth_middle': 10, 'use_linear_in_transformer': True,
             'context_dim': 2048, 'num_head_channels': 64, 'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
             'use_temporal_attention': False, 'use_temporal_resblock': False},
}
CONFIG_SOURCE = {"value": "not read yet"}


def real_unet_configs() -> dict[str, dict[str, Any]]:
    """{'SD15': ..., 'SDXL': ...} exactly as comfy/model_detection.py writes them (dtype left out)."""
    try:
        src = textwrap.dedent(inspect.getsource(comfy.model_detection.unet_config_from_diffusers_unet))
        found: dict[str, dict[str, Any]] = {}
        for node in ast.walk(ast.parse(src)):
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id in ("SD15", "SDXL")):
                cfg = eval(compile(ast.Expression(node.value), "model_detection", "eval"), {"dtype": None})
                cfg.pop("dtype", None)
                found[node.targets[0].id] = cfg
        if set(found) == {"SD15", "SDXL"}:
            CONFIG_SOURCE["value"] = "comfy/model_detection.py"
            return found
    except (OSError, TypeError, SyntaxError, NameError):
        pass
    CONFIG_SOURCE["value"] = "bench/builders.py copy of model_detection.py 0.3.75"
    return {k: dict(v) for k, v in _FALLBACK.items()}


class _SmallSDXL(comfy.supported_models.SDXL):
    # SDXL forces 64 channels per head: 0 heads at --small widths.
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}


# --small: the real depth lists, widths shrunk (the layout of tests/tiny_unets.py).
SMALL_OVERRIDES = {
    "sd15": {"model_channels": 32, "context_dim": 64},
    "sdxl": {"model_channels": 32, "context_dim": 80},
}


@dataclass
class UNetShape:
    family: str  # sd15 | sdxl
    small: bool
    latent: int  # latent side (pixels / 8)
    context_dim: int
    adm: int | None

    @property
    def pixels(self) -> int:
        return self.latent * 8


def unet_shape(family: str, small: bool, latent: int | None = None) -> UNetShape:
    cfg = unet_config(family, small)[1]
    default = (16 if small else (64 if family == "sd15" else 128))
    return UNetShape(family, small, latent or default, cfg["context_dim"], cfg.get("adm_in_channels"))


def unet_config(family: str, small: bool) -> tuple[type, dict[str, Any]]:
    real = real_unet_configs()
    if family == "sd15":
        cls, cfg = comfy.supported_models.SD15, dict(real["SD15"])
    elif family == "sdxl":
        cls, cfg = comfy.supported_models.SDXL, dict(real["SDXL"])
    else:
        raise ValueError(family)
    if small:
        cfg.update(SMALL_OVERRIDES[family])
        if family == "sdxl":
            cls = _SmallSDXL
    return cls, cfg


def init_weights(module: torch.nn.Module, seed: int = 1234) -> None:
    """Seeded random values that keep activations O(1) (comfy ops leave weights uninitialised, and SD
    zero-initialises its output convs, which would make the output ignore the context)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.device.type == "meta":
                continue
            g = torch.Generator(device=p.device).manual_seed(seed + zlib.crc32(name.encode()))
            noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def build_unet(family: str, small: bool, dtype: torch.dtype, device: torch.device,
               offload_device: torch.device | None = None) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI ModelPatcher around a random-weight SD1.5 / SDXL BaseModel built on `device`."""
    cls, cfg = unet_config(family, small)
    model_config = cls(dict(cfg, dtype=dtype))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "", device=device)
    model.diffusion_model.requires_grad_(False)
    init_weights(model.diffusion_model)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=offload_device or device)


# ---------------------------------------------------------------------------------------------------
# LLMs

LLM_SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3.2-1B and Llama-3-8B (config.json of the released models), random weights.
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
               tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
               tie_word_embeddings=False),
    # The hidden size and depth of Llama-3-8B with one 8-wide head and an 8-wide MLP: its features (hence
    # the feature cache, the data path and the adapter's tau_k / tau_v) have the 8B's exact shapes, but it
    # runs on a CPU in milliseconds. For data-path measurements, not for encoder timings.
    "thin8b": dict(hidden_size=4096, intermediate_size=8, num_hidden_layers=32, num_attention_heads=1,
                   num_key_value_heads=1, head_dim=8, vocab_size=1024, max_position_embeddings=512),
    # --small: a tiny Llama (same family and code path).
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512),
}


def llm_spec(shape: str) -> LLMSpec:
    s = LLM_SHAPES[shape]
    return LLMSpec(family="llama", name=f"llama-{shape}-random", hidden_size=s["hidden_size"],
                   num_layers=s["num_hidden_layers"])


class StubTokenizer:
    """Just what llmdiff_core.encoding.tokenize uses: a deterministic id per word, no files."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        ids = [3 + (sum(map(ord, w)) * 2654435761 + i) % (self.vocab - 3) for i, w in enumerate(text.split())]
        return {"input_ids": ids}


def prompt_of(tokens: int) -> str:
    """A prompt that StubTokenizer turns into `tokens` ids (BOS excluded)."""
    return " ".join(f"w{i}" for i in range(tokens))


def build_llm(shape: str, dtype: torch.dtype, device: torch.device) -> Any:
    """A LoadedLLM (llmdiff_core.llm) around a random-weight LlamaForCausalLM built on `device`."""
    import transformers

    from llmdiff_core.llm import LoadedLLM, dtype_kwarg

    cfg = transformers.LlamaConfig(**LLM_SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "sdpa"  # what llmdiff_core.llm.load_llm picks for Llama
    with torch.device(device):  # built (and randomly initialised) in place, in its dtype: no fp32 copy of an 8B
        model = transformers.AutoModelForCausalLM.from_config(cfg, **dtype_kwarg(dtype))
    model.eval().requires_grad_(False)
    return LoadedLLM(model=model, tokenizer=StubTokenizer(cfg.vocab_size), spec=llm_spec(shape), dtype=dtype,
                     path=f"<random {shape}>")


# ---------------------------------------------------------------------------------------------------
# adapters, features, conditioning

def build_adapter(model_patcher: Any, spec: LLMSpec, mode: str, loader_dtype: str = "auto",
                  max_tokens: int = 128, seed: int = 0) -> LLMDiffAdapter:
    """A 'trained' adapter: xavier projections, tau_q from the U-Net, every gate non-zero; float32 as
    training exports it, then with the projections in the dtype Adapter Loader (LLMDiff) gives them
    for `loader_dtype` on the U-Net's load device (auto: fp16 on most GPUs, fp32 on a CPU)."""
    sites, modules = find_sites(model_patcher.model.diffusion_model)
    config = AdapterConfig(base=base_family(model_patcher.model), sites=sites, llm=spec, original_path=mode,
                           max_tokens=max_tokens)
    adapter = LLMDiffAdapter(config, operations=comfy.ops.disable_weight_init)  # the loader's layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter.reset_parameters([m.to_q.weight.detach().float().cpu() for m in modules])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        n = len(adapter.sites)
        adapter.a_orig.copy_(0.8 + 0.4 * torch.rand(n, generator=g))
        adapter.a_new.copy_(0.2 + 0.5 * torch.rand(n, generator=g))
        adapter.b_orig.copy_(0.1 * torch.randn(n, generator=g))
        adapter.b_new.copy_(0.1 * torch.randn(n, generator=g))
    adapter.cast_projections(inference_dtype(loader_dtype, model_patcher.load_device))
    return adapter.eval().requires_grad_(False)


def make_features(spec: LLMSpec, lengths: list[int], tokens: int, seed: int = 0,
                  device: torch.device | str = "cpu") -> LLMFeatures:
    """Random features of prompts with `lengths` real tokens after the BOS, padded to `tokens`, masked
    like llmdiff_core.encoding.encode (BOS out, except as the only token of an empty prompt). float32 on
    `device` (the encoder leaves them on ComfyUI's intermediate device, the CPU)."""
    g = torch.Generator().manual_seed(seed)
    b, L, D = len(lengths), spec.num_layers, spec.hidden_size
    mask = torch.zeros(b, tokens, dtype=torch.bool)
    for row, n in enumerate(lengths):
        if n == 0:
            mask[row, 0] = True
        else:
            mask[row, 1:1 + n] = True
    hidden = torch.randn(b, L + 1, tokens, D, generator=g)
    scores = 0.1 * torch.randn(b, L, tokens, D, generator=g)
    real = (torch.arange(tokens)[None] <= torch.tensor(lengths)[:, None]).float()[:, None, :, None]
    return LLMFeatures(spec, (hidden * real).to(device), (scores * real).to(device), mask.to(device))


def clip_conditioning(shape: UNetShape, rows: int, seed: int, tokens: int = 77) -> list[list[Any]]:
    """What CLIPTextEncode gives: [[cond [rows, 77, width], {"pooled_output": [rows, 1280]}]]."""
    g = torch.Generator().manual_seed(10_000 + seed)
    extra: dict[str, Any] = {"pooled_output": torch.randn(rows, 1280, generator=g)}
    if shape.family == "sdxl":
        extra.update(width=shape.pixels, height=shape.pixels, target_width=shape.pixels,
                     target_height=shape.pixels)
    return [[torch.randn(rows, tokens, shape.context_dim, generator=g), extra]]


def prompt_pair(shape: UNetShape, spec: LLMSpec, tokens: int, positive_len: int, negative_len: int,
                batch: int = 1) -> tuple[list, list]:
    """(positive, negative) CONDITIONING with LLM features attached, `batch` rows each."""
    pos = attach_features(clip_conditioning(shape, batch, 1), make_features(spec, [positive_len] * batch, tokens, 1))
    neg = attach_features(clip_conditioning(shape, batch, 2), make_features(spec, [negative_len] * batch, tokens, 2))
    return pos, neg
