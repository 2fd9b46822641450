"""The dtype names the nodes, the trainer's options and the feature cache take ("auto" is resolved by
each of them: it depends on the device and on what runs in that dtype)."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
