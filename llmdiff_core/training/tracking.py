"""Watching a run: a progress bar (loss, img/s, ETA), a JSONL log always, TensorBoard when installed.

TensorBoard is optional: torch.utils.tensorboard needs the `tensorboard` package, which a plain
ComfyUI install does not have. Without it the run says so once and logs to metrics.jsonl only.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("llmdiff.train")

RATE_WINDOW = 20  # steps: images/s over these, so a compile, a validation or a checkpoint drops out of it soon


def device_memory(device: Any) -> dict[str, float]:
    """The peak memory on a CUDA device in GiB since the training loop started (Trainer.run resets it):
    allocated tensors, what decides out-of-memory; nothing on other devices. Host-side allocator
    statistics: no device sync."""
    if getattr(device, "type", None) != "cuda":
        return {}
    return {"gpu_peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}


class Tracker:
    """Main process only (the others get a Tracker with enabled=False: every call is a no-op)."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, progress: bool, total_steps: int,
                 start_step: int) -> None:
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.bar = None
        self._t0 = time.perf_counter()
        self._images = 0
        self._recent: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW + 1)  # (time, images so far)
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                log.warning("TensorBoard logging is off: the 'tensorboard' package is not installed "
                            "(pip install tensorboard). Metrics still go to %s", output_dir / "metrics.jsonl")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            desc="training")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()})
        assert self.jsonl is not None
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.tb.add_scalar(k, v, step)

    def gates(self, step: int, w_orig: torch.Tensor, w_new: torch.Tensor) -> None:
        """Per-layer fusion weights (the paper's Figure 5), one scalar per layer."""
        values = {f"gates/w_orig/{i:02d}": float(v) for i, v in enumerate(w_orig.tolist())}
        values.update({f"gates/w_new/{i:02d}": float(v) for i, v in enumerate(w_new.tolist())})
        self.scalars(step, values)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """image: [H, W, 3] uint8."""
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")

    def step_done(self, step: int, images: int, loss: float, lr: float) -> float:
        """Advance the bar; returns images/s over the last RATE_WINDOW steps (over the run so far until
        there are two): the training's pace, not one that the first steps' compile holds down for hours."""
        self._images += images
        now = time.perf_counter()
        self._recent.append((now, self._images))
        since, before = self._recent[0] if len(self._recent) > 1 else (self._t0, 0)
        rate = (self._images - before) / max(1e-9, now - since)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}", refresh=False)
        return rate

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
        self.enabled = False
