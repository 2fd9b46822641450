"""The feature cache: a resumable pre-pass that stores VAE latents and the adapter-independent LLM
(and CLIP) features in shards, so training epochs touch neither the VAE nor the LLM.

Layout of --cache-dir:
    cache.json                 what the cache was made from (refused if the run differs)
    index-rank<R>.json         per building process: its finished shards and stream position
    rank<R>-<NNNNN>.safetensors  shards: per sample <j>.latent, <j>.hidden, <j>.scores, <j>.mask,
                               [<j>.clip, <j>.pooled]; metadata holds keys, captions, sizes
    empty.safetensors          the empty prompt (caption dropout)

Only the LLM layers the encoding reads are stored (score: H_0 and the scores; last / mean /
layer:k: those hidden states), each trimmed to its real tokens: padding is zero and rebuilt on
load. Every file is written to a temporary name and renamed, so a killed pre-pass loses at most
the shard in progress and the next run continues from the last finished one.

Size: per sample about (stored layers) x (tokens) x (LLM width) x 2 bytes in bf16; e.g. Llama-3-8B
score encoding, 40-token captions: 33 x 40 x 4096 x 2 = 10.8 MB. Use it for sets that fit your disk.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import safetensors
import safetensors.torch
import torch

from ..atomic_files import write_json, write_safetensors
from ..config import AdapterConfig
from ..dtypes import DTYPES
from ..errors import LLMDiffError
from ..features import LLMFeatures, LLMSpec
from .buckets import LATENT_SCALE
from .data import Item, Position, SampleStream, SkipCounter, StreamSpec, loader
from .sources import IndexedSource, RawEntry
from .encoders import CompactFeatures, Conditioning, FrozenEncoders, pad, trim
from .stored_tensor import StoredTensor, read_all, stored_tensors

log = logging.getLogger("llmdiff.train")
# 2: captions reach the LLM without ComfyUI's weighting syntax, as the node's prompts do (1 gave them verbatim).
CACHE_VERSION = 2
CACHED_KINDS = ("latent", "hidden", "scores", "mask", "clip", "pooled")  # what a cache record may hold


@dataclass
class CacheSpec:
    """What a cache depends on; a run with other values must not read it."""

    fingerprint: dict[str, Any]
    llm: LLMSpec
    max_tokens: int
    layers: list[int]
    scores: bool
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"version": CACHE_VERSION, "fingerprint": self.fingerprint, "llm": self.llm.to_dict(),
                "max_tokens": self.max_tokens, "layers": self.layers, "scores": self.scores, "dtype": self.dtype}


def make_spec(config: AdapterConfig, fingerprint: dict[str, Any], dtype: str) -> CacheSpec:
    layers, scores = config.features_read()
    return CacheSpec(fingerprint=fingerprint, llm=config.llm, max_tokens=config.max_tokens, layers=layers,
                     scores=scores, dtype=dtype)


def check_format(cache_dir: Path) -> None:
    """Refuses a cache of another format (checked before any model loads, and again when the run opens it)."""
    path = cache_dir / "cache.json"
    if not path.exists():
        return
    version = json.loads(path.read_text(encoding="utf-8")).get("version")
    if version != CACHE_VERSION:
        raise LLMDiffError(f"the feature cache in '{cache_dir}' was made by another version of ComfyUI-LLMDiff "
                           f"(cache format {version}; this one reads {CACHE_VERSION}: since format 2 captions reach "
                           "the LLM as the nodes' prompts do, without ComfyUI's (word:1.2) weighting): build it "
                           "again in a new --cache-dir")


def check_or_create(cache_dir: Path, spec: CacheSpec, is_main: bool) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / "cache.json"
    want = spec.to_json()
    if path.exists():
        check_format(cache_dir)
        have = json.loads(path.read_text(encoding="utf-8"))
        if have != want:
            diff = sorted(k for k in set(have.get("fingerprint", {})) | set(want["fingerprint"])
                          if have.get("fingerprint", {}).get(k) != want["fingerprint"].get(k))
            other = sorted(k for k in want if k != "fingerprint" and have.get(k) != want[k])
            raise LLMDiffError(f"the feature cache in '{cache_dir}' was made with other settings "
                               f"({', '.join(dict.fromkeys(diff + other))} differ): use a new --cache-dir for this run")
    elif is_main:
        write_json(path, want, durable=True)


# --- building -----------------------------------------------------------------------------------

def _record(cond: Conditioning, i: int, spec: CacheSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    hidden, scores, mask = trim(cond.features, i)
    rec = {"latent": cond.latents[i].contiguous(), "mask": mask.contiguous()}
    rec["hidden"] = hidden[spec.layers].to(dtype).contiguous() if spec.layers else torch.zeros(0, dtype=dtype)
    rec["scores"] = scores.to(dtype).contiguous() if spec.scores else torch.zeros(0, dtype=dtype)
    if cond.clip is not None:
        rec["clip"] = cond.clip[i].contiguous()
    if cond.pooled is not None:
        rec["pooled"] = cond.pooled[i].contiguous()
    return rec


class _ShardWriter:
    def __init__(self, cache_dir: Path, rank: int, spec: CacheSpec, index: dict[str, Any]) -> None:
        self.dir, self.rank, self.spec, self.index = cache_dir, rank, spec, index
        self.dtype = DTYPES[spec.dtype]
        self.tensors: dict[str, torch.Tensor] = {}
        self.meta: list[dict[str, Any]] = []

    def add(self, cond: Conditioning, i: int, item: Item) -> None:
        j = len(self.meta)
        for name, t in _record(cond, i, self.spec, self.dtype).items():
            self.tensors[f"{j}.{name}"] = t
        h, w, top, left = cond.sizes[i]
        self.meta.append({"key": item.key, "index": item.index, "caption": item.caption, "size": [h, w, top, left]})

    def __len__(self) -> int:
        return len(self.meta)

    def flush(self, position: Position, skipped: SkipCounter) -> None:
        """Write the shard, then the index that names it and the position after it (in that order:
        a crash between the two leaves an unlisted shard that the next run overwrites)."""
        shards = self.index.setdefault("shards", [])
        if self.meta:
            name = f"rank{self.rank}-{len(shards):05d}.safetensors"
            write_safetensors(self.dir / name, self.tensors, {"samples": json.dumps(self.meta)}, durable=True)
            shards.append({"file": name, "count": len(self.meta)})
        self.index["position"] = position.to_dict()
        self.index["skipped"] = skipped.to_dict()
        write_json(self.dir / f"index-rank{self.rank}.json", self.index, durable=True)
        self.tensors, self.meta = {}, []


def build(cache_dir: Path, source: Any, stream_spec: StreamSpec, encoders: FrozenEncoders, spec: CacheSpec,
          batch_size: int, shard_size: int, num_workers: int, rank: int, progress: Any = None) -> SkipCounter:
    """Encode this process's share of the dataset into shards; continues a previous partial build."""
    index_path = cache_dir / f"index-rank{rank}.json"
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.exists() else {}
    if index.get("complete"):
        skipped = SkipCounter()
        skipped.merge(index.get("skipped", {}))
        return skipped
    index["world"] = stream_spec.world
    if index.get("shards") and index.get("world_built", stream_spec.world) != stream_spec.world:
        raise LLMDiffError(f"the feature cache in '{cache_dir}' was started with {index['world_built']} processes; "
                           f"finish it with the same number (or start a new --cache-dir)")
    index["world_built"] = stream_spec.world
    start = Position.from_dict(index.get("position", {}))
    skipped = SkipCounter()
    skipped.merge(index.get("skipped", {}))
    if rank == 0 and not (cache_dir / "empty.safetensors").exists():
        e_feat, e_clip, e_pooled = encoders.empty_prompt()
        empty = Conditioning([""], torch.zeros(1, 0), e_feat, e_clip, e_pooled, [(0, 0, 0, 0)])
        rec = _record(empty, 0, spec, DTYPES[spec.dtype])
        rec.pop("latent")
        write_safetensors(cache_dir / "empty.safetensors", rec, {}, durable=True)
    writer = _ShardWriter(cache_dir, rank, spec, index)
    pending: list[Item] = []

    def encode_pending() -> None:
        nonlocal pending
        if not pending:
            return
        rows: dict[int, tuple[Conditioning, int]] = {}  # pending index -> its row of an encoded batch
        for bucket in dict.fromkeys(it.bucket for it in pending):  # one batch per image size (aspect buckets)
            group = [i for i, it in enumerate(pending) if it.bucket == bucket]
            cond = encoders.encode([pending[i].key for i in group], torch.stack([pending[i].pixels for i in group]),
                                   [pending[i].caption for i in group],
                                   [(*pending[i].original_size, *pending[i].crop_top_left) for i in group])
            rows.update({i: (cond, row) for row, i in enumerate(group)})
        for i, it in enumerate(pending):
            writer.add(*rows[i], it)
            if len(writer) >= shard_size:  # resume point: right after this sample
                writer.flush(Position(it.epoch, it.position), skipped)
        pending = []

    for item in loader(SampleStream(source, stream_spec, start), num_workers):
        if item.problem is not None:
            skipped.add(item.key, item.problem)
        else:
            pending.append(item)
            if progress is not None:
                progress(1)
        if len(pending) >= batch_size:
            encode_pending()
    encode_pending()
    writer.flush(Position(1, 0), skipped)
    index["complete"] = True
    write_json(index_path, index, durable=True)
    return skipped


def is_complete(cache_dir: Path, world: int) -> bool:
    """Finished by `world` processes; a cache finished by another number of processes counts too."""
    indexes = list(cache_dir.glob("index-rank*.json"))
    if indexes:
        built = json.loads(indexes[0].read_text(encoding="utf-8")).get("world_built", world)
        world = int(built)
    return all((cache_dir / f"index-rank{r}.json").exists()
               and json.loads((cache_dir / f"index-rank{r}.json").read_text(encoding="utf-8")).get("complete")
               for r in range(world))


# --- reading ------------------------------------------------------------------------------------

@dataclass
class CachedSample:
    key: str
    index: int
    epoch: int
    position: int
    caption: str
    size: tuple[int, int, int, int]
    tensors: dict[str, torch.Tensor | StoredTensor]  # hidden / scores: where they are in the cache file
    problem: str | None = None

    @property
    def bucket(self) -> tuple[int, int]:
        """What batches it with others: its latent's size (in latent cells; one size without aspect-ratio buckets)."""
        latent = self.tensors["latent"]
        return int(latent.shape[-2]), int(latent.shape[-1])


class CachedSource(IndexedSource):
    """The finished cache as an indexed source, in the dataset's natural order (whatever the number
    of processes that built it), so the training order matches an on-the-fly run's."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = Path(cache_dir)
        self.skipped_at_build = 0  # entries the build passed over, every process's
        self.image_sizes: Counter[tuple[int, int]] = Counter()  # samples per (height, width): the buckets' counts
        records: list[tuple[int, str, str, int, str, list[int]]] = []
        for idx_file in sorted(self.dir.glob("index-rank*.json")):
            index = json.loads(idx_file.read_text(encoding="utf-8"))
            if not index.get("complete"):
                raise LLMDiffError(f"the feature cache in '{self.dir}' is not finished ({idx_file.name}): run with "
                                   f"--cache-only first, or without it to build and train")
            self.skipped_at_build += sum(index.get("skipped", {}).get("counts", {}).values())
            for shard in index.get("shards", []):
                with safetensors.safe_open(str(self.dir / shard["file"]), framework="pt") as f:
                    meta = json.loads(f.metadata()["samples"])
                    for j in range(len(meta)):  # (from the file's header: nothing is read)
                        h, w = f.get_slice(f"{j}.latent").get_shape()[-2:]
                        self.image_sizes[(h * LATENT_SCALE, w * LATENT_SCALE)] += 1
                for j, m in enumerate(meta):
                    records.append((int(m["index"]), m["key"], shard["file"], j, m["caption"], m["size"]))
        if not records:
            raise LLMDiffError(f"the feature cache in '{self.dir}' holds no samples")
        records.sort(key=lambda r: (r[0], r[1]))
        self.records = records
        super().__init__([])

    def __len__(self) -> int:
        return len(self.records)

    def entry(self, i: int) -> RawEntry:
        index, key, file, j, caption, size = self.records[i]

        def load() -> Any:
            places = {n: p for n, p in stored_tensors(self.dir / file, j).items() if n in CACHED_KINDS}
            # the LLM features (MBs per sample) stay places in the file, read straight into the batch buffer
            return {n: p if n in ("hidden", "scores") else p.load() for n, p in places.items()}, tuple(size)
        return RawEntry(key, index, load, caption)


def changes_since_built(cached: CachedSource, source: Any) -> str | None:
    """How a folder or manifest dataset differs from what a finished cache was built from: entries added or
    removed, and the captions a manifest holds edited (a folder's caption files are not read again: that would
    be a second pass over the dataset). None when nothing differs, or for shards (no index to compare)."""
    if not isinstance(source, IndexedSource) or isinstance(source, CachedSource):
        return None
    cached_captions = {key: caption for _, key, _, _, caption, _ in cached.records}
    usable = source.usable_captions()
    skipped = cached.skipped_at_build
    removed = [k for k in cached_captions if k not in usable]
    # Usable entries the cache lacks are new, or were skipped by the build (whose keys the index does not keep):
    # a lower bound when it skipped any.
    added = len([k for k in usable if k not in cached_captions]) - skipped
    edited = [k for k, c in usable.items() if k in cached_captions and _caption_changed(c, cached_captions[k])]
    said = ([f"{'at least ' if skipped else ''}{added} entries added"] if added > 0 else []) + \
           ([f"{len(removed)} removed (e.g. {removed[0]})"] if removed else []) + \
           ([f"{len(edited)} captions edited (e.g. {edited[0]})"] if edited else [])
    return ", ".join(said) or None


def _caption_changed(now: str | tuple[str, ...] | None, cached: str) -> bool:
    if isinstance(now, tuple):  # several captions: the cache holds one of them
        return cached not in now
    return now is not None and now != cached


def decode_cached(entry: RawEntry, spec: StreamSpec, epoch: int, position: int) -> CachedSample:
    tensors, size = entry.load()  # type: ignore[misc]
    return CachedSample(entry.key, entry.index, epoch, position, entry.caption or "", size, tensors)


def load_empty(cache_dir: Path, spec: CacheSpec) -> tuple[LLMFeatures, torch.Tensor | None, torch.Tensor | None]:
    rec = safetensors.torch.load_file(str(Path(cache_dir) / "empty.safetensors"))
    feat = features_from(rec, spec)
    clip = rec["clip"][None] if "clip" in rec else None
    pooled = rec["pooled"][None] if "pooled" in rec else None
    return feat, clip, pooled


def features_from(rec: dict[str, torch.Tensor], spec: CacheSpec) -> LLMFeatures:
    """A stored record back to a padded one-row LLMFeatures (layers not stored are zero)."""
    mask = rec["mask"].bool()
    n = mask.shape[0]
    L, D = spec.llm.num_layers, spec.llm.hidden_size
    hidden = torch.zeros(L + 1, n, D)
    if spec.layers:
        hidden[spec.layers] = rec["hidden"].float()
    scores = rec["scores"].float() if spec.scores else torch.zeros(L, n, D)
    return pad(spec.llm, hidden, scores, mask, spec.max_tokens)


def compact_features(samples: list[CachedSample], spec: CacheSpec, pin: bool = False) -> CompactFeatures:
    """The stored LLM features of a batch, one copy: the stored layers in the stored dtype, padded
    to the batch's longest caption (pinned for an asynchronous copy to CUDA when `pin`)."""
    B = len(samples)
    L, D = spec.llm.num_layers, spec.llm.hidden_size
    lengths = [int(s.tensors["mask"].shape[0]) for s in samples]
    n = max(lengths)
    dtype = DTYPES[spec.dtype]
    hidden = torch.empty((B, len(spec.layers), n, D), dtype=dtype, pin_memory=pin)
    scores = torch.empty((B, L, n, D), dtype=dtype, pin_memory=pin) if spec.scores else None
    mask = torch.zeros((B, n), dtype=torch.bool, pin_memory=pin)
    reads: list[tuple[torch.Tensor | StoredTensor, torch.Tensor]] = []
    for i, (s, k) in enumerate(zip(samples, lengths)):
        if spec.layers:
            reads.append((s.tensors["hidden"], hidden[i, :, :k]))
            hidden[i, :, k:] = 0
        if scores is not None:
            reads.append((s.tensors["scores"], scores[i, :, :k]))
            scores[i, :, k:] = 0
        mask[i, :k] = s.tensors["mask"].bool()
    read_all(reads)
    return CompactFeatures(spec.llm, tuple(spec.layers), hidden, scores, mask, spec.max_tokens)


def collate(samples: list[CachedSample], spec: CacheSpec, pin: bool = False) -> Conditioning:
    """A batch from the cache; its LLM features stay compact (`encoders.expand_features` on the device)."""
    from .encoders import repeat_to_common_length

    feats = compact_features(samples, spec, pin)
    has_clip = all("clip" in s.tensors for s in samples)
    has_pooled = all("pooled" in s.tensors for s in samples)
    return Conditioning(
        keys=[s.key for s in samples], latents=torch.stack([s.tensors["latent"].float() for s in samples]),
        features=feats, clip=repeat_to_common_length([s.tensors["clip"].float() for s in samples]) if has_clip else None,
        pooled=torch.stack([s.tensors["pooled"].float() for s in samples]) if has_pooled else None,
        sizes=[tuple(s.size) for s in samples])  # type: ignore[misc]


def iter_items(source: CachedSource, stream_spec: StreamSpec, start: Position, num_workers: int) -> Iterator[Any]:
    return loader(SampleStream(source, stream_spec, start, decode_cached), num_workers)
