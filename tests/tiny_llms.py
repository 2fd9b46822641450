"""Tiny random Hugging Face causal LMs saved as real model folders, for offline tests.

`make_tiny_llm(family, folder)` writes config.json, model.safetensors and a tokenizer that
AutoTokenizer loads with local files only. Each model has hidden size 64, 4 heads (2 KV heads where
the family has GQA) and 2-3 layers; weights are random with a fixed seed and larger than HF's
init so that the per-block context contributions (scores) are far from zero.

The tokenizers are byte-level BPEs trained on the fly (well under a second): every byte is in the
alphabet, so emoji, CJK and accents encode without unknown tokens. They copy each family's BOS habit:
- "bos" style (llama, mistral, phi3, gemma2, gemma3): a <bos> token that the tokenizer adds itself,
- "qwen" style: no bos_token at all; the config's bos_token_id is <|endoftext|>, like Qwen2/3,
- "gpt2" style: bos = eos = <|endoftext|>, which the tokenizer does not add.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

# The config class of each family; a family whose class the installed transformers lacks is left out of
# FAMILIES (Qwen3 needs transformers >= 4.51; requirements.txt allows 4.50.3, tested by test_compat.py).
_CONFIG_CLASS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "gemma2": "Gemma2Config",
                 "gemma3": "Gemma3TextConfig", "mistral": "MistralConfig", "phi3": "Phi3Config", "gpt2": "GPT2Config",
                 "gemma3_mm": "Gemma3Config"}


def _available(family: str) -> bool:
    import transformers

    return hasattr(transformers, _CONFIG_CLASS[family])


FAMILIES = tuple(f for f in ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "mistral", "phi3", "gpt2") if _available(f))
# "gemma3_mm": a multimodal Gemma3ForConditionalGeneration (tiny SigLIP tower) around the gemma3 text model.
MULTIMODAL_FAMILIES = tuple(f for f in ("gemma3_mm",) if _available(f))
VOCAB = 320  # >= tokenizer size (256 byte tokens + merges + specials)
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
SLIDING_WINDOW = 4  # small, so Gemma's sliding layers really differ from its global ones

_CORPUS = [
    "a red fox jumps over the lazy dog", "a photo of a cat sitting on a wooden chair",
    "portrait of an old man, oil painting, dramatic light", "the quick brown fox", "a castle at night",
    "café crème brûlée à la française", "东京的夜景和樱花", "a bowl of ramen 🍜 with a soft egg 🥚",
    "sunset over the mountains, highly detailed, 4k", "two dogs playing in the snow",
]

# (special tokens in id order, tokenizer kwargs, whether the tokenizer itself adds the BOS)
_TOKENIZER_STYLES: dict[str, tuple[tuple[str, ...], dict[str, str], bool]] = {
    "bos": (("<pad>", "<eos>", "<bos>"), {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>"}, True),
    "qwen": (("<|endoftext|>", "<|im_start|>", "<|im_end|>"), {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"},
             False),
    "gpt2": (("<|endoftext|>",), {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                  "unk_token": "<|endoftext|>"}, False),
}


def tokenizer_style(family: str) -> str:
    return "qwen" if family.startswith("qwen") else "gpt2" if family == "gpt2" else "bos"


@functools.cache
def _tokenizer_json(style: str) -> str:
    """A trained byte-level BPE (serialized), cached per style: training is the slow part."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, _, adds_bos = _TOKENIZER_STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    if adds_bos:
        bos = specials[-1]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, specials.index(bos))])
    return tok.to_str()


def make_tokenizer(family: str) -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    style = tokenizer_style(family)
    _, kwargs, _ = _TOKENIZER_STYLES[style]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(style)), **kwargs)


def _config(family: str, tok: Any) -> Any:
    import transformers as tf

    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else 0}
    if family.startswith("qwen"):
        # Qwen configs name a BOS (<|endoftext|>) that their tokenizers do not have
        ids["bos_token_id"] = tok.convert_tokens_to_ids("<|endoftext|>")
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=HEADS,
                  max_position_embeddings=256, **ids)
    gqa = dict(num_key_value_heads=KV_HEADS)
    if family == "llama":
        return tf.LlamaConfig(num_hidden_layers=2, **gqa, **common)
    if family == "mistral":
        return tf.MistralConfig(num_hidden_layers=2, sliding_window=None, **gqa, **common)
    if family == "qwen2":
        return tf.Qwen2Config(num_hidden_layers=2, **gqa, **common)
    if family == "qwen3":
        return tf.Qwen3Config(num_hidden_layers=2, head_dim=HEAD_DIM, **gqa, **common)
    if family == "phi3":
        return tf.Phi3Config(num_hidden_layers=2, **gqa, **common)
    if family == "gemma2":  # layer types default to sliding, full, sliding
        return tf.Gemma2Config(num_hidden_layers=3, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
                               sliding_window=SLIDING_WINDOW, **gqa, **common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(num_hidden_layers=3, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
                                   sliding_window=SLIDING_WINDOW,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   **gqa, **common)
    if family == "gemma3_mm":
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=8)
        return tf.Gemma3Config(text_config=_config("gemma3", tok).to_dict(), vision_config=vision.to_dict(),
                               mm_tokens_per_image=4, image_token_index=VOCAB - 3, boi_token_index=VOCAB - 2,
                               eoi_token_index=VOCAB - 1)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=256, **ids)
    raise ValueError(f"unknown tiny family {family!r}; known: {FAMILIES}")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights ~N(0, 0.15) (HF's 0.02 makes every residual update ~0); biases and norm gains get
    a random offset too, so that Qwen2's qkv biases and Gemma's (1 + w) norms take part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise * 0.15)
            else:
                p.add_(noise * 0.1)


def make_tiny_llm(family: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random `family` causal LM + tokenizer into `folder` (created); returns folder."""
    import transformers as tf

    tok = make_tokenizer(family)
    config = _config(family, tok)
    torch.manual_seed(seed)
    # gemma3 -> Gemma3ForCausalLM (Gemma3TextConfig), gemma3_mm -> Gemma3ForConditionalGeneration
    model = tf.AutoModelForCausalLM.from_config(config)
    _randomize(model, seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder
