"""LLMDiffTextEncode: prompt(s) -> CONDITIONING carrying the adapter-independent LLM features."""

from __future__ import annotations

import math

import torch
from comfy_api.v0_0_2 import io

from ..llmdiff_core.conditioning import attach_features
from ..llmdiff_core.errors import LLMDiffError
from ..llmdiff_core.prompt_text import split_prompts, strip_prompt_weights
from .sockets import CATEGORY, LLM

POOLED_WIDTH = 1280  # SDXL's pooled CLIP-G vector; SD1.5 ignores pooled_output


def clip_encode_batch(clip, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP conditioning for each prompt, stacked. Different chunk counts are repeated up to their
    least common multiple, which leaves unmasked attention unchanged (ComfyUI's own trick)."""
    conds, pooled = [], []
    for text in prompts:
        c, p = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        conds.append(c)
        pooled.append(p)
    length = math.lcm(*(c.shape[1] for c in conds))
    conds = [c.repeat(1, length // c.shape[1], 1) for c in conds]
    return torch.cat(conds), torch.cat(pooled)


class LLMDiffTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMDiffTextEncode",
            display_name="Text Encode (LLMDiff)",
            category=CATEGORY,
            description="Encodes a prompt with the LLM (all layers, for the layer-wise score encoding) and, "
                        "when a CLIP is connected, with CLIP too. Use it for positive AND negative prompts.",
            inputs=[
                LLM.Input("llm", tooltip="The LLM from LLM Loader (LLMDiff); must be the LLM the adapter was trained with."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The prompt. Weighting like (word:1.2) reaches CLIP only; the LLM reads the plain words."),
                io.Int.Input("max_tokens", default=128, min=2, max=4096,
                             tooltip="LLM token budget including the BOS token. Positive and negative prompts with the "
                                     "same value batch together. Use the adapter's training value (128 unless its notes say otherwise)."),
                io.Combo.Input("overflow", options=["error", "truncate"], default="error",
                               tooltip="What to do when the prompt has more LLM tokens than max_tokens: stop with an "
                                       "error that says by how much, or cut the end (logged)."),
                io.Boolean.Input("prompt_per_line", default=False,
                                 tooltip="Treat every non-empty line as its own prompt: a batch of different "
                                         "prompts for a latent batch of the same size."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Needed for hybrid (clip-mode) adapters and to run without an adapter; it also gives "
                                      "SDXL its pooled vector. Paper-mode adapters ignore it."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, llm, text: str, max_tokens: int, overflow: str, prompt_per_line: bool,
                clip=None) -> io.NodeOutput:
        prompts = split_prompts(text, prompt_per_line)
        features = llm.encode([strip_prompt_weights(p) for p in prompts], max_tokens=max_tokens, overflow=overflow)
        if clip is not None:
            cond, pooled = clip_encode_batch(clip, prompts)
        else:
            # No CLIP: a 1-token placeholder. A paper-mode adapter replaces it with phi(c); any other
            # model would fail on it, which LLMDiffApply's checks and the docs explain.
            cond = torch.zeros(len(prompts), 1, 1)
            pooled = torch.zeros(len(prompts), POOLED_WIDTH)
        if cond.shape[0] != features.batch_size:
            raise LLMDiffError(f"{cond.shape[0]} CLIP rows but {features.batch_size} LLM rows")
        conditioning = [[cond, {"pooled_output": pooled}]]
        return io.NodeOutput(attach_features(conditioning, features))
