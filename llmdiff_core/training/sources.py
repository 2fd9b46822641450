"""Where training samples come from: the dataset formats, read into entries (nothing decoded yet).

Sources (all yield the same samples for the same content; keys are image paths without extension):
- folder:  images with a same-name .txt caption beside them (searched recursively);
- jsonl / csv manifest: one image path + caption per line / row;
- tar:     WebDataset-style shards (members grouped by key: 000123.jpg + 000123.txt or .json),
           streamed with the standard library's tarfile, never unpacked.

Broken entries (unreadable caption, bad manifest line, a cut-off shard) become entries with a `problem`:
skipped and counted by the stream (data.py), never a crash. A dataset that cannot be used at all raises
DatasetError, which names what is wrong.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import LLMDiffError
from .imaging import BadImage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_FIELDS = ("image", "file_name", "image_file", "path", "file")
CAPTION_FIELDS = ("caption", "text", "prompt")


class DatasetError(LLMDiffError):
    """The dataset as a whole cannot be used (nothing found, unknown format, a manifest that cannot be read)."""


@dataclass
class RawEntry:
    """One dataset entry before decoding. `problem` is set when it is known to be unusable."""

    key: str
    index: int  # position in the dataset's natural (unshuffled) order, -1 where unknown (tar)
    load: Callable[[], bytes] | None
    caption: str | tuple[str, ...] | None  # several: one is drawn per epoch (decode_entry)
    problem: str | None = None


def _read_file(path: str) -> Callable[[], bytes]:
    def load() -> bytes:
        with open(path, "rb") as fh:
            return fh.read()
    return load


def _key_of(path: str, root: str) -> str:
    """Image path relative to root, posix, without extension: the sample's identity."""
    rel = os.path.relpath(path, root) if root and os.path.isabs(path) == os.path.isabs(root) else path
    if rel.startswith(".."):
        rel = path
    return os.path.splitext(Path(rel).as_posix())[0]


def _pick(row: dict[str, Any], wanted: str, fallbacks: tuple[str, ...]) -> Any:
    for name in ((wanted,) if wanted else fallbacks):
        if name in row and row[name] not in (None, ""):
            return row[name]
    return None


# --- indexed sources ----------------------------------------------------------------------------

# (key, image path, caption | several | "\0file:<caption path>" | None, problem)
Entry = tuple[str, str | None, str | tuple[str, ...] | None, str | None]


class IndexedSource:
    """Random-access entries (folder, manifest)."""

    kind = "indexed"

    def __init__(self, entries: list[Entry]) -> None:
        # plain tuples (Entry): a million of them pickle quickly to data-loader workers
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def usable_captions(self) -> dict[str, str | tuple[str, ...] | None]:
        """key -> caption of every entry not known to be unusable; None for a caption still in its file (unread)."""
        return {key: None if isinstance(caption, str) and caption.startswith("\0file:") else caption
                for key, _, caption, problem in self._entries if problem is None}

    def entry(self, i: int) -> RawEntry:
        key, image, caption, problem = self._entries[i]
        if problem is not None:
            return RawEntry(key, i, None, None, problem)
        if isinstance(caption, str) and caption.startswith("\0file:"):
            path = caption[len("\0file:"):]
            try:
                with open(path, encoding="utf-8-sig") as fh:  # (-sig: Notepad's byte-order mark is no text)
                    caption = fh.read().strip()
            except (OSError, UnicodeDecodeError) as e:
                return RawEntry(key, i, None, None, f"caption file unreadable: {e}")
        if caption is None:
            return RawEntry(key, i, None, None, "missing caption")
        return RawEntry(key, i, _read_file(image), caption)


CAPTION_EXTENSIONS = (".txt", ".caption")  # (.caption: kohya's sd-scripts)


def folder_source(root: str) -> IndexedSource:
    """Images anywhere under root; caption = same path with .txt or .caption (missing -> skipped, counted)."""
    root = os.path.abspath(root)
    images = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                images.append(os.path.join(dirpath, name))
    images.sort(key=lambda p: Path(os.path.relpath(p, root)).as_posix())
    entries = []
    for path in images:
        stem = os.path.splitext(path)[0]
        text = next((stem + ext for ext in CAPTION_EXTENSIONS if os.path.exists(stem + ext)), None)
        caption = None if text is None else "\0file:" + text  # read lazily, in the worker
        entries.append((_key_of(path, root), path, caption, None))
    if entries and all(caption is None for _, _, caption, _ in entries):
        raise DatasetError(f"'{root}' has {len(entries)} images but not one caption: each image needs a same-name "
                           f"caption file beside it ({' or '.join(CAPTION_EXTENSIONS)}: cat.png + cat.txt)")
    return IndexedSource(entries)


def _refuse_if_nothing_is_usable(path: str, entries: list[Entry], fields: list[str]) -> None:
    """Fail at the start when not one line of a manifest can train, naming the fields it has: the usual cause is a
    field name (otherwise the run would skip every line, one by one, until it gives up)."""
    if not entries or any(problem is None for *_, problem in entries):
        return
    reasons = Counter(str(problem).split(":")[0] for *_, problem in entries)
    listed = ", ".join(f"{n} x {reason}" for reason, n in reasons.most_common())
    hint = ""
    for reason, flag, defaults in (("manifest line has no image path", "--image-column", IMAGE_FIELDS),
                                   ("missing caption", "--caption-column", CAPTION_FIELDS)):
        if reasons.get(reason) == len(entries):
            hint = (f" Its fields are {', '.join(fields[:20]) or 'none'}: name the one to use with {flag} (by default "
                    f"the first of {', '.join(defaults)})")
    raise DatasetError(f"not one line of '{path}' can be used ({listed}).{hint}")


def _caption_of(value: Any) -> str | tuple[str, ...] | None:
    """A manifest's or a shard's .json caption field: a text, or a list of texts (COCO-style: several captions of one
    image, one drawn per epoch) rather than the list's Python repr; None where no text is left."""
    if isinstance(value, (list, tuple)):
        texts = tuple(t.strip() for t in value if isinstance(t, str) and t.strip())
        return None if not texts else texts[0] if len(texts) == 1 else texts
    return None if value is None else str(value).strip()


def _manifest_entry(row: Any, n: int, image_root: str, image_column: str, caption_column: str) -> Entry:
    if not isinstance(row, dict):
        return (f"#line{n}", None, None, "manifest line is not an object")
    image = _pick(row, image_column, IMAGE_FIELDS)
    caption = _caption_of(_pick(row, caption_column, CAPTION_FIELDS))
    if image is None:
        return (f"#line{n}", None, None, "manifest line has no image path")
    image = str(image)
    path = image if os.path.isabs(image) else os.path.join(image_root, image)
    key = _key_of(image, image_root) if os.path.isabs(image) else os.path.splitext(Path(image).as_posix())[0]
    if caption is None:
        return (key, path, None, "missing caption")
    return (key, path, caption, None)


def _not_utf8(path: str, e: UnicodeDecodeError) -> DatasetError:
    return DatasetError(f"the manifest '{path}' is not UTF-8 text ({e.reason}: byte 0x{e.object[e.start]:02x}): "
                        "save it as UTF-8 (a spreadsheet's \"CSV UTF-8\")")


# Manifests are read as utf-8-sig: a byte-order mark (Excel's "CSV UTF-8", Notepad) would otherwise become part of
# the first column's name or make the first JSON line bad.
def jsonl_source(path: str, image_root: str = "", image_column: str = "", caption_column: str = "") -> IndexedSource:
    root = image_root or os.path.dirname(os.path.abspath(path))
    entries = []
    fields: dict[str, None] = {}  # (ordered, first seen first)
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    entries.append((f"#line{n}", None, None, f"bad JSON: {e.msg}"))
                    continue
                entries.append(_manifest_entry(row, n, root, image_column, caption_column))
                if isinstance(row, dict):
                    fields.update(dict.fromkeys(map(str, row)))
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    _refuse_if_nothing_is_usable(path, entries, list(fields))
    return IndexedSource(entries)


def csv_source(path: str, image_root: str = "", image_column: str = "", caption_column: str = "") -> IndexedSource:
    root = image_root or os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    except csv.Error as e:
        raise DatasetError(f"the manifest '{path}' is not a CSV file this can read: {e}") from None
    entries = [_manifest_entry(row, n, root, image_column, caption_column) for n, row in enumerate(rows, 2)]
    _refuse_if_nothing_is_usable(path, entries, list(reader.fieldnames or []))
    return IndexedSource(entries)


# --- tar shards ---------------------------------------------------------------------------------

def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: 'dir/000123.jpg' -> ('dir/000123', 'jpg'); the key ends at the first
    dot of the file name."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    a, b = m.group(1), m.group(2)
    width = len(a)
    out = []
    for i in range(int(a), int(b) + 1):
        out += _expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])
    return out


# what reading a cut-off or corrupt shard raises: tarfile's own errors, the OS's, and a compressed shard's decompressor
# (gzip raises EOFError at a cut, which is not an OSError)
_CUT_OR_BROKEN = (OSError, EOFError, tarfile.TarError)


def _ends_early(tf: tarfile.TarFile) -> bool:
    """An uncompressed shard whose last member is not followed by the two zero blocks that end a tar archive.
    tarfile stops without an error when a cut falls at or inside a member's header, so this is the only sign that
    the rest of the shard is missing. (A compressed shard's decompressor reports the cut itself.)"""
    if not isinstance(tf.fileobj, io.BufferedReader):
        return False
    try:
        size = os.fstat(tf.fileobj.fileno()).st_size
    except OSError:
        return False
    return size - tf.offset < 2 * tarfile.BLOCKSIZE


class TarSource:
    """WebDataset-style shards, read member by member (never extracted to disk)."""

    kind = "tar"

    def __init__(self, shards: list[str], caption_column: str = "") -> None:
        self.shards = shards
        self.caption_column = caption_column

    def iter_shard(self, shard: str) -> Iterator[RawEntry]:
        try:
            tf = tarfile.open(shard, mode="r:*")
        except _CUT_OR_BROKEN as e:
            yield RawEntry(f"{shard}#unreadable", -1, None, None, f"unreadable shard: {e}")
            return
        # Not closed here: entries read their image lazily (in the worker that decodes them, maybe
        # after the shuffle buffer held them past the shard's end); the file closes when unreferenced.
        group: list[tarfile.TarInfo] = []
        key = None
        try:
            for member in tf:
                if not member.isfile():
                    continue
                k, _ = _split_key(member.name)
                if key is not None and k != key:
                    yield self._entry(tf, key, group)
                    group = []
                key = k
                group.append(member)
        except _CUT_OR_BROKEN as e:  # truncated shard: keep what was read
            if group and key is not None:
                yield self._entry(tf, key, group)
            yield RawEntry(f"{shard}#truncated", -1, None, None, f"shard is damaged: {e or type(e).__name__}")
            return
        if group and key is not None:
            yield self._entry(tf, key, group)
        if _ends_early(tf):
            yield RawEntry(f"{shard}#truncated", -1, None, None, "shard is damaged: it ends without the end-of-archive "
                           "blocks, so entries after the last one read may be missing (an incomplete download?)")

    def _entry(self, tf: tarfile.TarFile, key: str, members: list[tarfile.TarInfo]) -> RawEntry:
        by_ext = {_split_key(m.name)[1]: m for m in members}
        image = next((by_ext[e.lstrip(".")] for e in IMAGE_EXTENSIONS if e.lstrip(".") in by_ext), None)
        if image is None:
            return RawEntry(key, -1, None, None, "no image in the shard entry")
        caption = None
        try:
            if "txt" in by_ext:
                caption = tf.extractfile(by_ext["txt"]).read().decode("utf-8-sig").strip()  # type: ignore[union-attr]
            elif "json" in by_ext:
                meta = json.loads(tf.extractfile(by_ext["json"]).read())  # type: ignore[union-attr]
                value = _pick(meta, self.caption_column, CAPTION_FIELDS) if isinstance(meta, dict) else None
                caption = _caption_of(value)
        except (*_CUT_OR_BROKEN, UnicodeDecodeError, json.JSONDecodeError) as e:
            return RawEntry(key, -1, None, None, f"caption unreadable: {e or type(e).__name__}")
        if caption is None:
            return RawEntry(key, -1, None, None, "missing caption")

        def load() -> bytes:
            try:
                fh = tf.extractfile(image)
                if fh is None:
                    raise BadImage("not a regular file")
                return fh.read()
            except (tarfile.TarError, EOFError) as e:  # (the shard ends inside this image)
                raise BadImage(f"cut off in its shard: {e or type(e).__name__}") from None
        return RawEntry(key, -1, load, caption)


def tar_source(path: str, caption_column: str = "") -> TarSource:
    if os.path.isdir(path):
        shards = sorted(glob.glob(os.path.join(path, "**", "*.tar"), recursive=True))
    else:
        shards = []
        for p in _expand_braces(path):
            shards += sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
    if not shards:
        raise DatasetError(f"no .tar shards found at '{path}'")
    return TarSource(shards, caption_column)


Source = IndexedSource | TarSource


def open_source(path: str, fmt: str = "auto", image_root: str = "", image_column: str = "",
                caption_column: str = "") -> Source:
    if not os.path.exists(path) and not any(c in path for c in "{*?["):  # (a shard pattern names no one file)
        raise DatasetError(f"dataset '{path}' does not exist")
    if fmt == "auto":
        low = path.lower()
        if low.endswith(".jsonl"):
            fmt = "jsonl"
        elif low.endswith(".csv"):
            fmt = "csv"
        elif low.endswith(".tar") or "{" in path or (os.path.isdir(path) and glob.glob(os.path.join(path, "*.tar"))):
            fmt = "tar"
        elif os.path.isdir(path):
            fmt = "folder"
        else:
            raise DatasetError(f"cannot tell the format of '{path}': give --data-format (folder, jsonl, csv, tar)")
    if fmt != "tar" and not os.path.exists(path):
        raise DatasetError(f"dataset '{path}' does not exist")
    if fmt == "folder":
        src: Source = folder_source(path)
    elif fmt == "jsonl":
        src = jsonl_source(path, image_root, image_column, caption_column)
    elif fmt == "csv":
        src = csv_source(path, image_root, image_column, caption_column)
    elif fmt == "tar":
        src = tar_source(path, caption_column)
    else:
        raise DatasetError(f"unknown dataset format '{fmt}'")
    if isinstance(src, IndexedSource) and len(src) == 0:
        raise DatasetError(f"no images found in '{path}'")
    return src
