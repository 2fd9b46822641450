"""Folders of other package releases beside the pinned runtime (<env>/compat/<name>), and the environment of a
subprocess that imports them first. scripts/setup_env.sh installs the transformers floor and Triton there,
scripts/setup_torch_compat.sh a second torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def compat_folder(name: str, installed_by: str, skip_reason: str, complete_marker: str = "") -> Path:
    """<pinned runtime>/compat/<name> (complete when it holds complete_marker, if one is named). Missing, the test
    fails under CI, which installs every one, and skips elsewhere (e.g. against your own ComfyUI)."""
    site = Path(os.environ["LLMDIFF_COMFYUI_ROOT"]).resolve().parent / "compat" / name
    if not ((site / complete_marker).is_file() if complete_marker else site.is_dir()):
        if os.environ.get("CI"):
            pytest.fail(f"{site} is missing: {installed_by}")
        pytest.skip(skip_reason)
    return site


def env_importing_first(*folders: Path | str) -> dict[str, str]:
    """This process's environment with the folders first on PYTHONPATH (empty ones left out)."""
    path = [str(f) for f in folders if str(f)] + [p for p in [os.environ.get("PYTHONPATH", "")] if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))
