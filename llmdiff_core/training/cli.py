"""`python llmdiff_core/train.py` / `accelerate launch llmdiff_core/train.py`: parse, set up ComfyUI, run."""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from .options import OptionsError, parse_options


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        opts = parse_options(argv)
    except OptionsError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    from .comfy_env import ComfyNotFound, setup

    try:
        setup(opts.comfyui_root)
    except ComfyNotFound as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    from ..errors import LLMDiffError
    from .runner import run

    try:
        return run(opts)
    except LLMDiffError as e:  # user-facing problems: a message, not a traceback
        logging.getLogger("llmdiff.train").error("%s", e)
        return 1
