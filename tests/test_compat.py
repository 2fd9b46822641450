"""The oldest transformers that requirements.txt allows still loads and encodes every family.

The suite runs against the pinned transformers (scripts/pins.txt); a ComfyUI install may have any
release from requirements.txt's floor on. scripts/setup_env.sh installs that floor release (with a
tokenizers and huggingface-hub it accepts) into <env>/compat/transformers-floor beside the pinned
ComfyUI; this test runs the LLM loading and encoding tests against it in a subprocess (no download
here). Left out there: the tests that pin down internals of the current transformers (the literal
per-token reference calls Gemma 3 blocks with today's arguments, which mask type the model hands its
blocks, which class AutoModel picks for multimodal Gemma 3, widening a sliding window after loading).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from compat_folders import compat_folder, env_importing_first, pytest_under, version_under

REPO = Path(__file__).resolve().parents[1]
CURRENT_INTERNALS = ("not (literal_reference and gemma3) and not eager_float_masks and not masks_of_each_kind "
                     "and not sliding_window_layers and not multimodal_gemma3_uses")


def transformers_floor() -> str:
    found = re.search(r"^transformers>=([\d.]+)", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    assert found, "requirements.txt names no transformers floor"
    return found.group(1)


def compat_site() -> Path:
    return compat_folder("transformers-floor", "scripts/setup_env.sh builds it with the pinned runtime",
                         "needs the pinned runtime of scripts/setup_env.sh (it installs the transformers floor), not "
                         "your own ComfyUI")


@pytest.mark.slow
def test_llm_loading_and_encoding_on_the_oldest_allowed_transformers() -> None:
    site = compat_site()
    env = env_importing_first(site)
    seen, floor = version_under(env, "transformers"), transformers_floor()
    assert seen == floor, (f"{site} holds transformers {seen!r}, requirements.txt's floor is {floor}: update "
                           f"COMPAT_TRANSFORMERS in scripts/setup_env.sh")
    proc = pytest_under(env, ["tests/test_llm_loading.py", "tests/test_encoding.py", "-k", CURRENT_INTERNALS], 900)
    assert proc.returncode == 0, f"on transformers {floor}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert re.search(r"\b[6-9]\d passed", proc.stdout), proc.stdout[-500:]  # the bulk of them ran, not a few
