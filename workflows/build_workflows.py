"""Writes the example workflows, in the editor format (workflows/*.json) and the API format
(workflows/api/*.json), from one description per graph, so the two cannot drift apart.

    python workflows/build_workflows.py          # rewrite every file
    python workflows/build_workflows.py --check  # exit 1 if a file differs from what would be written

tests/test_workflow_formats.py checks the written files against each other and against the live node
schemas, so a hand edit (or a workflow re-saved from the editor) is held to the same rules.

Editor format = what the frontend's Save writes and drag-and-drop loads (version 0.4, as
comfyui-frontend-package 1.32.9 serializes it): per node its socket inputs, then its widget inputs,
`widgets_values` by position (KSampler's seed is followed by the frontend-only control_after_generate
value), links as [id, from node, from slot, to node, to slot, type]. MarkdownNote nodes and groups
exist only in the editor. API format = what /prompt takes: {id: {class_type, inputs}}, widgets by name,
links as [from node id, from slot].

Defaults are the stand-in files of `python -m llmdiff_core.demo_models` (noise, not art): pick your
own checkpoint, LLM folder and adapter in the loader nodes.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
API_DIR = HERE / "api"

# Stand-in names (llmdiff_core/demo_models.py); kept literal so this script needs neither torch nor ComfyUI.
SD15_CKPT = "llmdiff_demo_sd15.safetensors"
SDXL_CKPT = "llmdiff_demo_sdxl.safetensors"
LLM_DIR = "llmdiff-demo-llama"
SD15_PAPER = "llmdiff_demo_sd15_paper.safetensors"
SD15_HYBRID = "llmdiff_demo_sd15_hybrid.safetensors"
SDXL_PAPER = "llmdiff_demo_sdxl_paper.safetensors"

# Input order of each node class as /object_info lists it (input_order: required, then optional),
# each (name, type, is_widget); and its outputs (name, type). Checked against the live schemas by
# tests/test_workflow_formats.py.
Input = tuple[str, str, bool]
SCHEMAS: dict[str, tuple[list[Input], list[tuple[str, str]]]] = {
    "CheckpointLoaderSimple": ([("ckpt_name", "COMBO", True)],
                               [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "EmptyLatentImage": ([("width", "INT", True), ("height", "INT", True), ("batch_size", "INT", True)],
                         [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL", False), ("seed", "INT", True), ("steps", "INT", True), ("cfg", "FLOAT", True),
                  ("sampler_name", "COMBO", True), ("scheduler", "COMBO", True), ("positive", "CONDITIONING", False),
                  ("negative", "CONDITIONING", False), ("latent_image", "LATENT", False), ("denoise", "FLOAT", True)],
                 [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT", False), ("vae", "VAE", False)], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE", False), ("filename_prefix", "STRING", True)], []),
    "PreviewImage": ([("images", "IMAGE", False)], []),
    "LLMDiffLLMLoader": ([("model_dir", "COMBO", True), ("dtype", "COMBO", True), ("device", "COMBO", True),
                          ("trust_remote_code", "BOOLEAN", True), ("after_encoding", "COMBO", True)],
                         [("llm", "LLMDIFF_LLM")]),
    "LLMDiffAdapterLoader": ([("adapter_name", "COMBO", True), ("dtype", "COMBO", True)], [("adapter", "LLMDIFF_ADAPTER")]),
    "LLMDiffTextEncode": ([("llm", "LLMDIFF_LLM", False), ("text", "STRING", True), ("max_tokens", "INT", True),
                           ("overflow", "COMBO", True), ("prompt_per_line", "BOOLEAN", True), ("clip", "CLIP", False)],
                          [("CONDITIONING", "CONDITIONING")]),
    "LLMDiffApply": ([("model", "MODEL", False), ("adapter", "LLMDIFF_ADAPTER", False), ("strength", "FLOAT", True),
                      ("start_percent", "FLOAT", True), ("end_percent", "FLOAT", True)], [("MODEL", "MODEL")]),
    "LLMDiffInspect": ([("adapter", "LLMDIFF_ADAPTER", False), ("width", "INT", True), ("height", "INT", True)],
                       [("IMAGE", "IMAGE"), ("notes", "STRING")]),
    "PreviewAny": ([("source", "*", False)], []),
}
# Widgets followed by a frontend-only "control after generate" value in widgets_values.
CONTROL_AFTER_GENERATE = {("KSampler", "seed")}
NOTE_TYPE = "MarkdownNote"  # a frontend-only node: in the editor file, never in the API file
GROUP_COLORS = {"models": "#3f789e", "prompts": "#8a8a3f", "sampling": "#3f8a5a", "output": "#7a4f8a"}


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    size: tuple[int, int]
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)  # input name -> (from node id, from slot)
    title: str | None = None
    control: str = "randomize"  # control_after_generate, where the class has one


@dataclass
class Graph:
    name: str
    nodes: list[Node] = field(default_factory=list)
    notes: list[tuple[str, str, tuple[int, int], tuple[int, int]]] = field(default_factory=list)  # title, text, pos, size
    groups: list[tuple[str, str, tuple[int, int, int, int]]] = field(default_factory=list)
    view: tuple[float, tuple[int, int]] = (0.75, (100, 75))  # editor zoom and offset on open (clears the sidebar)

    def add(self, type_: str, pos: tuple[int, int], size: tuple[int, int], title: str | None = None,
            **widgets: Any) -> Node:
        inputs = SCHEMAS[type_][0]
        unknown = set(widgets) - {name for name, _, is_widget in inputs if is_widget}
        if unknown:
            raise ValueError(f"{type_} has no widget(s) {sorted(unknown)}")
        missing = [name for name, _, is_widget in inputs if is_widget and name not in widgets]
        if missing:  # every widget explicit: the files document every value they run with
            raise ValueError(f"{type_}: give a value for {missing}")
        node = Node(len(self.nodes) + 1, type_, pos, size, widgets, title=title)
        self.nodes.append(node)
        return node

    @staticmethod
    def connect(src: Node, slot: int, dst: Node, input_name: str) -> None:
        sockets = {name for name, _, is_widget in SCHEMAS[dst.type][0] if not is_widget}
        if input_name not in sockets:
            raise ValueError(f"{dst.type} has no socket input {input_name!r}")
        dst.links[input_name] = (src.id, slot)

    # ---- API format ---------------------------------------------------------------------------
    def api(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n in self.nodes:
            inputs: dict[str, Any] = {}
            for name, _, is_widget in SCHEMAS[n.type][0]:
                if is_widget:
                    inputs[name] = n.widgets[name]
                elif name in n.links:
                    inputs[name] = [str(n.links[name][0]), n.links[name][1]]
            out[str(n.id)] = {"inputs": inputs, "class_type": n.type, "_meta": {"title": n.title or _display(n.type)}}
        return out

    # ---- editor format ------------------------------------------------------------------------
    def editor(self) -> dict[str, Any]:
        link_rows: list[list[Any]] = []
        link_ids: dict[tuple[int, str], int] = {}
        for n in self.nodes:  # link ids in the order of the target nodes' socket inputs
            for name, type_, is_widget in SCHEMAS[n.type][0]:
                if not is_widget and name in n.links:
                    src, slot = n.links[name]
                    link_rows.append([len(link_rows) + 1, src, slot, n.id, _socket_index(n.type, name), type_])
                    link_ids[(n.id, name)] = len(link_rows)
        order = _topological_order(self.nodes)
        nodes_json = [self._editor_node(n, order[n.id], link_ids, link_rows) for n in self.nodes]
        next_id = len(self.nodes) + 1
        for i, (title, text, pos, size) in enumerate(self.notes):
            nodes_json.append({"id": next_id + i, "type": NOTE_TYPE, "pos": list(pos), "size": list(size), "flags": {},
                               "order": len(self.nodes) + i, "mode": 0, "inputs": [], "outputs": [], "title": title,
                               "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
        groups = [{"id": i + 1, "title": title, "bounding": list(box), "color": GROUP_COLORS[kind], "font_size": 24,
                   "flags": {}} for i, (title, kind, box) in enumerate(self.groups)]
        scale, offset = self.view
        return {"id": _stable_uuid(self.name), "revision": 0, "last_node_id": next_id + len(self.notes) - 1,
                "last_link_id": len(link_rows), "nodes": nodes_json, "links": link_rows, "groups": groups,
                "config": {}, "extra": {"ds": {"scale": scale, "offset": list(offset)}}, "version": 0.4}

    def _editor_node(self, n: Node, order: int, link_ids: dict[tuple[int, str], int],
                     link_rows: list[list[Any]]) -> dict[str, Any]:
        inputs_spec, outputs_spec = SCHEMAS[n.type]
        sockets = [{"localized_name": name, "name": name, "type": type_, "link": link_ids.get((n.id, name))}
                   for name, type_, is_widget in inputs_spec if not is_widget]
        widget_inputs = [{"localized_name": name, "name": name, "type": type_, "widget": {"name": name}, "link": None}
                         for name, type_, is_widget in inputs_spec if is_widget]
        outputs = [{"localized_name": name, "name": name, "type": type_, "slot_index": slot,
                    "links": [row[0] for row in link_rows if row[1] == n.id and row[2] == slot]}
                   for slot, (name, type_) in enumerate(outputs_spec)]
        values: list[Any] = []
        for name, _, is_widget in inputs_spec:
            if is_widget:
                values.append(n.widgets[name])
                if (n.type, name) in CONTROL_AFTER_GENERATE:
                    values.append(n.control)
        node: dict[str, Any] = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {},
                                "order": order, "mode": 0, "inputs": sockets + widget_inputs, "outputs": outputs,
                                "properties": {"Node name for S&R": n.type}, "widgets_values": values}
        if n.title:
            node["title"] = n.title
        return node


def _socket_index(type_: str, input_name: str) -> int:
    """Slot of a socket input on the editor node: socket inputs come first, in schema order."""
    sockets = [name for name, _, is_widget in SCHEMAS[type_][0] if not is_widget]
    return sockets.index(input_name)


def _topological_order(nodes: list[Node]) -> dict[int, int]:
    order: dict[int, int] = {}
    remaining = list(nodes)
    while remaining:
        ready = [n for n in remaining if all(src in order for src, _ in n.links.values())]
        if not ready:
            raise ValueError("the graph has a cycle")
        for n in ready:
            order[n.id] = len(order)
            remaining.remove(n)
    return order


def _display(type_: str) -> str:
    return {"CheckpointLoaderSimple": "Load Checkpoint", "EmptyLatentImage": "Empty Latent Image",
            "VAEDecode": "VAE Decode", "SaveImage": "Save Image", "PreviewImage": "Preview Image",
            "LLMDiffLLMLoader": "LLM Loader (LLMDiff)", "LLMDiffAdapterLoader": "Adapter Loader (LLMDiff)",
            "LLMDiffTextEncode": "Text Encode (LLMDiff)", "LLMDiffApply": "Apply LLMDiff Adapter",
            "LLMDiffInspect": "Inspect LLMDiff Adapter", "PreviewAny": "Preview as Text"}.get(type_, type_)


def _stable_uuid(name: str) -> str:
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://github.com/comfyui-llmdiff/workflows/{name}"))


# ---- the workflows ------------------------------------------------------------------------------
POSITIVE = ("a watercolor painting of a red fox curled up asleep under a blossoming cherry tree, "
            "soft morning light, petals drifting in the air")
NEGATIVE = "blurry, low quality, watermark, text"


def _files_note(checkpoint: str, adapter: str, clip_line: str) -> str:
    return (
        "## Files\n"
        f"- **models/checkpoints/** `{checkpoint}`\n"
        f"- **models/LLM/** `{LLM_DIR}/` (a Hugging Face folder: config.json, tokenizer, *.safetensors)\n"
        f"- **models/llmdiff/** `{adapter}`\n\n"
        "The names above are the **demo stand-ins** (`./run.sh --demo`): random weights, they make "
        "**noise, not art**. For real images pick your own checkpoint, LLM folder and an adapter trained "
        "for exactly that base model + LLM in the three loaders.\n\n"
        f"{clip_line}")


def _txt2img(name: str, checkpoint: str, adapter: str, hybrid: bool, size: int, cfg: float,
             family_label: str) -> Graph:
    g = Graph(name)
    ckpt = g.add("CheckpointLoaderSimple", (40, 130), (360, 100), ckpt_name=checkpoint)
    llm = g.add("LLMDiffLLMLoader", (40, 280), (360, 176), model_dir=LLM_DIR, dtype="auto", device="default",
                trust_remote_code=False, after_encoding="offload")
    ad = g.add("LLMDiffAdapterLoader", (40, 500), (360, 82), adapter_name=adapter, dtype="auto")
    apply = g.add("LLMDiffApply", (40, 632), (360, 130), strength=1.0, start_percent=0.0, end_percent=1.0)
    g.connect(ckpt, 0, apply, "model")
    g.connect(ad, 0, apply, "adapter")
    pos = g.add("LLMDiffTextEncode", (470, 130), (420, 260), title="Positive prompt (LLMDiff)", text=POSITIVE,
                max_tokens=128, overflow="error", prompt_per_line=False)
    neg = g.add("LLMDiffTextEncode", (470, 430), (420, 220), title="Negative prompt (LLMDiff)", text=NEGATIVE,
                max_tokens=128, overflow="error", prompt_per_line=False)
    for enc in (pos, neg):
        g.connect(llm, 0, enc, "llm")
        if hybrid:
            g.connect(ckpt, 1, enc, "clip")
    latent = g.add("EmptyLatentImage", (470, 690), (420, 110), width=size, height=size, batch_size=1)
    ks = g.add("KSampler", (960, 130), (320, 290), seed=42, steps=20, cfg=cfg, sampler_name="euler",
               scheduler="normal", denoise=1.0)
    g.connect(apply, 0, ks, "model")
    g.connect(pos, 0, ks, "positive")
    g.connect(neg, 0, ks, "negative")
    g.connect(latent, 0, ks, "latent_image")
    dec = g.add("VAEDecode", (960, 480), (320, 50))
    g.connect(ks, 0, dec, "samples")
    g.connect(ckpt, 2, dec, "vae")
    save = g.add("SaveImage", (1340, 130), (480, 560), filename_prefix=f"llmdiff/{name}")
    g.connect(dec, 0, save, "images")
    mode = ("**Hybrid mode** (original path reads CLIP): CLIP feeds both Text Encode nodes; LoRA trigger "
            "words keep working." if hybrid else
            "**Paper mode** (original path reads the LLM): CLIP is not used; a `clip` input left empty is right. "
            "The adapter replaces CLIP's context" + (" and its pooled vector." if family_label == "SDXL" else "."))
    g.notes.append(("Where the files go", _files_note(checkpoint, adapter, mode), (960, 600), (340, 340)))
    g.groups += [
        (f"1. Models ({family_label})", "models", (20, 60, 400, 710)),
        ("2. Prompts (LLM + CLIP)" if hybrid else "2. Prompts (LLM)", "prompts", (450, 60, 460, 760)),
        ("3. Sample", "sampling", (940, 60, 360, 490)),
        ("4. Result", "output", (1320, 60, 520, 650)),
    ]
    return g


def _inspect() -> Graph:
    g = Graph("inspect_adapter")
    ad = g.add("LLMDiffAdapterLoader", (40, 130), (380, 82), adapter_name=SD15_PAPER, dtype="auto")
    ins = g.add("LLMDiffInspect", (40, 250), (380, 110), width=1024, height=768)
    g.connect(ad, 0, ins, "adapter")
    prev = g.add("PreviewImage", (480, 130), (760, 620))
    g.connect(ins, 0, prev, "images")
    text = g.add("PreviewAny", (1300, 130), (420, 360), title="What the adapter needs")
    g.connect(ins, 1, text, "source")
    g.notes.append(("About this workflow",
        "## Inspect an adapter\n"
        "Plots the adapter's fusion weights per U-Net cross-attention layer (w_orig, w_new: the paper's "
        "Figure 5) and its score weights g_l per LLM block, and says what it needs in a graph: its base model, "
        "its LLM, its mode, the CLIP layer and prompt length it was trained with.\n\n"
        f"Put adapters in **models/llmdiff/**. `{SD15_PAPER}` is a demo stand-in (`./run.sh --demo`): "
        "its weights are made up.", (40, 420), (380, 260)))
    g.groups += [("Adapter", "models", (20, 60, 420, 320)), ("Fusion weights", "output", (460, 60, 800, 710)),
                 ("Notes", "output", (1280, 60, 460, 450))]
    g.view = (0.9, (90, 60))
    return g


def all_workflows() -> list[Graph]:
    return [
        _txt2img("sd15_llmdiff_paper", SD15_CKPT, SD15_PAPER, hybrid=False, size=512, cfg=7.0, family_label="SD1.5"),
        _txt2img("sd15_llmdiff_hybrid", SD15_CKPT, SD15_HYBRID, hybrid=True, size=512, cfg=7.0, family_label="SD1.5"),
        _txt2img("sdxl_llmdiff_paper", SDXL_CKPT, SDXL_PAPER, hybrid=False, size=1024, cfg=6.0, family_label="SDXL"),
        _inspect(),
    ]


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def outputs() -> dict[Path, str]:
    files: dict[Path, str] = {}
    for g in all_workflows():
        files[HERE / f"{g.name}.json"] = render(g.editor())
        files[API_DIR / f"{g.name}.json"] = render(g.api())
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file would change")
    ns = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path)
        if not ns.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'differs' if ns.check else 'wrote'}: {path.relative_to(HERE.parent)}")
    return 1 if (ns.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
