"""Make ComfyUI importable for the training script, with the right settings, before any comfy import.

ComfyUI reads its command-line settings (comfy.cli_args.args) when comfy.model_management is first
imported, and picks its compute device then. So: put the root on sys.path, set the args (CPU when
there is no CUDA, PyTorch attention), select this process's GPU under a multi-GPU launcher, and
only then import comfy.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("llmdiff.train")


class ComfyNotFound(RuntimeError):
    pass


def setup(comfyui_root: str) -> Path:
    """Idempotent. Returns the ComfyUI root in use."""
    if "comfy.model_management" in sys.modules:  # already set up (tests, or a second call)
        import comfy  # noqa: F401

        return Path(sys.modules["comfy"].__file__ or ".").resolve().parent.parent
    if not comfyui_root:
        raise ComfyNotFound("ComfyUI is needed for training (its checkpoint loader, noise schedule and sampler): "
                            "give --comfyui-root /path/to/ComfyUI or set LLMDIFF_COMFYUI_ROOT")
    root = Path(comfyui_root).expanduser().resolve()
    if not (root / "comfy" / "model_management.py").is_file():
        raise ComfyNotFound(f"'{root}' is not a ComfyUI folder (no comfy/model_management.py in it)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

    import torch

    # Under torchrun / accelerate each process must use its own GPU; ComfyUI takes the current one.
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and torch.cuda.is_available():
        torch.cuda.set_device(int(local_rank))

    from comfy.cli_args import args  # parses nothing from our argv (ComfyUI's own parsing is opt-in)

    mps = getattr(torch.backends, "mps", None)
    if not torch.cuda.is_available() and not (mps is not None and mps.is_available()):
        args.cpu = True
    # PyTorch SDPA: on CPU ~12x faster than ComfyUI's default sub-quadratic attention.
    args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401  (now, with the args above)

    log.info("ComfyUI from %s", root)
    return root
