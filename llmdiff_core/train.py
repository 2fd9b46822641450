"""Train an LLMDiff adapter: `python llmdiff_core/train.py --help` (DESIGN.md §1.3, README "Training").

Runs from the repository root as a plain script, or under `accelerate launch llmdiff_core/train.py`.
The pack's modules use relative imports, so as a script this file first puts the repository root on
sys.path and imports the package `llmdiff_core` properly; imported as a module it does nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _main() -> int:
    if not __package__:  # run as a script: make `llmdiff_core` importable as a package
        repo_root = str(Path(__file__).resolve().parent.parent)
        if repo_root not in sys.path:
            sys.path.insert(0, repo_root)
        script_dir = str(Path(__file__).resolve().parent)
        # The script's own folder is sys.path[0]: drop it, or llmdiff_core's modules (config.py,
        # features.py, ...) would shadow top-level modules of the same name (ComfyUI has a `comfy.*`
        # but also plain names such as `utils` on some versions).
        sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(script_dir)]
    from llmdiff_core.training.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(_main())
