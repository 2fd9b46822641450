"""The editor-format workflows in the real graph editor: headless Chromium against a real server.

For each workflows/<name>.json: load it with app.loadGraphData (what drag-and-drop does), check that
the front end knows every node type in it (LiteGraph.registered_node_types) and reported no missing
nodes, queue it with app.queuePrompt (the Run button) at CPU size (64x64, 2 steps: set on the
widgets, as a user would) and wait until /history says it succeeded and the output node shows its
image. Screenshots go to test-artifacts/screenshots/: <name>_loaded.png (as shipped) and <name>.png
(after the run).

Chromium is Debian's package (scripts/install_chromium.sh). Without it the tests skip, except under
CI (env CI set), where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from browser_driver import Chromium, Page, find_chromium
from server_harness import ComfyServer
from test_workflows_e2e import CPU_SIZE, CPU_STEPS, RUN_TIMEOUT, load_editor, start_demo_server, workflow_names

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
VIEWPORT = (1600, 1000)
UI_TIMEOUT = 180.0
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow]

if find_chromium() is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI is set but no Chromium was found: run scripts/install_chromium.sh first")
    pytestmark.append(pytest.mark.skip(reason="no Chromium (run scripts/install_chromium.sh or set LLMDIFF_CHROMIUM)"))

# Runs before the page's own scripts: hide the "Nodes 2.0" banner, record missing-node reports.
PAGE_SETUP = "try { localStorage.setItem('vueNodesBannerDismissed', 'true'); } catch (e) {}"
HOOK_MISSING = """(() => {
  if (window.__llmdiffMissing) return true;
  window.__llmdiffMissing = [];
  for (const fn of ['showMissingNodesError', 'showMissingModelsError']) {
    const orig = app[fn].bind(app);
    app[fn] = (...args) => {
      window.__llmdiffMissing.push({fn, what: JSON.stringify(args[0]).slice(0, 2000)});
      return orig(...args);
    };
  }
  return true;
})()"""
# Frontend-only settings for clean screenshots (stored by the server in the test's user dir).
UI_SETTINGS = {"Comfy.Minimap.Visible": False, "Comfy.TutorialCompleted": True}


def _post_setting(server: ComfyServer, key: str, value: Any) -> None:
    req = urllib.request.Request(f"{server.url}/settings/{key}", data=json.dumps(value).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


@pytest.fixture(scope="module")
def server(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    srv = start_demo_server(comfy_root, tmp_path_factory.mktemp("browser"))
    try:
        for key, value in UI_SETTINGS.items():
            _post_setting(srv, key, value)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def editor(server: ComfyServer) -> Iterator[Page]:
    """The graph editor, opened once; each test loads its workflow into it."""
    with Chromium(window=VIEWPORT) as browser:
        page = browser.new_page(default_timeout=UI_TIMEOUT)
        page.set_viewport(*VIEWPORT)
        page.call("Page.addScriptToEvaluateOnNewDocument", {"source": PAGE_SETUP})
        t0 = time.monotonic()
        page.navigate(server.url + "/")
        page.wait_for("window.app && app.graph && window.LiteGraph && app.canvas && "
                      "Object.keys(LiteGraph.registered_node_types).length > 100", timeout=UI_TIMEOUT)
        page.evaluate(HOOK_MISSING)
        print(f"editor ready in {time.monotonic() - t0:.1f} s")
        yield page


def _open_dialogs(page: Page) -> list[str]:
    return page.evaluate("[...document.querySelectorAll('.p-dialog')].map(d => d.innerText.slice(0, 300))") or []


def _settle(page: Page) -> None:
    """Redraw the canvas and let two frames pass, so a screenshot shows the current state."""
    page.evaluate("(app.graph.setDirtyCanvas(true, true), "
                  "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true)))))")


def _load(page: Page, workflow: dict[str, Any], name: str) -> None:
    """What dropping <name>.json on the canvas does: a new tab named after the file."""
    page.evaluate("(window.__llmdiffMissing.length = 0, true)")
    page.evaluate(f"app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(name)}).then(() => true)")
    page.wait_for(f"app.graph._nodes.length === {len(workflow['nodes'])}", timeout=30)


def _shrink_widgets(page: Page) -> None:
    """CPU size, as a user would set it on the widgets."""
    page.evaluate(f"""(() => {{
      const set = (node, name, value) => {{ const w = node.widgets.find(w => w.name === name); w.value = value; }};
      for (const node of app.graph._nodes) {{
        if (node.type === 'EmptyLatentImage') {{ set(node, 'width', {CPU_SIZE}); set(node, 'height', {CPU_SIZE}); }}
        if (node.type === 'KSampler') {{ set(node, 'steps', {CPU_STEPS}); set(node, 'control_after_generate', 'fixed'); }}
      }}
      return true;
    }})()""")


def _wait_for_new_history(server: ComfyServer, before: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = server.get_json("/history")
        new = [entry for pid, entry in history.items() if pid not in before]
        if new:
            return new[0]
        time.sleep(0.5)
    raise AssertionError(f"nothing finished within {timeout:.0f} s; queue: {server.get_json('/queue')}\n"
                         f"--- server log ---\n{server.log_tail(3000)}")


@pytest.mark.parametrize("name", workflow_names())
def test_editor_workflow_loads_runs_and_is_screenshotted(editor: Page, server: ComfyServer, name: str) -> None:
    workflow = load_editor(name)
    t0 = time.monotonic()
    _load(editor, workflow, name)

    types = sorted({n["type"] for n in workflow["nodes"]})
    unknown = editor.evaluate(f"{json.dumps(types)}.filter(t => !(t in LiteGraph.registered_node_types))")
    assert unknown == [], f"{name}: node types unknown to the front end: {unknown}"
    assert editor.evaluate("window.__llmdiffMissing") == [], f"{name}: missing nodes/models reported"
    assert _open_dialogs(editor) == [], f"{name}: a dialog opened on load"
    broken = editor.evaluate("app.graph._nodes.filter(n => n.has_errors).map(n => n.type)")
    assert broken == [], f"{name}: nodes with errors: {broken}"
    _settle(editor)
    editor.screenshot(SCREENSHOTS / f"{name}_loaded.png")

    _shrink_widgets(editor)
    before = set(server.get_json("/history"))
    editor.evaluate("app.queuePrompt(0, 1).then(() => true)")
    errors = editor.evaluate("app.lastNodeErrors")
    assert not errors, f"{name}: the server refused the prompt: {json.dumps(errors)[:2000]}"
    entry = _wait_for_new_history(server, before, RUN_TIMEOUT)
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"], \
        f"{name}: run failed: {json.dumps(status['messages'])[:3000]}"

    outputs = [n["id"] for n in workflow["nodes"] if n["type"] in ("SaveImage", "PreviewImage")]
    editor.wait_for(" && ".join(f"app.graph.getNodeById({i})?.imgs?.[0]?.complete" for i in outputs), timeout=30)
    _settle(editor)
    editor.screenshot(SCREENSHOTS / f"{name}.png")
    assert _open_dialogs(editor) == [], f"{name}: a dialog is open after the run"
    print(f"{name}: loaded, ran and screenshotted in {time.monotonic() - t0:.1f} s")
