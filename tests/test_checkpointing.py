"""Training checkpoints on disk: the last N kept, crash leftovers cleared, a failed write loses nothing, and
--resume finds the newest complete checkpoint (or says why a given folder is none)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmdiff_core.adapter_file import load_adapter
from llmdiff_core.errors import LLMDiffError
from llmdiff_core.training import checkpointing as ck
from tiny_unets import make_adapter, make_adapter_config, tiny_llm_spec, tiny_sd15_minimal


@pytest.fixture(scope="module")
def adapter():
    return make_adapter(make_adapter_config(tiny_sd15_minimal(), tiny_llm_spec()), seed=0, trained=True)


def _save(out: Path, step: int, adapter, keep: int = 0) -> Path:
    return ck.save_checkpoint(out, step, adapter, {"step": step, "rng": ck.rng_state()}, keep)


def _steps(out: Path) -> list[str]:
    return sorted(p.name for p in ck.checkpoints_dir(out).iterdir())


def test_the_last_n_are_kept_and_latest_names_the_newest(tmp_path: Path, adapter) -> None:
    for step in (10, 20, 30):
        _save(tmp_path, step, adapter, keep=2)
    assert _steps(tmp_path) == ["latest", "step-00000020", "step-00000030"]
    assert (ck.checkpoints_dir(tmp_path) / "latest").read_text() == "step-00000030\n"
    newest = ck.find_checkpoint(tmp_path, "latest")
    assert newest.name == "step-00000030" and ck.load_state(newest)["step"] == 30
    assert torch.equal(load_adapter(newest / ck.ADAPTER_FILE).a_new, adapter.a_new)
    for step in (40, 50):
        _save(tmp_path, step, adapter, keep=0)  # 0: keep every one
    assert len(_steps(tmp_path)) == 5


def test_crash_leftovers_go_and_a_step_written_again_replaces_its_folder(tmp_path: Path, adapter) -> None:
    _save(tmp_path, 10, adapter)
    root = ck.checkpoints_dir(tmp_path)
    (root / ".step-00000020.0123abcd.tmp").mkdir()  # a crash mid-write: the folder ...
    (root / ".step-00000020.0123abcd.tmp" / ck.STATE_FILE).write_bytes(b"half")
    (root / ".step-00000030.4567ef01.tmp").touch()  # ... or the empty file before it
    _save(tmp_path, 10, adapter)  # the same step again (resumed, then stopped at once)
    assert _steps(tmp_path) == ["latest", "step-00000010"]


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, adapter, monkeypatch) -> None:
    _save(tmp_path, 10, adapter)

    def disk_full(obj, f, *args, **kwargs) -> None:
        Path(f).write_bytes(b"\0" * 10)
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        _save(tmp_path, 20, adapter, keep=1)
    assert _steps(tmp_path) == ["latest", "step-00000010"]
    assert ck.find_checkpoint(tmp_path, "latest").name == "step-00000010"


def test_resume_finds_the_newest_complete_checkpoint_or_refuses_a_folder_that_is_none(tmp_path: Path,
                                                                                         adapter) -> None:
    assert ck.find_checkpoint(tmp_path, "") is None and ck.find_checkpoint(tmp_path, "latest") is None
    _save(tmp_path, 10, adapter)
    _save(tmp_path, 20, adapter)
    root = ck.checkpoints_dir(tmp_path)
    (root / "latest").unlink()  # an older layout, or the pointer lost: the newest folder with a state
    (root / "step-00000030").mkdir()  # incomplete: no state file
    assert ck.find_checkpoint(tmp_path, "latest").name == "step-00000020"
    (root / "latest").write_text("step-00000030\n")  # a pointer to an incomplete one is not followed
    assert ck.find_checkpoint(tmp_path, "latest").name == "step-00000020"
    assert ck.find_checkpoint(tmp_path, str(root / "step-00000010")) == root / "step-00000010"
    with pytest.raises(LLMDiffError, match="not a training checkpoint .*step-\\* folders"):
        ck.find_checkpoint(tmp_path, str(root / "step-00000030"))
