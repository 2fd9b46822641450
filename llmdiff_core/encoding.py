"""Text encoding from all LLM layers (DESIGN.md §1.1): H_0..H_L and the scores s_l.

    s_l = H_l - B_l^0(H_{l-1})      B_l^0: block l with every token seeing only itself

One causal pass over the right-padded batch. Hooks on the decoder blocks record H_0 (the input of
block 1, after any embedding scaling or position embedding) and each block's output H_l (before the
final norm), and compute B_l^0 *inside the same block call*: a pre-hook stacks [causal stream; same
stream] along the batch with the attention masks [causal; diagonal], the forward hook splits the
result, hands the causal half on to the next block and keeps the diagonal half. Every block sees its
usual position embeddings and keyword arguments, so this works for any family whose blocks take a
4-D attention mask (no per-family code), and each weight is read once per block.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import LLMDiffError
from .features import LLMFeatures
from .llm import LoadedLLM

log = logging.getLogger("llmdiff")

OVERFLOW_MODES = ("error", "truncate")
MASK_ARG = "attention_mask"
# 4-D float or bool masks reach the blocks with these; flash/flex attention take other mask forms.
SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class TokenBatch:
    """Right-padded token ids; every row starts with the BOS token."""

    input_ids: torch.Tensor  # [B, n] long, n = longest prompt
    lengths: list[int]  # real tokens per row, BOS included

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, n] long, 1 on real tokens (the Hugging Face convention)."""
        n = self.input_ids.shape[1]
        return (torch.arange(n) < torch.tensor(self.lengths)[:, None]).long()


def bos_token_id(loaded: LoadedLLM) -> int:
    """The token every prompt starts with.

    The tokenizer's BOS; else the model config's (Qwen2/3 tokenizers have none, their configs name
    <|endoftext|>); else EOS: a document separator plays the same attention-sink role, since
    pretraining packs documents after one (GPT-2's BOS is its EOS for that reason)."""
    tok = loaded.tokenizer
    for candidate in (tok.bos_token_id, getattr(loaded.text_config, "bos_token_id", None), tok.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    raise LLMDiffError(f"{loaded.spec.describe()}: neither its tokenizer nor its config names a BOS or EOS token, "
                       f"so prompts cannot be given a start token")


def _check_limits(loaded: LoadedLLM, max_tokens: int, overflow: str) -> None:
    if overflow not in OVERFLOW_MODES:
        raise LLMDiffError(f"unknown overflow mode '{overflow}': use error or truncate")
    if max_tokens < 1:
        raise LLMDiffError(f"max_tokens must be at least 1 (the BOS token), got {max_tokens}")
    limit = getattr(loaded.text_config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_tokens > limit:
        raise LLMDiffError(f"max_tokens {max_tokens} is more than {loaded.spec.describe()} has positions for "
                           f"({limit}): lower max_tokens")


def tokenize(loaded: LoadedLLM, texts: list[str], max_tokens: int, overflow: str = "error",
             truncated: list[int] | None = None) -> TokenBatch:
    """Raw text, no chat template: [BOS] + the text's tokens, at most max_tokens (BOS counts).

    truncated: where given, the indices of the texts cut to max_tokens are appended to it in place of a warning
    for each (training counts its captions: a warning per caption would flood its log).

    The text is tokenized without special tokens and the BOS is always prepended here, so there is
    exactly one leading BOS whether or not the tokenizer adds its own (Llama and Gemma do, GPT-2 and
    Qwen do not). An empty prompt is just the BOS.
    """
    _check_limits(loaded, max_tokens, overflow)
    if not texts:
        raise LLMDiffError("no prompts to encode")
    bos = bos_token_id(loaded)
    rows: list[list[int]] = []
    for i, text in enumerate(texts):
        ids = [bos] + list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) > max_tokens:
            where = f"prompt {i + 1} ({text[:40]!r}{'...' if len(text) > 40 else ''})"
            if overflow == "error":
                raise LLMDiffError(f"{where} is {len(ids)} tokens long (BOS included), over the limit of "
                                   f"max_tokens={max_tokens}: raise max_tokens or set overflow to truncate")
            if truncated is None:
                log.warning("LLMDiff: %s is %d tokens long, truncated to max_tokens=%d", where, len(ids), max_tokens)
            else:
                truncated.append(i)
            ids = ids[:max_tokens]
        rows.append(ids)
    pad = loaded.tokenizer.pad_token_id
    pad = bos if pad is None else pad  # any valid id: padded positions are masked out and zeroed
    input_ids = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return TokenBatch(input_ids=input_ids, lengths=[len(r) for r in rows])


# --- the batched causal + context-free pass ---------------------------------------------------------

def _duplicate(x: Any, batch: int) -> Any:
    """Stack a block argument onto itself along the batch when its dim 0 is the batch.

    Tensors with dim 0 == 1 that are broadcast over the batch (Llama's rotary cos/sin, position ids)
    stay as they are; 1-D tensors are never a batch (a [T] cache position could equal B by chance)."""
    if isinstance(x, torch.Tensor):
        return torch.cat([x, x]) if x.ndim >= 2 and x.shape[0] == batch else x
    if isinstance(x, (tuple, list)):
        return type(x)(_duplicate(v, batch) for v in x)
    if isinstance(x, dict):
        return {k: _duplicate(v, batch) for k, v in x.items()}
    return x


def _first_half(x: Any, batch: int) -> Any:
    """Undo _duplicate on extra block outputs (e.g. attention weights of older block APIs)."""
    if isinstance(x, torch.Tensor):
        return x[:batch] if x.ndim >= 1 and x.shape[0] == 2 * batch else x
    if isinstance(x, (tuple, list)):
        return type(x)(_first_half(v, batch) for v in x)
    return x


def _causal_padding_mask(pad_mask: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, n, n], True = may attend: key j <= query i and key j is a real token."""
    n = pad_mask.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=pad_mask.device).tril()
    return (causal[None] & pad_mask[:, None, :].bool())[:, None]


def _stacked_mask(mask: torch.Tensor | None, pad_mask: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """[causal mask as the model made it; diagonal mask in the same format], along the batch."""
    if mask is None:
        # sdpa's pure-causal fast path (no padding, no window reached): the model passes no mask.
        mask = _causal_padding_mask(pad_mask)
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or tuple(mask.shape[-2:]) != (n, n):
        raise LLMDiffError(f"unsupported attention mask for the score encoding: {type(mask).__name__} "
                           f"{tuple(getattr(mask, 'shape', ()))}; expected a 4-D [B, heads, {n}, {n}] mask")
    mask = mask.expand(batch, *mask.shape[1:])
    eye = torch.eye(n, dtype=torch.bool, device=mask.device).expand_as(mask)
    if mask.dtype == torch.bool:  # sdpa: True = attend
        diagonal = eye
    else:  # eager: additive, 0 = attend, dtype min = blocked
        diagonal = torch.zeros_like(mask).masked_fill(~eye, torch.finfo(mask.dtype).min)
    return torch.cat([mask, diagonal])


# inspect.signature per block forward function (not per call): blocks of one class share it. A forward
# replaced on the instance (e.g. accelerate's offload hooks) is not a method and is inspected per call.
_SIGNATURES: weakref.WeakKeyDictionary[Any, inspect.Signature] = weakref.WeakKeyDictionary()
# The base decoder and its blocks per model (found by walking the module tree once, not per encode).
_STRUCTURE: weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, nn.ModuleList]] = weakref.WeakKeyDictionary()


def _signature(block: nn.Module) -> inspect.Signature:
    forward = block.forward
    func = getattr(forward, "__func__", None) if getattr(forward, "__self__", None) is block else None
    if func is None:
        return inspect.signature(forward)
    sig = _SIGNATURES.get(func)
    if sig is None:
        sig = _SIGNATURES[func] = inspect.signature(forward)
    return sig


def _structure(loaded: LoadedLLM) -> tuple[nn.Module, nn.ModuleList]:
    """(base decoder, decoder blocks) of the loaded LLM, cached per model object."""
    model = loaded.model
    found = _STRUCTURE.get(model)
    if found is None or len(found[1]) != loaded.spec.num_layers:
        found = (loaded.decoder(), loaded.decoder_blocks())
        _STRUCTURE[model] = found
    return found


class _ScoreHooks:
    """Forward hooks that record H_0..H_L and B_l^0(H_{l-1}) while the decoder runs once."""

    def __init__(self, blocks: nn.ModuleList, pad_mask: torch.Tensor) -> None:
        self.blocks = blocks
        self.pad_mask = pad_mask
        self.hidden: list[torch.Tensor] = []  # H_0..H_L, float32 [B, n, D]
        self.context_free: list[torch.Tensor] = []  # B_l^0(H_{l-1}), l = 1..L
        self.batch = 0
        self.handles: list[Any] = []
        # stacked masks of this encode: the model passes every block the same mask object (Gemma: one
        # per attention kind), so [causal; diagonal] is built once per distinct mask, not per block
        self._masks: list[tuple[Any, int, int, torch.Tensor]] = []

    def __enter__(self) -> _ScoreHooks:
        for block in self.blocks:
            self.handles.append(block.register_forward_pre_hook(self._before, with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._after))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _before(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sig = _signature(block)
        if MASK_ARG not in sig.parameters:
            raise LLMDiffError(f"decoder block {type(block).__name__} takes no {MASK_ARG}: the score encoding "
                               f"cannot run it with a diagonal mask")
        bound = sig.bind(*args, **kwargs)
        h = bound.arguments[next(iter(sig.parameters))]
        self.batch, n = h.shape[0], h.shape[1]
        if not self.hidden:
            self.hidden.append(h.float())  # H_0: what the first block reads
        mask = bound.arguments.get(MASK_ARG)
        for name, value in bound.arguments.items():
            if name != MASK_ARG:
                bound.arguments[name] = _duplicate(value, self.batch)
        bound.arguments[MASK_ARG] = self._stacked(mask, n)
        return bound.args, bound.kwargs

    def _stacked(self, mask: Any, n: int) -> torch.Tensor:
        for seen, batch, length, stacked in self._masks:
            if seen is mask and batch == self.batch and length == n:
                return stacked
        stacked = _stacked_mask(mask, self.pad_mask, self.batch, n)
        self._masks.append((mask, self.batch, n, stacked))  # holds `mask`: its identity stays unique
        return stacked

    def _after(self, block: nn.Module, args: tuple, output: Any) -> Any:
        b = self.batch
        first = output[0] if isinstance(output, tuple) else output
        if not isinstance(first, torch.Tensor) or first.shape[0] != 2 * b:
            raise LLMDiffError(f"decoder block {type(block).__name__} returned {type(first).__name__}, "
                               f"not the stacked hidden states the score encoding needs")
        causal, context_free = first[:b], first[b:]
        self.hidden.append(causal.float())
        self.context_free.append(context_free.float())
        if isinstance(output, tuple):
            return (causal, *(_first_half(x, b) for x in output[1:]))
        return causal


def _to_bucket(x: torch.Tensor, real: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """[B, K, n, D] -> [B, K, max_tokens, D], zero on padding."""
    b, k, n, d = x.shape
    out = x.new_zeros(b, k, max_tokens, d)
    out[:, :, :n] = x * real[:, None, :, None]
    return out


def encode(loaded: LoadedLLM, texts: list[str], max_tokens: int = 128, overflow: str = "error",
           truncated: list[int] | None = None) -> LLMFeatures:
    """LLMFeatures of `texts`, padded to max_tokens, float32, on the device the LLM ran on (truncated: tokenize's)."""
    impl = getattr(loaded.text_config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        raise LLMDiffError(f"{loaded.spec.describe()} uses attention '{impl}'; the score encoding needs one of "
                           f"{SUPPORTED_ATTENTION} (load the LLM with load_llm)")
    batch = tokenize(loaded, texts, max_tokens, overflow, truncated)
    device = loaded.device
    input_ids, pad_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    if loaded.model.training:  # eval() walks every module: only when something switched it to training
        loaded.model.eval()
    decoder, blocks = _structure(loaded)
    # no_grad, not inference_mode: inference tensors cannot be saved for backward, and training
    # feeds these features to the adapter under autograd.
    with torch.no_grad(), _ScoreHooks(blocks, pad_mask) as hooks:
        # The base decoder, not the LM: the final norm runs (cheap), the LM head and logits do not.
        decoder(input_ids=input_ids, attention_mask=pad_mask, use_cache=False)
    hidden = torch.stack(hooks.hidden, dim=1)  # [B, L+1, n, D]
    scores = hidden[:, 1:] - torch.stack(hooks.context_free, dim=1)
    real = pad_mask.bool()
    lengths = torch.tensor(batch.lengths, device=device)
    mask = torch.zeros(len(texts), max_tokens, dtype=torch.bool, device=device)
    mask[:, :real.shape[1]] = real
    mask[:, 0] = lengths == 1  # BOS takes no part, except as the only token of an empty prompt
    return LLMFeatures(spec=loaded.spec, hidden=_to_bucket(hidden, real, max_tokens),
                       scores=_to_bucket(scores, real, max_tokens), mask=mask)
