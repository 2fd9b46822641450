"""What a user needs to know to use an adapter in a graph, as text: read from the file's config.

The adapter file records its base model, LLM, mode and training settings; the nodes check the model and
the LLM against them, but some choices only the user can match (CLIP's last layer, the prompt length it
learned on), so the Inspect node shows them.
"""

from __future__ import annotations

from typing import Any

from .config import AdapterConfig
from .unet_sites import describe_sites, family_label

# The training summary's fields worth a user's eye, in this order, with their labels.
TRAINING_FIELDS = (("steps", "steps"), ("global_batch", "global batch"), ("lr", "lr"), ("resolution", "resolution"),
                   ("mixed_precision", "precision"), ("ema_decay", "EMA decay"), ("data", "data"),
                   ("base_model", "base checkpoint"), ("init_adapter", "started from"), ("date", "date"))


def adapter_notes(config: AdapterConfig) -> str:
    lines = [f"Base model: {describe_sites(config.base, config.sites)}: use it with {family_label(config.base)} "
             "checkpoints.",
             f"LLM: {config.llm.describe()}: load that LLM (or a fine-tune of the same shape) in LLM Loader (LLMDiff).",
             _mode_line(config),
             f"Encoding: {config.encoding} (c0: {config.c0}); trained on prompts of up to {config.max_tokens} LLM "
             f"tokens (Text Encode's max_tokens)."]
    t = config.training
    layer = t.get("clip_stop_at_layer")
    if layer and config.original_path == "clip":
        lines.append(f"CLIP: trained with CLIP's last layer at {layer}: put a CLIP Set Last Layer node set to {layer} "
                     "before Text Encode (LLMDiff)'s clip input.")
    if t:
        done = ", ".join(f"{label} {_shown(t[key])}" for key, label in TRAINING_FIELDS if t.get(key) not in (None, ""))
        lines.append(f"Training: {done}." if done else "Training: no details recorded.")
        if t.get("trainer"):
            lines.append(f"Trained by: {t['trainer']}.")
    else:
        lines.append("Training: none recorded (an untrained or converted adapter).")
    return "\n".join(lines)


def _mode_line(config: AdapterConfig) -> str:
    if config.original_path == "clip":
        return ("Mode: hybrid (clip): CLIP stays; connect the checkpoint's CLIP to Text Encode (LLMDiff). LoRA, "
                "embeddings and IP-Adapter keep working.")
    pooled = " and makes SDXL's pooled vector" if config.needs_pooled else ""
    return (f"Mode: paper (llm): the LLM replaces CLIP{pooled}; encode the negative prompt with Text Encode "
            "(LLMDiff) too.")


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
