"""Packaging and install surface: model folders, pyproject/requirements, README commands, CI entry."""

from __future__ import annotations

import copy
import os
import re
import stat
import subprocess
import tomllib
from pathlib import Path

import folder_paths
import pytest
import utils.extra_config

from llmdiff_core import __version__, paths
from llmdiff_core.errors import LLMDiffError

REPO = Path(__file__).resolve().parents[1]


# ---- model folders -------------------------------------------------------------------------------
@pytest.fixture
def fresh_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of ComfyUI's folder registry with models_dir under tmp_path."""
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", copy.deepcopy(folder_paths.folder_names_and_paths))
    for name in ("LLM", "llm", "llmdiff"):
        folder_paths.folder_names_and_paths.pop(name, None)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    return tmp_path


def _load_yaml(tmp: Path, entries: dict[str, Path]) -> None:
    yaml = tmp / "extra_model_paths.yaml"
    yaml.write_text("mine:\n" + "".join(f"  {k}: {v}\n" for k, v in entries.items()))
    utils.extra_config.load_extra_path_config(str(yaml))


def test_registration_keeps_yaml_paths_and_is_idempotent(fresh_folders: Path) -> None:
    tmp = fresh_folders
    _load_yaml(tmp, {"LLM": tmp / "y_llm", "llmdiff": tmp / "y_adapters", "llm": tmp / "y_lower"})
    for _ in range(3):
        paths.register_model_folders()
    fnp = folder_paths.folder_names_and_paths
    assert fnp["LLM"][0] == [str(tmp / "y_llm"), str(tmp / "models" / "LLM")]
    assert fnp["llmdiff"][0] == [str(tmp / "y_adapters"), str(tmp / "models" / "llmdiff")]
    assert fnp["llmdiff"][1] == {".safetensors"}
    assert fnp["llm"][0] == [str(tmp / "y_lower")]  # a user's entry is read, never rewritten
    assert paths.llm_roots() == [str(tmp / "y_llm"), str(tmp / "models" / "LLM"), str(tmp / "y_lower")]


def test_registration_without_yaml(fresh_folders: Path) -> None:
    paths.register_model_folders()
    paths.register_model_folders()
    assert folder_paths.get_folder_paths("LLM") == [str(fresh_folders / "models" / "LLM")]
    assert folder_paths.get_folder_paths("llmdiff") == [str(fresh_folders / "models" / "llmdiff")]


def _hf_folder(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")


def test_llm_folders_are_listed_and_resolved(fresh_folders: Path) -> None:
    tmp = fresh_folders
    _load_yaml(tmp, {"llm": tmp / "lower"})
    default = tmp / "models" / "LLM"
    _hf_folder(default / "tiny-llama")
    _hf_folder(default / "Qwen" / "Qwen2.5-0.5B")
    _hf_folder(default / "tiny-llama" / "text_encoder")  # inside a model folder: not a separate entry
    (default / "empty-dir").mkdir()
    _hf_folder(default / ".cache" / "hidden")
    _hf_folder(tmp / "lower" / "gemma-tiny")

    assert paths.list_llm_folders() == ["Qwen/Qwen2.5-0.5B", "gemma-tiny", "tiny-llama"]
    assert paths.llm_folder_path("Qwen/Qwen2.5-0.5B") == str(default / "Qwen" / "Qwen2.5-0.5B")
    assert paths.llm_folder_path("gemma-tiny") == str(tmp / "lower" / "gemma-tiny")

    with pytest.raises(LLMDiffError, match="not found") as err:
        paths.llm_folder_path("missing")
    assert str(default) in str(err.value) and str(tmp / "lower") in str(err.value)  # says where it looked
    with pytest.raises(LLMDiffError, match="no config.json"):
        paths.llm_folder_path("empty-dir")
    with pytest.raises(LLMDiffError, match="Invalid"):
        paths.llm_folder_path("../outside")


def test_adapters_are_safetensors_only(fresh_folders: Path) -> None:
    paths.register_model_folders()
    root = fresh_folders / "models" / "llmdiff"
    (root / "sub").mkdir(parents=True)
    for name in ("a.safetensors", "b.ckpt", "sub/c.safetensors", "notes.txt"):
        (root / name).write_bytes(b"x")
    assert paths.list_adapters() == ["a.safetensors", "sub/c.safetensors"]
    assert paths.adapter_path("sub/c.safetensors") == str(root / "sub" / "c.safetensors")
    with pytest.raises(LLMDiffError, match="only .safetensors"):
        paths.adapter_path("b.ckpt")
    with pytest.raises(LLMDiffError, match=re.escape(str(root))):
        paths.adapter_path("missing.safetensors")


# ---- pyproject / requirements / license ----------------------------------------------------------
def _requirements() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


def test_pyproject_is_registry_ready() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    project, comfy = data["project"], data["tool"]["comfy"]
    assert project["name"] == "llmdiff" and "comfyui" not in project["name"].lower()
    assert project["version"] == __version__
    assert project["license"] == {"text": "GPL-3.0-or-later"}
    assert project["dependencies"] == _requirements()
    assert comfy["PublisherId"] and comfy["DisplayName"] and "Icon" in comfy
    assert "Repository" in project["urls"]


def test_requirements_leave_torch_and_comfyui_to_the_host() -> None:
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in _requirements()}
    assert not names & {"torch", "torchvision", "torchaudio", "comfyui", "matplotlib"}
    assert all(re.search(r">=", r) for r in _requirements()), "lower bounds only"


def test_comfyui_reads_our_pyproject(comfy_root: Path) -> None:
    config_parser = pytest.importorskip("comfy_config.config_parser")  # ComfyUI >= 0.3.4x
    cfg = config_parser.extract_node_configuration(str(REPO))
    assert cfg.project.name == "llmdiff"
    assert cfg.project.supported_comfyui_version.startswith(">=")
    assert cfg.tool_comfy.publisher_id


def test_license_is_gpl3() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("GNU GENERAL PUBLIC LICENSE") and "Version 3, 29 June 2007" in text


# ---- README commands and CI entry ----------------------------------------------------------------
def _readme_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"^```[a-z]*\n(.*?)^```", readme, re.S | re.M)
    assert block, "README has no code block"
    assert readme.index(block.group(0)) < readme.index("\n## "), "the commands come before any section"
    return [ln.strip() for ln in block.group(1).splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_readme_starts_with_the_two_commands() -> None:
    assert (REPO / "README.md").read_text().startswith("# ")
    run_cmd, test_cmd = _readme_commands()
    assert run_cmd.split()[0] == "./run.sh"
    assert test_cmd.split()[0] == "./test.sh"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in ci
    commands = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert commands[-1] in (_readme_commands()[1], "exec " + _readme_commands()[1])


@pytest.mark.parametrize("script", ["run.sh", "test.sh", ".ci/run", "scripts/install_chromium.sh",
                                    "scripts/setup_env.sh", "bench/run_all.sh", "bench/prepare_device.sh",
                                    "bench/device_run.sh", "scripts/coverage.sh"])
def test_scripts_are_executable_bash(script: str) -> None:
    path = REPO / script
    assert path.stat().st_mode & stat.S_IXUSR, f"{script} is not executable (git update-index --chmod=+x)"
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_run_sh_help_and_bad_args() -> None:
    env = dict(os.environ, LLMDIFF_COMFYUI_ROOT="/nonexistent")
    ok = subprocess.run([str(REPO / "run.sh"), "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "--demo" in ok.stdout
    bad = subprocess.run([str(REPO / "run.sh"), "--port", "x"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "bad port" in bad.stderr
