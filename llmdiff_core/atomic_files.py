"""Files written whole or not at all: adapters, training checkpoints, the feature cache, the demo models.

The data goes under a hidden temporary name in the target's own folder, so the final os.replace stays on one
file system and is atomic: a reader (ComfyUI, a resumed run) sees the old version or the new one, and a crash
or an error leaves at most a `.NAME.<random>.tmp` (removed on errors), never a half-written NAME.

The result has the mode a plainly created file would have. mkstemp and safetensors make 0600 files, which a
ComfyUI running as another user cannot read; the mode is read off the temporary file, created with 0666 under
the umask, rather than by setting the process-wide umask to read it (a race with other threads).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch


@contextmanager
def replacing(path: Path, durable: bool = False) -> Iterator[Path]:
    """A temporary path next to `path` for the block to write; when the block ends without an error, what it
    wrote becomes `path` in one rename, else it is removed.

    The temporary is an empty file; a block that writes a folder removes it and makes a folder there (an
    existing folder at `path` must be gone by the end of the block: a rename does not replace a full folder).
    durable: fsync what was written and, after the rename, the folder: the new version survives a power cut
    (adapters, checkpoints and the cache a resumed run continues from). Demo models that are rebuilt skip it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # O_EXCL: never someone else's file
    mode = tmp.stat().st_mode & 0o777
    try:
        yield tmp
        for f in _files(tmp):
            f.chmod(mode)
            if durable:
                _fsync(f)
        if durable and tmp.is_dir():
            fsync_dir(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_text(path: Path, text: str, durable: bool = False) -> None:
    with replacing(path, durable) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any, durable: bool = False) -> None:
    write_text(path, json.dumps(data, indent=1, sort_keys=True), durable)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      durable: bool = False) -> None:
    import safetensors.torch

    with replacing(path, durable) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)


def fsync_dir(folder: Path) -> None:
    """Make the renames in a folder durable (POSIX only: Windows cannot open a folder for fsync)."""
    if os.name == "posix":
        _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR)  # (Windows commits writable files only)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(tmp: Path) -> list[Path]:
    return [f for f in tmp.rglob("*") if f.is_file()] if tmp.is_dir() else [tmp]
