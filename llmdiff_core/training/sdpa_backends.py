"""Which of torch's SDPA kernels a training run may use, fastest first (--sdpa-backends).

The frozen U-Net's backward spends much of a training step in attention: on an H100 the cuDNN attention
backward that torch picks there took 15 % of an SD1.5 step and 8 % of an SDXL one (docs/benchmarks.md
§5e). Which kernel is fastest for the U-Net's head sizes (SD1.5: 40, 80, 160; SDXL: 64) is a
measurement, not a rule, so this lets a run name the kernels to use. Only the named ones run, in the
order given, and torch's math kernel is kept as the last resort: a call none of them takes (the
adapter's masked attention cannot use flash) still runs, slowly, rather than failing.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import LLMDiffError

# option name -> torch.nn.attention.SDPBackend member
BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
            "math": "MATH"}


def parse_backends(text: str) -> list[str]:
    """'flash,efficient' -> ['flash', 'efficient']; '' -> [] (torch's own choice). ValueError names a bad entry."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown SDPA backend(s) {', '.join(unknown)}: use a comma list of "
                         f"{', '.join(BACKENDS)}, fastest first")
    if len(set(names)) != len(names):
        raise ValueError(f"an SDPA backend is named twice in '{text}'")
    return names


def use_backends(names: list[str]) -> Callable[[], None]:
    """Let torch's SDPA use only `names` (then math), in that order, process-wide; returns what restores
    torch's own setting. [] changes nothing."""
    if not names:
        return lambda: None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [getattr(SDPBackend, BACKENDS[n]) for n in names + ([] if "math" in names else ["math"])]
    try:
        context = sdpa_kernel(order, set_priority=True)
    except TypeError:  # (set_priority came with torch 2.6)
        import torch

        raise LLMDiffError(f"--sdpa-backends needs torch 2.6 or newer (this is {torch.__version__}); "
                           "leave it empty to let torch choose") from None
    context.__enter__()
    return lambda: context.__exit__(None, None, None)
