"""A real ComfyUI server with the pack loaded: it starts, lists our nodes, runs a prompt, stops cleanly."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from server_harness import PACK_NAME, ComfyServer, ServerError, port_is_free

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    models = tmp_path_factory.mktemp("models")
    # Stand-ins the loader combos should (and should not) list; nothing here is ever loaded.
    (models / "LLM" / "org" / "tiny-llm").mkdir(parents=True)
    (models / "LLM" / "org" / "tiny-llm" / "config.json").write_text("{}")
    (models / "llmdiff").mkdir()
    (models / "llmdiff" / "smoke.safetensors").write_bytes(b"")
    (models / "llmdiff" / "pickled.ckpt").write_bytes(b"")
    srv = ComfyServer(comfy_root, sys.executable, models_dir=models)
    with srv:
        print(f"ComfyUI answered /object_info after {srv.startup_seconds:.1f} s")
        yield srv


def test_object_info_lists_core_nodes_and_the_pack(server: ComfyServer, node_classes: dict) -> None:
    info = server.get_json("/object_info")
    assert {"EmptyImage", "SaveImage", "KSampler"} <= info.keys()
    # The pack imported (ComfyUI prints one line per custom node folder, flagged on failure).
    lines = [ln for ln in server.log_text().splitlines() if re.search(rf"seconds.*{PACK_NAME}$", ln)]
    assert lines and "IMPORT FAILED" not in lines[0], server.log_tail()
    # Every node the in-process load registered is served, attributed to this pack's folder.
    ours = sorted(k for k in node_classes if k.startswith("LLMDiff"))
    assert sorted(k for k in info if k.startswith("LLMDiff")) == ours
    for node_id in ours:
        assert info[node_id]["python_module"] == f"custom_nodes.{PACK_NAME}", node_id


def _combo_options(info: dict, node_id: str, name: str) -> list[str]:
    spec = info[node_id]["input"]["required"][name]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]  # V1 list or V3 "COMBO" form


def test_loader_combos_list_the_model_folders(server: ComfyServer) -> None:
    info = server.get_json("/object_info")
    if "LLMDiffAdapterLoader" not in info or "LLMDiffLLMLoader" not in info:
        pytest.skip("the loader nodes are not registered yet")
    assert "org/tiny-llm" in _combo_options(info, "LLMDiffLLMLoader", "model_dir")
    assert _combo_options(info, "LLMDiffAdapterLoader", "adapter_name") == ["smoke.safetensors"]


def test_core_prompt_completes_and_image_is_fetchable(server: ComfyServer) -> None:
    workflow = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0xFF0000}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "llmdiff_smoke"}},
    }
    status, body = server.post_prompt(workflow)
    assert status == 200, body
    assert body.get("node_errors") == {}, body  # 200 can still carry per-node errors
    entry = server.wait_history(body["prompt_id"], timeout=60)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (image,) = entry["outputs"]["2"]["images"]
    png = Image.open(io.BytesIO(server.fetch_image(image["filename"], image["subfolder"], image["type"])))
    assert png.size == (8, 8)
    assert png.convert("RGB").getpixel((3, 3)) == (255, 0, 0)


def test_server_stops_cleanly(server: ComfyServer) -> None:
    proc = server.proc
    assert proc is not None and proc.poll() is None
    server.stop()
    assert proc.poll() is not None
    assert port_is_free(server.port)
    server.stop()  # idempotent


def test_failed_start_reports_the_log(comfy_root: Path) -> None:
    with pytest.raises(ServerError, match=r"(?s)exited with code.*unrecognized arguments"):
        ComfyServer(comfy_root, sys.executable, extra_args=["--no-such-flag"]).start()
