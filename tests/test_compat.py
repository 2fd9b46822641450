"""The oldest transformers that requirements.txt allows still loads and encodes every family.

The suite runs against the pinned transformers (scripts/pins.txt); a ComfyUI install may have any
release from requirements.txt's floor on. This installs the floor release (with a tokenizers and
huggingface-hub it accepts) into a cache folder once per machine and runs the LLM loading and encoding
tests against it in a subprocess. Left out there: the tests that pin down internals of the current
transformers (the literal per-token reference calls Gemma 3 blocks with today's arguments, which
mask type the model hands its blocks, which class AutoModel picks for multimodal Gemma 3, and
widening a sliding window after loading).
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Releases transformers 4.50.3 declares compatible (its setup.py: tokenizers>=0.21,<0.22; hub>=0.26,<1.0).
COMPANIONS = {"4.50.3": ("tokenizers==0.21.4", "huggingface-hub==0.30.2")}
CURRENT_INTERNALS = ("not (literal_reference and gemma3) and not eager_float_masks and not masks_of_each_kind "
                     "and not sliding_window_layers and not multimodal_gemma3_uses")


def transformers_floor() -> str:
    text = (REPO / "requirements.txt").read_text()
    found = re.search(r"^transformers>=([\d.]+)", text, re.MULTILINE)
    assert found, "requirements.txt names no transformers floor"
    return found.group(1)


def install(version: str) -> Path:
    """transformers==version and its companions in a cache folder (once per machine, under a lock)."""
    target = Path.home() / ".cache" / "comfyui-llmdiff" / f"compat-transformers-{version}"
    done = target / ".complete"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                   "--target", str(target), f"transformers=={version}", *COMPANIONS[version]]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                if os.environ.get("CI"):
                    pytest.fail(f"could not install transformers {version}:\n{proc.stderr[-2000:]}")
                pytest.skip(f"could not install transformers {version} (no PyPI access?)")
            done.touch()
    return target


@pytest.mark.slow
def test_llm_loading_and_encoding_on_the_oldest_allowed_transformers() -> None:
    version = transformers_floor()
    assert version in COMPANIONS, f"requirements.txt's floor moved to {version}: name its companions here"
    site = install(version)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    seen = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert seen.stdout.strip() == version, seen.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_llm_loading.py", "tests/test_encoding.py", "-k", CURRENT_INTERNALS],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"on transformers {version}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert re.search(r"\b[6-9]\d passed", proc.stdout), proc.stdout[-500:]  # the bulk of them ran, not a few
