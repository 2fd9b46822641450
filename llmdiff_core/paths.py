"""Where the pack finds its models: ComfyUI model folders "LLM" and "llmdiff".

- models/LLM/<folder>/          Hugging Face model folders (config.json, tokenizer, *.safetensors).
                                A lowercase "llm" entry from a user's extra_model_paths.yaml is
                                searched too (folder names are case-sensitive keys in ComfyUI).
- models/llmdiff/*.safetensors  adapter files; nothing else is listed or loaded.

extra_model_paths.yaml and --extra-model-paths-config are applied *before* packs import, so the
registration below reuses an existing entry's path list and only appends our default folder;
assigning a fresh tuple would silently drop the user's configured paths (comfyui-internals §2).
`folder_paths` is imported lazily so this module imports outside ComfyUI (tests, training).
"""

from __future__ import annotations

import os
from typing import Any

from .errors import LLMDiffError

LLM_FOLDER = "LLM"
LLM_FOLDER_ALIASES = ("llm",)  # also searched when a user's yaml names it so
ADAPTER_FOLDER = "llmdiff"
ADAPTER_EXTENSIONS = {".safetensors"}  # pickle-free formats only
HF_MARKER = "config.json"
_MAX_WALK_DEPTH = 6  # enough for a Hugging Face cache layout (models--org--name/snapshots/<hash>/)


def _folder_paths() -> Any:
    import folder_paths  # ComfyUI's module; only importable inside a ComfyUI process

    return folder_paths


def _ensure(name: str, default_dir: str, extensions: set[str] | None) -> None:
    """Add `default_dir` to folder `name`, keeping every path already registered for it.

    extensions=None keeps the entry's existing extension set (a new entry gets the empty set,
    which ComfyUI reads as "all files").
    """
    fp = _folder_paths()
    paths, exts = fp.folder_names_and_paths.get(name, ([], set()))
    paths = list(paths)
    if os.path.normpath(default_dir) not in (os.path.normpath(p) for p in paths):
        paths.append(default_dir)
    fp.folder_names_and_paths[name] = (paths, set(extensions) if extensions is not None else set(exts))


def register_model_folders() -> None:
    """Register models/LLM and models/llmdiff with ComfyUI. Idempotent; keeps yaml-configured paths."""
    fp = _folder_paths()
    _ensure(LLM_FOLDER, os.path.join(fp.models_dir, LLM_FOLDER), None)
    _ensure(ADAPTER_FOLDER, os.path.join(fp.models_dir, ADAPTER_FOLDER), ADAPTER_EXTENSIONS)


def _dedupe(paths: list[str]) -> list[str]:
    """Drop repeats, including the same directory reached by two spellings (case-insensitive disks)."""
    seen: set[Any] = set()
    out: list[str] = []
    for p in paths:
        try:
            st = os.stat(p)
            key: Any = (st.st_dev, st.st_ino)
        except OSError:
            key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def llm_roots() -> list[str]:
    """Every directory searched for LLM folders, in priority order ("LLM" first, then "llm")."""
    register_model_folders()
    fp = _folder_paths()
    roots: list[str] = []
    for name in (LLM_FOLDER, *LLM_FOLDER_ALIASES):
        if name in fp.folder_names_and_paths:
            roots.extend(fp.folder_names_and_paths[name][0])
    return _dedupe(roots)


def adapter_roots() -> list[str]:
    register_model_folders()
    return list(_folder_paths().folder_names_and_paths[ADAPTER_FOLDER][0])


def _walk_hf_folders(root: str) -> list[str]:
    """Relative paths (with '/') of folders under root holding config.json; does not descend into them."""
    found: list[str] = []
    visited: set[str] = set()

    def visit(directory: str, rel: str, depth: int) -> None:
        real = os.path.realpath(directory)
        if real in visited or depth > _MAX_WALK_DEPTH:  # symlink loops, runaway trees
            return
        visited.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir():  # skips .git, .cache (follows links)
                continue
            child_rel = f"{rel}/{entry.name}" if rel else entry.name
            if os.path.isfile(os.path.join(entry.path, HF_MARKER)):
                found.append(child_rel)
            else:
                visit(entry.path, child_rel, depth + 1)

    if os.path.isdir(root):
        visit(root, "", 1)
    return found


def list_llm_folders() -> list[str]:
    """Names (relative to their root, '/'-separated, sorted) of every Hugging Face folder found."""
    names: set[str] = set()
    for root in llm_roots():
        names.update(_walk_hf_folders(root))
    return sorted(names)


def _safe_relative(name: str, kind: str) -> str:
    """Reject absolute names and '..' so a widget value cannot point outside the model folders."""
    norm = os.path.normpath(name.replace("\\", "/"))
    if not name or os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
        raise LLMDiffError(f"Invalid {kind} name {name!r}: give a path relative to the model folder.")
    return norm


def llm_folder_path(name: str) -> str:
    """Absolute path of the LLM folder `name` (first root that has it), or an LLMDiffError saying where we looked."""
    rel = _safe_relative(name, "LLM folder")
    roots = llm_roots()
    without_config: list[str] = []
    for root in roots:
        candidate = os.path.join(root, rel)
        if os.path.isfile(os.path.join(candidate, HF_MARKER)):
            return candidate
        if os.path.isdir(candidate):
            without_config.append(candidate)
    if without_config:
        raise LLMDiffError(
            f"LLM folder {name!r} has no {HF_MARKER}: {', '.join(without_config)}. Put the whole Hugging Face "
            f"model folder there (config.json, tokenizer files, *.safetensors).")
    raise LLMDiffError(
        f"LLM folder {name!r} not found. Looked in: {', '.join(roots) or '(no LLM folders registered)'}. "
        f"Place a Hugging Face model folder (with {HF_MARKER}) under models/{LLM_FOLDER}/ and refresh.")


def list_adapters() -> list[str]:
    """Adapter files (.safetensors) under every registered llmdiff folder, as ComfyUI lists them."""
    register_model_folders()
    return _folder_paths().get_filename_list(ADAPTER_FOLDER)


def adapter_path(name: str) -> str:
    """Absolute path of adapter file `name`, or an LLMDiffError saying where we looked."""
    rel = _safe_relative(name, "adapter")
    if os.path.splitext(rel)[1].lower() not in ADAPTER_EXTENSIONS:
        raise LLMDiffError(f"Adapter {name!r} is not a .safetensors file; only .safetensors adapters are loaded.")
    register_model_folders()
    path = _folder_paths().get_full_path(ADAPTER_FOLDER, rel)
    if path is None:
        raise LLMDiffError(
            f"Adapter {name!r} not found. Looked in: {', '.join(adapter_roots())}. "
            f"Put adapter .safetensors files under models/{ADAPTER_FOLDER}/ and refresh.")
    return path
