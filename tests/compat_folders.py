"""Folders of other package releases beside the pinned runtime (<env>/compat/<name>), and subprocesses that import
them first: a version probe and a pytest run of some of the suite's tests. scripts/setup_env.sh installs the
transformers floor and Triton there, scripts/setup_torch_compat.sh a second torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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


def version_under(env: dict[str, str], module: str) -> str:
    """module.__version__ as a subprocess with env imports it ("" if it cannot)."""
    seen = subprocess.run([sys.executable, "-W", "ignore", "-c", f"import {module}; print({module}.__version__)"],
                          capture_output=True, text=True, env=env, timeout=300)
    return seen.stdout.strip()


def pytest_under(env: dict[str, str], args: list[str], timeout: int) -> subprocess.CompletedProcess[str]:
    """pytest -q on args (test files, options) in the repository, in a subprocess with env."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=timeout)
