"""The editor-format and API-format file of each example workflow describe the same graph.

Same nodes (id and class), same links, same widget values, where the editor's positional
`widgets_values` are mapped to names by each node's live input order (INPUT_TYPES of the classes
ComfyUI has loaded, this pack's included). Also: every value is valid for its input, the editor
file is internally consistent (links table vs node slots), each workflow tells in a note where its
files go, and the files are exactly what workflows/build_workflows.py writes.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
API_WORKFLOWS = WORKFLOWS / "api"
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # frontend-only, never sent to /prompt
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FILE_WIDGETS = {"ckpt_name", "model_dir", "adapter_name"}  # options depend on the files present

EDITOR_NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
API_NAMES = sorted(p.stem for p in API_WORKFLOWS.glob("*.json"))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


class Schema:
    """A node class's inputs as the frontend sees them: name -> (type, options), in input order."""

    def __init__(self, class_type: str, node_classes: dict[str, Any]) -> None:
        if class_type not in node_classes:
            raise AssertionError(f"node class {class_type!r} is not loaded in ComfyUI")
        spec = node_classes[class_type].INPUT_TYPES()
        self.inputs: dict[str, tuple[str, list[Any] | None, dict[str, Any]]] = {}
        self.optional: set[str] = set(spec.get("optional", {}))
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                raw_type, opts = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
                if isinstance(raw_type, list):  # V1 combo: the options list itself
                    self.inputs[name] = ("COMBO", list(raw_type), opts)
                else:
                    self.inputs[name] = (raw_type, opts.get("options") if raw_type == "COMBO" else None, opts)

    def is_widget(self, name: str) -> bool:
        type_, _, opts = self.inputs[name]
        return type_ in WIDGET_TYPES and not opts.get("forceInput")

    @property
    def widgets(self) -> list[str]:
        return [n for n in self.inputs if self.is_widget(n)]

    @property
    def sockets(self) -> list[str]:
        return [n for n in self.inputs if not self.is_widget(n)]

    def named_widget_values(self, values: list[Any]) -> dict[str, Any]:
        """Positional widgets_values -> {widget: value}, skipping frontend-only control values."""
        out: dict[str, Any] = {}
        it = iter(values)
        for name in self.widgets:
            out[name] = next(it)
            if self.inputs[name][2].get("control_after_generate"):
                control = next(it)
                assert control in ("fixed", "increment", "decrement", "randomize"), (name, control)
        rest = list(it)
        assert not rest, f"{len(rest)} widgets_values left over: {rest}"
        return out

    def check_value(self, name: str, value: Any) -> None:
        type_, options, opts = self.inputs[name]
        if type_ == "COMBO":
            if name not in FILE_WIDGETS:
                assert options is not None and value in options, f"{name}={value!r} not in {options}"
        elif type_ == "INT":
            assert isinstance(value, int) and not isinstance(value, bool), (name, value)
            assert opts.get("min", value) <= value <= opts.get("max", value), (name, value, opts)
        elif type_ == "FLOAT":
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (name, value)
            assert opts.get("min", value) <= value <= opts.get("max", value), (name, value, opts)
        elif type_ == "BOOLEAN":
            assert isinstance(value, bool), (name, value)
        elif type_ == "STRING":
            assert isinstance(value, str), (name, value)


@pytest.fixture(scope="module")
def schemas(node_classes: dict[str, Any]) -> dict[str, Schema]:
    types = {n["type"] for name in EDITOR_NAMES for n in _load(WORKFLOWS / f"{name}.json")["nodes"]}
    return {t: Schema(t, node_classes) for t in sorted(types - VIRTUAL_NODES)}


def test_every_workflow_ships_in_both_formats() -> None:
    assert EDITOR_NAMES, "no workflows found"
    assert EDITOR_NAMES == API_NAMES
    assert {"sd15_llmdiff_paper", "sd15_llmdiff_hybrid", "sdxl_llmdiff_paper", "inspect_adapter"} <= set(EDITOR_NAMES)


def test_files_are_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("build_workflows", WORKFLOWS / "build_workflows.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    stale = [str(p.relative_to(REPO)) for p, text in module.outputs().items()
             if not p.exists() or p.read_text(encoding="utf-8") != text]
    assert not stale, f"out of date (run python workflows/build_workflows.py): {stale}"


@pytest.mark.parametrize("name", EDITOR_NAMES)
def test_editor_file_is_consistent(name: str, schemas: dict[str, Schema]) -> None:
    wf = _load(WORKFLOWS / f"{name}.json")
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes)
    link_ids = [row[0] for row in wf["links"]]
    assert len(set(link_ids)) == len(link_ids), "duplicate link ids"
    assert wf["last_link_id"] >= max(link_ids, default=0)
    for link_id, src, src_slot, dst, dst_slot, type_ in wf["links"]:
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id, f"link {link_id} not on its slots"
        # The frontend gives a link its input's type; an input of any type ("*": Preview as Text) takes any output.
        assert inp["type"] == type_, f"link {link_id}: into a {inp['type']} input as {type_}"
        assert out["type"] == type_ or type_ == "*", f"link {link_id}: {out['type']} -> {inp['type']}"
    for node in wf["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        schema = schemas[node["type"]]
        names = [i["name"] for i in node["inputs"]]
        # What frontend 1.32 writes: socket inputs, then one entry per widget, in schema order.
        assert names == schema.sockets + schema.widgets, f"node {node['id']} ({node['type']}): inputs {names}"
        for i in node["inputs"]:
            assert ("widget" in i) == schema.is_widget(i["name"]), (node["id"], i)
            if i["link"] is not None:
                assert i["link"] in link_ids, (node["id"], i)
        for name_, value in schema.named_widget_values(node["widgets_values"]).items():
            schema.check_value(name_, value)


@pytest.mark.parametrize("name", EDITOR_NAMES)
def test_editor_and_api_files_describe_the_same_graph(name: str, schemas: dict[str, Schema]) -> None:
    editor, api = _load(WORKFLOWS / f"{name}.json"), _load(API_WORKFLOWS / f"{name}.json")
    nodes = {str(n["id"]): n for n in editor["nodes"] if n["type"] not in VIRTUAL_NODES}
    assert sorted(nodes, key=int) == sorted(api, key=int), "node ids differ"
    links = {row[0]: row for row in editor["links"]}
    for node_id, node in nodes.items():
        entry = api[node_id]
        assert entry["class_type"] == node["type"], node_id
        if "title" in node:
            assert entry.get("_meta", {}).get("title") == node["title"], node_id
        schema = schemas[node["type"]]
        expected: dict[str, Any] = dict(schema.named_widget_values(node["widgets_values"]))
        for slot in node["inputs"]:
            if slot["link"] is not None:
                _, src, src_slot, _, _, _ = links[slot["link"]]
                expected[slot["name"]] = [str(src), src_slot]  # a linked widget input becomes a link too
        assert entry["inputs"] == expected, f"node {node_id} ({node['type']}) differs"
        for input_name, value in entry["inputs"].items():
            if not isinstance(value, list):
                schema.check_value(input_name, value)
        unlinked = [n for n in schema.sockets if n not in schema.optional and n not in entry["inputs"]]
        assert not unlinked, f"node {node_id} ({node['type']}): required inputs not linked: {unlinked}"


@pytest.mark.parametrize("name", EDITOR_NAMES)
def test_notes_say_where_each_file_goes(name: str, schemas: dict[str, Schema]) -> None:
    editor = _load(WORKFLOWS / f"{name}.json")
    notes = "\n".join(str(v) for n in editor["nodes"] if n["type"] in ("Note", "MarkdownNote")
                      for v in n["widgets_values"])
    assert notes, f"{name} has no note"
    assert editor["groups"], f"{name} has no groups"
    where = {"ckpt_name": "models/checkpoints", "model_dir": "models/LLM", "adapter_name": "models/llmdiff"}
    for node in editor["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        for widget, value in schemas[node["type"]].named_widget_values(node["widgets_values"]).items():
            if widget in where:
                assert where[widget] in notes and str(value) in notes, \
                    f"{name}: the notes do not say where {value!r} ({widget}) goes"
