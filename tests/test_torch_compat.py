"""The compiled and float8 tests pass under the GPU machines' torch release too, not only under the suite's.

tests/test_patching_compiled.py counts graphs and breaks and compares compiled results with eager ones under
the pinned torch (scripts/pins.txt), the newest release. Dynamo traces less in older releases: in session 21
a bool() of a dict in the site path traced under 2.13 and broke every compiled sampling run 27 times under
2.11, the torch of the machines the benchmarks run on, and no CPU test saw it. scripts/setup_torch_compat.sh
installs that release (PyPI's CUDA build: it imports without a GPU) beside the pinned runtime; this test runs
the compiled tests, the float8 ones and the compiled training runs under it in a subprocess.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from compat_folders import REPO, compat_folder, env_importing_first, pytest_under, version_under

SETUP = REPO / "scripts" / "setup_torch_compat.sh"


def compat_version() -> str:
    found = re.search(r"^TORCH_COMPAT=([\d.]+)$", SETUP.read_text(), re.MULTILINE)
    assert found, f"{SETUP} sets no TORCH_COMPAT"
    return found.group(1)


def compat_site() -> Path:
    return compat_folder(f"torch-{compat_version()}", "run scripts/setup_torch_compat.sh first (.ci/run does)",
                         "needs scripts/setup_torch_compat.sh (a ~3 GB download) beside the pinned runtime",
                         complete_marker=".complete")


# every test of the compiled sampling paths and of the float8 linears, and the compiled and float8 training runs
# (with the CUDA-graph audit of the training step): what the GPU sessions' compiled steps run
COMPILED_TESTS = ["tests/test_patching_compiled.py", "tests/test_float8_linears.py", "tests/test_train_run.py",
                  "-k", "compile or float8 or fp8"]
AT_LEAST = 35  # of the 40 selected in session 21: the bulk of them ran, not a few


@pytest.mark.slow
def test_compiled_paths_trace_and_match_eager_under_the_gpu_machines_torch() -> None:
    site = compat_site()
    env = env_importing_first(site)
    seen = version_under(env, "torch")
    assert seen.split("+")[0] == compat_version(), f"{site} holds torch {seen!r}"
    proc = pytest_under(env, COMPILED_TESTS, 2400)
    assert proc.returncode == 0, f"under torch {seen}:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    passed = re.search(r"\b(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= AT_LEAST, proc.stdout[-500:]
