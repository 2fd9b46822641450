"""The adapter file: one .safetensors, the AdapterConfig as JSON in its metadata (DESIGN.md §2).

Only safetensors is ever read: pickled checkpoints (.bin/.pt/.ckpt) can run code when loaded, so
they are refused, also when renamed to .safetensors (recognised by their first bytes). Every problem
with a file surfaces as an LLMDiffError that names the file and says what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from .adapter import LLMDiffAdapter
from .atomic_files import write_safetensors
from .config import FORMAT_NAME, FORMAT_VERSION, AdapterConfig
from .errors import LLMDiffError

SUFFIX = ".safetensors"
CONFIG_KEY = "llmdiff_config"  # metadata key holding AdapterConfig.to_json()
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_MAX_LISTED = 5  # problems listed per kind in a mismatch message

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class _Header:
    """What the safetensors header says, read without touching the tensor data."""

    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]


# --- saving -------------------------------------------------------------------------------------
def save_adapter(adapter: LLMDiffAdapter, path: PathLike) -> Path:
    """Write the adapter (tensors in their own dtype) atomically: readers see the old file or the new.

    The data goes to a temporary file in the same folder, is fsynced, then replaces `path`; on any failure
    the temporary file is removed (atomic_files).
    """
    path = Path(path)
    if path.suffix.lower() != SUFFIX:
        raise LLMDiffError(f"adapter files are .safetensors files: cannot save as '{path.name}'")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}
    metadata = {CONFIG_KEY: adapter.config.to_json(), "format": FORMAT_NAME, "version": str(FORMAT_VERSION)}
    write_safetensors(path, tensors, metadata, durable=True)
    return path


# --- loading ------------------------------------------------------------------------------------
def read_adapter_config(path: PathLike) -> AdapterConfig:
    """The config of a valid adapter file, from its header only (no tensor data is read).

    Also checks the tensor names/shapes listed in the header against the config, so inspection
    refuses exactly the files that load_adapter refuses (short of damaged tensor data).
    """
    header = _read_header(path)
    config = _config_from_header(path, header)
    _check_tensors(path, header, _expected_shapes(config))
    return config


def load_adapter(path: PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 operations: Any = nn) -> LLMDiffAdapter:
    """Load and validate an adapter file. dtype=None keeps the dtypes stored in the file. operations:
    the Linear class provider (LLMDiffAdapter's; comfy.ops for ComfyUI's partial loading)."""
    config = read_adapter_config(path)
    tensors = _read_tensors(path, device)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    with torch.device("meta"):  # no allocation: assign=True below adopts the loaded tensors
        adapter = LLMDiffAdapter(config, operations)
    adapter.load_state_dict(tensors, strict=True, assign=True)
    return adapter


def _damaged(path: PathLike, reason: str) -> LLMDiffError:
    return LLMDiffError(f"The adapter file '{os.fspath(path)}' is damaged or incomplete ({reason}). "
                        "Download it again, or export it again from training.")


def _refuse_pickle(path: PathLike, why: str) -> LLMDiffError:
    return LLMDiffError(
        f"'{os.fspath(path)}' {why}. ComfyUI-LLMDiff loads only .safetensors adapters and never unpickles "
        ".bin/.pt/.ckpt files, because unpickling a file can run any code in it. If you trust the file, "
        "convert it in Python: build LLMDiffAdapter(config), load_state_dict(torch.load(path, "
        "weights_only=True)), then save it with llmdiff_core.adapter_file.save_adapter(adapter, "
        "'name.safetensors').")


def _sniff(path: PathLike) -> None:
    """Check the first bytes: a safetensors file starts with a little-endian u64 header size, then '{'.

    Catches pickles/zips in disguise and cut-off files before safetensors parses anything.
    """
    p = Path(path)
    if p.suffix.lower() in _PICKLE_SUFFIXES:
        raise _refuse_pickle(path, f"is a pickled checkpoint ({p.suffix})")
    if p.suffix.lower() != SUFFIX:
        raise LLMDiffError(f"'{os.fspath(path)}' is not an adapter file: LLMDiff adapters are {SUFFIX} files")
    try:
        with open(p, "rb") as f:
            head = f.read(9)
        size = p.stat().st_size
    except FileNotFoundError:
        raise LLMDiffError(f"adapter file not found: '{os.fspath(path)}'") from None
    except OSError as e:
        raise LLMDiffError(f"cannot read the adapter file '{os.fspath(path)}': {e.strerror or e}") from None
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise _refuse_pickle(path, "is really a pickled PyTorch checkpoint with a .safetensors name")
    if len(head) < 9:
        raise _damaged(path, f"only {size} bytes")
    header_len = int.from_bytes(head[:8], "little")
    if header_len > size - 8:
        raise _damaged(path, f"the header announces {header_len} bytes but the file has only {size}")
    if head[8:9] != b"{":
        raise _damaged(path, "it does not start like a safetensors file")


def _read_header(path: PathLike) -> _Header:
    _sniff(path)
    try:
        with safetensors.safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return _Header(metadata=dict(f.metadata() or {}),
                           shapes={k: tuple(s.get_shape()) for k, s in slices.items()},
                           dtypes={k: str(s.get_dtype()) for k, s in slices.items()})
    except (safetensors.SafetensorError, OSError) as e:  # bad header, offsets, or unreadable
        raise _damaged(path, str(e) or type(e).__name__) from None


def _guess_kind(keys: list[str]) -> str:
    """A hint for the common wrong pick from a model list."""
    if any("lora" in k.lower() for k in keys):
        return "; it looks like a LoRA"
    if any(k.startswith(("image_proj", "ip_adapter")) for k in keys):
        return "; it looks like an IP-Adapter"
    if any(k.startswith(("model.diffusion_model.", "input_blocks.", "first_stage_model.")) for k in keys):
        return "; it looks like a model checkpoint"
    return ""


def _config_from_header(path: PathLike, header: _Header) -> AdapterConfig:
    meta = header.metadata
    if CONFIG_KEY not in meta:
        raise LLMDiffError(
            f"'{os.fspath(path)}' is not an LLMDiff adapter: it has no LLMDiff metadata"
            f"{_guess_kind(list(header.shapes))}. Pick an adapter made by the LLMDiff training script.")
    version = meta.get("version", "")
    if not version.isdigit():
        raise _damaged(path, f"format version {version!r} is not a number")
    if int(version) > FORMAT_VERSION:
        raise LLMDiffError(
            f"'{os.fspath(path)}' uses adapter format version {version}, newer than this ComfyUI-LLMDiff "
            f"understands ({FORMAT_VERSION}): update ComfyUI-LLMDiff.")
    try:
        return AdapterConfig.from_json(meta[CONFIG_KEY])
    except LLMDiffError as e:
        raise LLMDiffError(f"'{os.fspath(path)}': {e}") from None
    except (ValueError, KeyError, TypeError, IndexError) as e:  # bad JSON or missing fields
        raise _damaged(path, f"its LLMDiff config cannot be read: {type(e).__name__}: {e}") from None


def _expected_shapes(config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in LLMDiffAdapter(config).state_dict().items()}


def _check_tensors(path: PathLike, header: _Header, expected: dict[str, tuple[int, ...]]) -> None:
    """The file's tensors must be exactly the ones its own config implies."""
    missing = [k for k in expected if k not in header.shapes]
    extra = [k for k in header.shapes if k not in expected]
    wrong = [f"{k} {list(header.shapes[k])} (config says {list(s)})"
             for k, s in expected.items() if k in header.shapes and header.shapes[k] != s]
    wrong += [f"{k} has dtype {d}" for k, d in header.dtypes.items() if k in expected and d not in _FLOAT_DTYPES]
    problems = [(what, items) for what, items in
                (("missing", missing), ("unexpected", extra), ("wrong", wrong)) if items]
    if not problems:
        return
    parts = []
    for what, items in problems:
        more = f", and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
        parts.append(f"{len(items)} {what} tensor(s): {', '.join(items[:_MAX_LISTED])}{more}")
    raise LLMDiffError(f"The adapter file '{os.fspath(path)}' does not match its own config ("
                       + "; ".join(parts) + "). It was edited or written by another tool: export it again.")


def _read_tensors(path: PathLike, device: torch.device | str) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(os.fspath(path), device=str(device))
    except (safetensors.SafetensorError, OSError) as e:  # changed or broke after the header check
        raise _damaged(path, str(e) or type(e).__name__) from None
