"""Test session setup: a real ComfyUI runtime on CPU, with this pack loaded the way ComfyUI loads it.

The ComfyUI root comes from LLMDIFF_COMFYUI_ROOT (test.sh sets it to the pinned runtime, or to the
user's own ComfyUI). ComfyUI's args must be set before anything imports comfy.model_management.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import pkgutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMFY_ROOT = os.environ.get("LLMDIFF_COMFYUI_ROOT")
if not COMFY_ROOT or not (Path(COMFY_ROOT) / "comfy").is_dir():
    raise pytest.UsageError(
        "LLMDIFF_COMFYUI_ROOT must point to a ComfyUI root (the folder with main.py and comfy/). "
        "Run the tests with ./test.sh, which builds the pinned runtime or uses yours.")
COMFY_ROOT = str(Path(COMFY_ROOT).resolve())
if COMFY_ROOT not in sys.path:
    sys.path.insert(0, COMFY_ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from comfy.cli_args import args  # noqa: E402  (parses [], not pytest's argv)

args.cpu = True
args.use_pytorch_cross_attention = True  # CPU SDPA: ~12x faster than sub-quadratic attention

import utils.extra_config  # noqa: E402,F401  (0.3.x: before `import nodes`, see comfyui-internals §6)
import nodes  # noqa: E402


def _load_pack() -> str:
    """Load the pack through ComfyUI's own loader; alias its llmdiff_core as the top-level one.

    ComfyUI imports a pack under a module name derived from its path. Tests import `llmdiff_core`
    directly; the alias makes both names the same module objects, so classes compare equal.
    """
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    ok = asyncio.run(nodes.load_custom_node(str(REPO)))
    if not ok:
        raise RuntimeError(f"ComfyUI could not load the pack at {REPO}: see the log above")
    pack_name = str(REPO).replace(".", "_x_")
    prefix = pack_name + ".llmdiff_core"
    core = importlib.import_module(prefix)
    for info in pkgutil.walk_packages(core.__path__, prefix + "."):
        importlib.import_module(info.name)  # every module, so each exists once under both names
    for name, module in list(sys.modules.items()):
        if name == prefix or name.startswith(prefix + "."):
            sys.modules.setdefault("llmdiff_core" + name[len(prefix):], module)
    return pack_name


PACK_MODULE = _load_pack()


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    return Path(COMFY_ROOT)


@pytest.fixture(scope="session")
def node_classes() -> dict:
    return nodes.NODE_CLASS_MAPPINGS


# --- node graphs in process (test_nodes.py, test_sdxl_hybrid.py) -----------------------------------

def run_node(node_id: str, **inputs):
    """Execute a registered node class the way ComfyUI does for V3 nodes; returns its outputs."""
    return nodes.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).result


@pytest.fixture(scope="session")
def model_folders(tmp_path_factory):
    """models/LLM/tiny-llama (a tiny random Llama + tokenizer) and models/llmdiff/, registered with
    ComfyUI's folder_paths like a user's model folders."""
    import folder_paths
    from tiny_llms import make_tiny_llm

    root = tmp_path_factory.mktemp("models")
    make_tiny_llm("llama", root / "LLM" / "tiny-llama")
    (root / "llmdiff").mkdir()
    folder_paths.add_model_folder_path("LLM", str(root / "LLM"))
    folder_paths.add_model_folder_path("llmdiff", str(root / "llmdiff"))
    return root


@pytest.fixture(scope="session")
def llm(model_folders):
    """The tiny Llama loaded through LLMDiffLLMLoader (an LLMDIFF_LLM value)."""
    (out,) = run_node("LLMDiffLLMLoader", model_dir="tiny-llama", dtype="auto", device="default",
                      trust_remote_code=False)
    return out
