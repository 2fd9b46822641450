"""The order in which each training process sees the dataset's samples, and their decoding.

The entries come from sources.py. Order: a seeded permutation per epoch (indexed sources), or shard order +
a streaming shuffle buffer (tar). Process r of W takes every W-th entry of the global order, so one process
with batch 4 and two with batch 2 see the same samples in each step; tar sets with at least W shards are split
by shard instead (no process reads another's shards). Broken entries (unreadable image, missing caption, bad
manifest line) are skipped and counted, never a crash.

Resume: a position is (epoch, entries of this process's stream consumed), plus, with aspect-ratio buckets, the
entries read but still waiting for their bucket's batch to fill. The order is a pure function of (seed, epoch,
rank, world size), so a stream restarted at a position continues exactly: from the earliest waiting entry, with
the entries between that were trained on already passed over undecoded (AlreadyTrained).
Data-loader workers take every n-th entry of the same stream and yield one item (or a skip marker)
per entry, so the DataLoader's round-robin gives back the stream order for any number of workers.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .buckets import Size, nearest_bucket
from .imaging import BadImage, decode, prepare
from .sources import DatasetError, IndexedSource, RawEntry, Source

@dataclass
class Item:
    """A decoded sample (or, with `problem` set, a skipped one) as the training loop receives it."""

    key: str
    index: int
    epoch: int
    position: int  # entries of this process's stream consumed after this one (the resume position)
    caption: str = ""
    pixels: torch.Tensor | None = None  # [H, W, 3] 0..1
    original_size: tuple[int, int] = (0, 0)
    crop_top_left: tuple[int, int] = (0, 0)
    problem: str | None = None

    @property
    def bucket(self) -> Size:
        """What batches it with others: its pixel size (one size without aspect-ratio buckets)."""
        assert self.pixels is not None
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


@dataclass(frozen=True)
class AlreadyTrained:
    """An entry a resumed stream reads again only on its way to entries still waiting for their bucket's batch:
    it was trained on (or skipped and counted) before the checkpoint, so it is passed over, undecoded."""

    epoch: int
    position: int


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """Per-sample seed from the content key: the noise, timestep and caption dropout of a sample are
    the same whatever process, batch or data format it arrives through."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


# --- order -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamSpec:
    """Everything the per-process order depends on."""

    seed: int
    shuffle: bool
    rank: int = 0
    world: int = 1
    shuffle_buffer: int = 1000
    resolution: int = 512
    crop: str = "center"
    epochs: int | None = None  # None = endless; 1 = one pass (the cache pre-pass)
    buckets: tuple[Size, ...] = ()  # aspect-ratio buckets (buckets.bucket_sizes); () = square crops


def _stable_seed(*parts: Any) -> int:
    """A seed from values, the same in every process (unlike hash(), which is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(_stable_seed(seed, epoch, "order"))
    return torch.randperm(n, generator=g).tolist()


def _buffer_shuffle(entries: Iterator[RawEntry], size: int, rng: random.Random) -> Iterator[RawEntry]:
    buf: list[RawEntry] = []
    for e in entries:
        if len(buf) < size:
            buf.append(e)
            continue
        j = rng.randrange(len(buf))
        buf[j], e = e, buf[j]
        yield e
    rng.shuffle(buf)
    yield from buf


def epoch_entries(source: Source, spec: StreamSpec, epoch: int) -> Iterator[RawEntry]:
    """This process's raw entries of one epoch, in order (lazy: nothing is decoded)."""
    r, w = spec.rank, spec.world
    if isinstance(source, IndexedSource):
        order = _permutation(len(source), spec.seed, epoch) if spec.shuffle else list(range(len(source)))
        return (source.entry(i) for i in order[r::w])
    shards = list(source.shards)
    if spec.shuffle:
        shards = [shards[i] for i in _permutation(len(shards), spec.seed, epoch)]
    split_by_shard = w > 1 and len(shards) >= w
    mine = shards[r::w] if split_by_shard else shards
    stream: Iterator[RawEntry] = itertools.chain.from_iterable(source.iter_shard(s) for s in mine)
    if spec.shuffle and spec.shuffle_buffer > 1:
        salt = r if split_by_shard else -1
        stream = _buffer_shuffle(stream, spec.shuffle_buffer, random.Random(_stable_seed(spec.seed, epoch, salt, "buffer")))
    return stream if split_by_shard or w == 1 else itertools.islice(stream, r, None, w)


@dataclass
class Position:
    epoch: int = 0
    consumed: int = 0  # entries of this process's stream already used in `epoch`
    # (epoch, position) of the entries read before this point but not yet trained on: waiting in a bucket
    waiting: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"epoch": self.epoch, "consumed": self.consumed}
        if self.waiting:
            d["waiting"] = [list(w) for w in self.waiting]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Position:
        return cls(int(d.get("epoch", 0)), int(d.get("consumed", 0)),
                   tuple((int(e), int(p)) for e, p in d.get("waiting", [])))

    def restart(self) -> tuple[int, int]:
        """(epoch, entries to pass over in it) where the stream must start again: before the earliest entry
        still waiting, else here."""
        if not self.waiting:
            return self.epoch, self.consumed
        epoch, position = min(self.waiting)
        return epoch, position - 1


def decode_entry(entry: RawEntry, spec: StreamSpec, epoch: int, position: int) -> Item:
    item = Item(key=entry.key, index=entry.index, epoch=epoch, position=position)
    if entry.problem is not None or entry.load is None:
        item.problem = entry.problem or "unusable entry"
        return item
    try:
        img = decode(entry.load())
        size = nearest_bucket(img.height, img.width, spec.buckets) if spec.buckets else spec.resolution
        prepared = prepare(img, size, spec.crop, random.Random(sample_seed(spec.seed, epoch, entry.key)))
    except BadImage as e:
        item.problem = f"unreadable image: {e}"
        return item
    except OSError as e:
        item.problem = f"image file unreadable: {e.strerror or e}"
        return item
    caption = entry.caption
    if isinstance(caption, tuple):  # the same draw for a sample and epoch, whatever process or worker reads it
        caption = random.Random(sample_seed(spec.seed, epoch, entry.key + "/caption")).choice(caption)
    item.caption = caption or ""
    item.pixels = prepared.pixels
    item.original_size = prepared.original_size
    item.crop_top_left = prepared.crop_top_left
    return item


def iterate(source: Source, spec: StreamSpec, start: Position, worker: int = 0, num_workers: int = 1,
            decode_fn: Callable[[RawEntry, StreamSpec, int, int], Any] = decode_entry) -> Iterator[Any]:
    """Items of this process's stream from `start`; worker w of n yields entries j = w mod n."""
    epoch, skip = start.restart()
    waiting = set(start.waiting)
    ordinal = 0  # counts across epochs: the DataLoader's round-robin over workers does not restart
    while spec.epochs is None or epoch < spec.epochs:
        entries = epoch_entries(source, spec, epoch)
        count = 0
        for j, entry in enumerate(itertools.islice(entries, skip, None)):
            count += 1
            ordinal += 1
            if (ordinal - 1) % num_workers == worker:
                position = skip + j + 1
                if (epoch, position) <= (start.epoch, start.consumed) and (epoch, position) not in waiting:
                    yield AlreadyTrained(epoch, position)
                else:
                    yield decode_fn(entry, spec, epoch, position)
        if count == 0 and skip == 0:
            raise DatasetError("this process's share of the dataset is empty (fewer samples than processes?)")
        epoch, skip = epoch + 1, 0


class SampleStream(torch.utils.data.IterableDataset):
    """The stream as a torch IterableDataset (batch_size=None DataLoader: one Item per entry)."""

    def __init__(self, source: Source, spec: StreamSpec, start: Position,
                 decode_fn: Callable[[RawEntry, StreamSpec, int, int], Any] = decode_entry) -> None:
        super().__init__()
        self.source, self.spec, self.start, self.decode_fn = source, spec, start, decode_fn

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, n = (info.id, info.num_workers) if info is not None else (0, 1)
        return iterate(self.source, self.spec, self.start, worker, n, self.decode_fn)


def loader(stream: SampleStream, num_workers: int) -> Iterator[Any]:
    if num_workers <= 0:
        return iter(stream)
    dl = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                     collate_fn=lambda x: x, persistent_workers=False,
                                     prefetch_factor=4, multiprocessing_context=_mp_context())
    return iter(dl)


def _mp_context() -> str | None:
    # fork is fastest and keeps the (already imported) ComfyUI modules; spawn elsewhere.
    import multiprocessing
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else None


@dataclass
class SkipCounter:
    """Counts skipped entries by reason; the first few keys are kept for the log."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, key: str, problem: str) -> None:
        reason = problem.split(":")[0]
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(f"{key}: {problem}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": list(self.examples)}

    def merge(self, d: dict[str, Any]) -> None:
        for k, v in d.get("counts", {}).items():
            self.counts[k] = self.counts.get(k, 0) + int(v)
        self.examples.extend(d.get("examples", [])[: max(0, 20 - len(self.examples))])
