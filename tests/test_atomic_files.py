"""atomic_files: a file or folder appears whole or not at all, with the usual mode, synced when durable."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from llmdiff_core.atomic_files import replacing, write_json, write_text


def _folder_write(tmp: Path, target: Path, fail: bool = False) -> None:
    tmp.unlink()
    tmp.mkdir()
    (tmp / "a.txt").write_text("new a")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.txt").write_text("new b")
    if fail:
        raise OSError("No space left on device")
    if target.exists():  # (as save_checkpoint does: a rename does not replace a full folder)
        shutil.rmtree(target)


def test_a_folder_replaces_the_old_one_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "a.txt").write_text("old a")
    with pytest.raises(OSError, match="No space"), replacing(target) as tmp:
        _folder_write(tmp, target, fail=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"] and (target / "a.txt").read_text() == "old a"
    with replacing(target) as tmp:
        _folder_write(tmp, target)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert (target / "a.txt").read_text() == "new a" and (target / "sub" / "b.txt").read_text() == "new b"


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_files_get_the_mode_of_a_plainly_created_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    write_json(tmp_path / "index.json", {"a": 1})
    with replacing(tmp_path / "folder") as tmp:
        _folder_write(tmp, tmp_path / "folder")
        (tmp / "private").touch(mode=0o600)
    for f in [tmp_path / "index.json", *(p for p in (tmp_path / "folder").rglob("*") if p.is_file())]:
        assert f.stat().st_mode == plain.stat().st_mode, f


def test_durable_writes_sync_every_file_before_the_rename_and_the_folder_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    with replacing(tmp_path / "ckpt", durable=True) as tmp:
        _folder_write(tmp, tmp_path / "ckpt")
    synced_parent = ["fsync"] if os.name == "posix" else []
    assert events == ["fsync", "fsync"] + synced_parent + ["replace"] + synced_parent  # 2 files, the folder
    events.clear()
    write_text(tmp_path / "latest", "step-1\n")  # not durable: no fsync
    assert events == ["replace"] and (tmp_path / "latest").read_text() == "step-1\n"
