"""fused_site.py's Triton kernel compiled for the GPUs it targets (Hopper sm_90, Ampere sm_80), on a CPU.

Not collected by the suite itself (the name is not test_*): tests/test_fused_site.py runs this file in a pytest of
its own with Triton on the path and without TRITON_INTERPRET (the interpreter's kernels do not compile). Triton
compiles for a target without a GPU (its ptxas ships in the wheel), so a kernel that does not compile, or tiles
that ask for more shared memory than a GPU has, fail here and not in a lent GPU's few minutes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from llmdiff_core import fused_site

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from site_calls import ATTENTION_TILES, TILES  # noqa: E402  (the tile shapes the GPU benchmark sweeps)

if os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("run through tests/test_fused_site.py, without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

if tuple(int(x) for x in triton.__version__.split(".")[:2]) != (3, 9) and not os.environ.get("CI"):
    pytest.skip(f"written against Triton 3.9's compile API, this is {triton.__version__}", allow_module_level=True)

# (head dim, channels) of every site: SD1.5 (8 heads at 320, 640, 1280 channels), SDXL (64 channels a head)
SITES = [(40, 320), (80, 640), (160, 1280), (64, 640), (64, 1280)]
SHARED = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024}  # bytes of shared memory a program may have (H100, A100,
# RTX 4090); the consumer GPUs cannot hold these tiles, where the op computes the site with torch's kernels instead
OVER_SHARED = {89: {(160, 256)}}  # (head dim, keys)


def compiled(arch: int, dtype: str, head_dim: int, channels: int, tokens: int, project: bool,
             tiles: tuple[int, int] = (0, 0)) -> Any:
    """The kernel as hybrid_site launches it (launch_config), compiled for sm_<arch>."""
    kernel = fused_site._kernel()
    config = fused_site.launch_config(head_dim, channels, tokens, project, *tiles)
    warps = config.pop("num_warps")
    const = {"HEAD_DIM": head_dim, "PROJECT": project, "HAS_BIAS": True, "HAS_KEEP": True, **config}
    names = kernel.arg_names
    signature = {name: "constexpr" if name in const else
                 ("*fp32" if name == "wo_ptr" else f"*{dtype}") if name.endswith("_ptr") else
                 "fp32" if name == "scale" else "i32" for name in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def registers_and_spill(kernel: Any) -> tuple[int, int]:
    """(registers a thread, bytes of stack a thread: spilled registers) of a compiled kernel, read from its cubin by
    the cuobjdump that ships with Triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    assert found, usage
    return int(found.group(1)), int(found.group(2))


@pytest.mark.parametrize("arch, dtype", [(90, "fp16"), (90, "bf16"), (80, "fp16"), (89, "fp16")])
@pytest.mark.parametrize("project", [True, False], ids=["fused", "fused-attention"])
def test_the_products_tiles_compile_within_shared_memory(arch: int, dtype: str, project: bool) -> None:
    """Every site shape at spans of 128 and 256 keys (the most shared memory each tile takes) fits the GPU, but
    OVER_SHARED's: the sites the op hands to torch's kernels there (fused_site._with_torch)."""
    for head_dim, channels in SITES:
        for tokens in (128, fused_site.MAX_KEYS):
            kernel = compiled(arch, dtype, head_dim, channels, tokens, project)
            assert "ptx" in kernel.asm and "cubin" in kernel.asm
            fits = (head_dim, tokens) not in OVER_SHARED.get(arch, set())
            assert (kernel.metadata.shared <= SHARED[arch]) is fits, (head_dim, tokens, kernel.metadata.shared)


# (head dim, span) where every tile spills: 160-channel heads at 256 keys; the product's tiles spill least there
SPILLING = {(160, 256): 1024}  # bytes a thread, at most


@pytest.mark.parametrize("tokens", [32, 64, 128, 256])
@pytest.mark.parametrize("project", [True, False], ids=["fused", "fused-attention"])
def test_the_products_tiles_keep_the_kernel_in_registers(tokens: int, project: bool) -> None:
    """launch_config's tiles leave the one-kernel site no register spill on Hopper at every site shape and span
    (before session 24, 64 rows a program spilled 0.3 to 2.8 KB a thread at 256 keys, and fused-attention's
    160-channel heads at 128), but for SPILLING's, where no tile keeps them and these spill least."""
    for head_dim, channels in SITES:
        registers, spill = registers_and_spill(compiled(90, "fp16", head_dim, channels, tokens, project))
        assert spill <= SPILLING.get((head_dim, tokens), 0), (head_dim, channels, tokens, registers, spill)


@pytest.mark.parametrize("tile", TILES + tuple(f"attention {t}" for t in ATTENTION_TILES))
def test_the_benchmarks_tile_shapes_compile_for_hopper(tile: str) -> None:
    """bench/site_calls.py's sweep (64 attended keys, fp16): each tile shape runs at every site shape."""
    project = not tile.startswith("attention")
    rows, warps = (int(x) for x in tile.split()[-1].split("/"))
    for head_dim, channels in SITES:
        kernel = compiled(90, "fp16", head_dim, channels, 64, project, (rows, warps))
        assert kernel.metadata.shared <= SHARED[90], (head_dim, channels, kernel.metadata.shared)
