"""Checkpoints: written atomically, resumable exactly, the last N kept; the final adapter export.

A checkpoint is a folder output_dir/checkpoints/step-<N>/ with
    adapter.safetensors   the adapter at that step (a normal adapter file: load it in ComfyUI as is)
    state.pt              optimizer, lr scheduler, EMA, step, and per process: RNG states + data position
It is written into a temporary folder and renamed into place (rename is atomic on one file system),
then `latest` (a one-line text file) is replaced atomically. A crash at any moment leaves the
previous checkpoints intact. state.pt holds only tensors and plain containers: it loads with
torch.load(weights_only=True), which cannot run code.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from ..adapter import LLMDiffAdapter
from ..adapter_file import save_adapter
from ..atomic_files import replacing, write_text
from ..errors import LLMDiffError

log = logging.getLogger("llmdiff.train")
STATE_FILE = "state.pt"
ADAPTER_FILE = "adapter.safetensors"


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: Path, step: int, adapter: LLMDiffAdapter, state: dict[str, Any],
                    keep: int) -> Path:
    """Main process only. `state` must already hold every process's RNG and data position."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step:08d}"
    with replacing(final, durable=True) as tmp:
        tmp.unlink()
        tmp.mkdir()
        save_adapter(adapter, tmp / ADAPTER_FILE)
        torch.save(state, tmp / STATE_FILE)
        if final.exists():  # same step written again (resumed, then stopped at once): replace it
            shutil.rmtree(final)
    write_text(root / "latest", final.name + "\n", durable=True)
    _prune(root, keep, final)
    return final


def _prune(root: Path, keep: int, newest: Path) -> None:
    for stale in root.glob(".step-*.tmp"):  # left by a crash mid-write (a folder, or the empty file before it)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    if keep <= 0:
        return
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """'latest' -> newest checkpoint in output_dir (None if there is none); else the given folder."""
    if not resume:
        return None
    if resume == "latest":
        root = checkpoints_dir(output_dir)
        pointer = root / "latest"
        if pointer.exists():
            p = root / pointer.read_text(encoding="utf-8").strip()
            if (p / STATE_FILE).exists():
                return p
        done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists()) if root.exists() else []
        return done[-1] if done else None
    p = Path(resume)
    if not (p / STATE_FILE).exists():
        raise LLMDiffError(f"'{resume}' is not a training checkpoint (no {STATE_FILE} in it); checkpoints are the "
                           f"step-* folders in <output_dir>/checkpoints")
    return p


def load_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)


def export(adapter: LLMDiffAdapter, path: Path, summary: dict[str, Any], ema_state: dict[str, torch.Tensor] | None
           ) -> Path:
    """The final adapter file (EMA weights when given) with the training summary in its config."""
    import copy

    out = copy.deepcopy(adapter).cpu()
    if ema_state is not None:
        with torch.no_grad():
            for name, p in out.named_parameters():
                if name in ema_state:
                    p.copy_(ema_state[name].to(p.dtype))
    out.config.training = dict(summary)
    return save_adapter(out, path)
