"""Loading a Hugging Face decoder-only LLM from a local folder (DESIGN.md §2, LLMDiffLLMLoader).

Local files only, safetensors only, no remote code unless asked for. Needs no ComfyUI: the node
wraps the result for ComfyUI's model management (comfy_llm.py).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .dtypes import DTYPES
from .errors import LLMDiffError
from .features import LLMSpec

CONFIG_FILE = "config.json"
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Any of these makes a loadable tokenizer (fast JSON, sentencepiece, GPT-2 style BPE, WordPiece, Mistral tekken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt", "tekken.json")
SHARD_INDEX = "model.safetensors.index.json"

log = logging.getLogger("llmdiff")


@dataclass
class LoadedLLM:
    """A loaded LLM: the HF module (its LM head is never run), its tokenizer and what adapters check."""

    model: nn.Module
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    spec: LLMSpec
    dtype: torch.dtype
    path: str

    @property
    def text_config(self) -> Any:
        """The decoder's config (a multimodal Gemma 3 config holds it as text_config)."""
        return self.model.config.get_text_config()

    @property
    def device(self) -> torch.device:
        """Where the weights are now (ComfyUI may have moved them since loading)."""
        return next(self.model.parameters()).device

    def decoder(self) -> nn.Module:
        """The base text decoder (embeddings + blocks + final norm, no LM head): LlamaModel,
        GPT2Model, Gemma3TextModel inside Gemma3ForConditionalGeneration, ..."""
        return _decoder_of(self.model)

    def decoder_blocks(self) -> nn.ModuleList:
        """The decoder blocks in order, found by shape not by name (model.layers, transformer.h,
        language_model.layers, ...): the ModuleList of num_hidden_layers modules, nearest the top."""
        n = self.spec.num_layers
        for module in _breadth_first(self.decoder()):
            if isinstance(module, nn.ModuleList) and len(module) == n:
                return module
        raise LLMDiffError(f"could not find the {n} decoder blocks of {self.spec.describe()} "
                           f"({type(self.model).__name__}): this architecture is not supported")


def _decoder_of(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    return get() if callable(get) else model


def _breadth_first(root: nn.Module) -> list[nn.Module]:
    """Modules by depth, so the decoder's own block list wins over lists nested inside blocks."""
    out: list[nn.Module] = []
    level = [root]
    while level:
        out.extend(level)
        level = [child for m in level for child in m.children()]
    return out


# --- finding folders ------------------------------------------------------------------------------

def find_llm_folders(roots: list[str]) -> list[str]:
    """Folders under `roots` holding config.json and *.safetensors weights (one file or shards),
    as sorted '/'-separated names relative to their root. ComfyUI's own file lists only show files,
    so Hugging Face folders need this walk. Hidden folders (.git, .cache) are skipped, symlinks are
    followed (once each) and a model folder's subfolders are not searched."""
    names: set[str] = set()
    for root in roots:
        seen: set[str] = set()
        for dirpath, dirnames, files in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:  # a symlink loop or a second link to the same folder
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, root)
            is_model = CONFIG_FILE in files and any(f.endswith(".safetensors") for f in files)
            if is_model and rel != ".":  # the root itself is a container, not a model
                names.add(rel.replace(os.sep, "/"))
                dirnames[:] = []
    return sorted(names)


# --- dtype ----------------------------------------------------------------------------------------

def choose_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """"auto" | "bf16" | "fp16" | "fp32" -> torch dtype for running the LLM on `device`.

    auto: bf16 on CUDA where supported, else fp16 on CUDA; fp32 anywhere else. fp16 is never used
    on CPU, even when asked for: CPU half matmuls are slow and LLM outlier activations overflow
    fp16 (the top source of dtype bug reports against peer packs), so it falls back to fp32.
    """
    device = torch.device(device)
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise LLMDiffError(f"unknown LLM dtype '{name}': use auto, bf16, fp16 or fp32")
    if name == "fp16" and device.type == "cpu":
        log.warning("LLMDiff: fp16 is not used on CPU (slow, and LLM activations overflow it): running in fp32")
        return torch.float32
    return DTYPES[name]


# --- loading --------------------------------------------------------------------------------------

def _check_folder(path: str) -> dict[str, Any]:
    """Fail early, naming the folder and the fix, before transformers produces a stack trace.
    Returns the raw config.json."""
    if not os.path.isdir(path):
        raise LLMDiffError(f"LLM folder not found: {path}. Put a Hugging Face model folder (config.json, "
                           f"tokenizer files, *.safetensors) under models/LLM/.")
    files = os.listdir(path)
    if CONFIG_FILE not in files:
        raise LLMDiffError(f"LLM folder {path} has no {CONFIG_FILE}: copy the whole Hugging Face model folder, "
                           f"not only the weights.")
    try:
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise LLMDiffError(f"{CONFIG_FILE} in LLM folder {path} is not readable JSON ({e}): download it again.") from e
    weights = sorted(f for f in files if f.endswith(".safetensors"))
    if not weights:
        pickles = [f for f in files if f.endswith(PICKLE_WEIGHTS)]
        if pickles:
            raise LLMDiffError(
                f"LLM folder {path} only has pickle weights ({', '.join(sorted(pickles))}), which can run code "
                f"when loaded and are refused. Convert the model to safetensors (e.g. load it once with "
                f"transformers and save_pretrained(..., safe_serialization=True)) or download the safetensors version.")
        raise LLMDiffError(f"LLM folder {path} has no *.safetensors weights: download the model's weights into it.")
    _check_shards(path, files)
    _check_safetensors([os.path.join(path, f) for f in weights])
    if not any(f in files for f in TOKENIZER_FILES):
        raise LLMDiffError(f"LLM folder {path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}): "
                           f"copy them from the model's original repository into the folder.")
    return raw


def _check_shards(path: str, files: list[str]) -> None:
    """A sharded model lists its shards in an index; a missing one is the usual broken download."""
    if SHARD_INDEX not in files:
        return
    try:
        with open(os.path.join(path, SHARD_INDEX), encoding="utf-8") as f:
            shards = set(json.load(f)["weight_map"].values())
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise LLMDiffError(f"{SHARD_INDEX} in LLM folder {path} is unreadable ({e}): download it again.") from e
    missing = sorted(shards - set(files))
    if missing:
        raise LLMDiffError(f"LLM folder {path} lacks weight shards {', '.join(missing)}: download them into it.")


def _check_safetensors(files: list[str]) -> None:
    """Reading each header is cheap and catches truncated or broken downloads with a clear message."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(f, framework="pt"):
                pass
        except Exception as e:  # SafetensorError derives from Exception only
            raise LLMDiffError(f"weights file {f} is corrupt or incomplete ({e}): download it again.") from e


def _load_config(path: str, raw: dict[str, Any], trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        model_type = raw.get("model_type", "(none)")
        if "auto_map" in raw and not trust_remote_code:
            hint = ("its config ships its own model code (auto_map): turn on trust_remote_code if you trust "
                    "this folder, it runs Python code from it")
        else:
            hint = ("update transformers, or use a model of a supported family "
                    "(Llama, Qwen, Gemma, Mistral, Phi-3, GPT-2)")
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LLMDiffError(f"LLM folder {path}: unknown architecture '{model_type}' for transformers: {hint}. "
                           f"({first_line})") from e


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype keyword of from_pretrained / from_config: `dtype` since transformers 4.56, `torch_dtype`
    before it (requirements.txt allows 4.50.3; those releases reject `dtype` with a TypeError)."""
    import transformers
    from packaging.version import Version

    new = Version(transformers.__version__).release >= (4, 56)
    return {"dtype" if new else "torch_dtype": dtype}


def _from_pretrained(path: str, config: Any, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """AutoModel first: the base decoder without the LM head, which the encoding never runs (an untied
    head is ~1 GB in bf16 for Llama-3-8B); AutoModelForCausalLM for configs without a base-model class.
    sdpa attention, eager where the family has no sdpa or soft-caps its attention logits (Gemma 2)."""
    from transformers import AutoModel, AutoModelForCausalLM

    kwargs = dict(config=config, local_files_only=True, use_safetensors=True, trust_remote_code=trust_remote_code,
                  output_loading_info=True, **dtype_kwarg(dtype))
    # Soft-capped attention logits (Gemma 2) exist only in eager attention. Recent transformers refuse sdpa
    # for such a model; older ones (4.5x) accept it and silently drop the capping: ask for eager directly.
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    implementations = ("eager",) if getattr(text, "attn_logit_softcapping", None) else ("sdpa", "eager")
    last_error: Exception | None = None
    missing_weights: LLMDiffError | None = None
    for auto in (AutoModel, AutoModelForCausalLM):
        try:
            model, info = _load_with_attention(auto, path, implementations, kwargs)
        except ValueError as e:  # no such attention implementation for this family, or no class of this kind
            last_error = e
            continue
        try:
            _check_loading_info(path, model, info)
            return model
        except LLMDiffError as e:
            # transformers 4.50's Gemma 3 text base model names its weights unlike the causal-LM checkpoint,
            # so AutoModel finds none of them: the causal-LM class may still match.
            missing_weights = e
    if missing_weights is not None:
        raise missing_weights
    raise LLMDiffError(f"LLM folder {path}: transformers cannot build a model from it ({last_error}). "
                       f"Is it a decoder-only language model?") from last_error


def _load_with_attention(auto: Any, path: str, implementations: tuple[str, ...],
                         kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """auto.from_pretrained with the first attention implementation the family accepts; the last
    ValueError when none is."""
    from transformers.utils import logging as hf_logging

    error: ValueError | None = None
    for attn in implementations:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the skipped LM head is reported as "unexpected" keys
        try:
            return auto.from_pretrained(path, attn_implementation=attn, **kwargs)
        except ValueError as e:
            error = e
        finally:
            hf_logging.set_verbosity(verbosity)
    raise error if error is not None else ValueError("no attention implementation to try")


def _check_loading_info(path: str, model: nn.Module, info: dict[str, Any]) -> None:
    """Missing decoder weights would be left random: refuse instead of encoding garbage. Parts
    that never run (the LM head, a vision tower) may be missing, e.g. from a base-model checkpoint."""
    decoder_tensors = {id(t) for t in (*_decoder_of(model).parameters(), *_decoder_of(model).buffers())}
    tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    missing = sorted(k for k in info.get("missing_keys") or [] if k not in tensors or id(tensors[k]) in decoder_tensors)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LLMDiffError(f"LLM folder {path} lacks weights for {shown}: a shard is missing or the weights belong "
                           f"to another model. Download the complete folder again.")


def load_llm(path: str, dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu",
             trust_remote_code: bool = False) -> LoadedLLM:
    """Load a causal LM folder (config.json, tokenizer, *.safetensors) with local files only."""
    from transformers import AutoTokenizer

    path = os.path.abspath(path)
    raw = _check_folder(path)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else choose_dtype(dtype, device)
    config = _load_config(path, raw, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, TypeError) as e:
        raise LLMDiffError(f"LLM folder {path}: its tokenizer does not load ({e}). Copy the tokenizer files "
                           f"from the model's original repository.") from e
    try:
        model = _from_pretrained(path, config, torch_dtype, trust_remote_code)
    except (OSError, RuntimeError) as e:  # unreadable shard, size mismatch, missing shard file
        raise LLMDiffError(f"LLM folder {path}: the weights do not load ({e}). Download the folder again.") from e
    model.to(device).eval()
    text = config.get_text_config()
    spec = LLMSpec(family=str(text.model_type), name=os.path.basename(path.rstrip(os.sep)),
                   hidden_size=int(text.hidden_size), num_layers=int(text.num_hidden_layers))
    return LoadedLLM(model=model, tokenizer=tokenizer, spec=spec, dtype=torch_dtype, path=path)
