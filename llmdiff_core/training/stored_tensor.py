"""A tensor of a finished feature-cache shard, read straight into the batch buffer.

safetensors hands out a cached tensor as a view of the file's memory map, so copying it into the
batch buffer faults every page in (an 8B LLM's scores are ~18 MB per sample: the collate of a batch of
16 was page-fault bound), and through DataLoader workers the tensor first crossed shared memory (one
more copy, faulted in again on arrival). A StoredTensor is only the tensor's place in its shard: a few
picklable fields that travel from a worker for free; read_into() has the kernel copy the bytes from the
page cache into the destination (the page-locked batch buffer on CUDA) with one preadv call.

The safetensors layout is read from its own header (8-byte little-endian length, then JSON with each
tensor's dtype, shape and data offsets): safetensors has no read-into-a-buffer call.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache
from math import prod

import torch

from ..errors import LLMDiffError

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}
_IOV_MAX = 512  # buffers per preadv call (the system limit is at least 1024)
CAN_READ_INTO = hasattr(os, "preadv")  # not on Windows: there read_into copies from load()


@dataclass(frozen=True)
class StoredTensor:
    path: str
    offset: int  # of the tensor's first byte in the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    version: tuple[int, int, int]  # the file's (inode, size, mtime) when the place was read from its header

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize

    def load(self) -> torch.Tensor:
        """The tensor as a new CPU tensor."""
        out = torch.empty(self.shape, dtype=self.dtype)
        self.read_into(out)
        return out

    def read_into(self, dst: torch.Tensor) -> None:
        """Write the stored values into dst (a CPU tensor of this shape and dtype; any strides, as long as
        each index of its first dimension is one contiguous block, like batch_buffer[i, :, :k])."""
        if dst.device.type != "cpu" or dst.dtype != self.dtype or tuple(dst.shape) != self.shape:
            raise ValueError(f"cannot read {self.dtype} {self.shape} into {dst.dtype} {tuple(dst.shape)} "
                             f"on {dst.device}")
        if self.nbytes == 0:
            return
        if CAN_READ_INTO:
            complete = _read_into(self.path, self.version, self._blocks(dst), self.offset)
        else:
            data = _read_bytes(self.path, self.offset, self.nbytes)
            complete = data.numel() == self.nbytes
            if complete:
                dst.copy_(data.view(self.dtype).view(self.shape))
        if not complete:
            raise LLMDiffError(f"the feature cache file '{self.path}' ends before its tensors do (damaged or "
                               f"truncated): delete the cache folder and let training build it again")

    def _blocks(self, dst: torch.Tensor) -> list[tuple[int, int]]:
        """dst's memory as (address, bytes) blocks in the stored order."""
        if dst.is_contiguous():
            return [(dst.data_ptr(), self.nbytes)]
        if dst.dim() == 0 or not dst[0].is_contiguous():
            raise ValueError(f"read_into needs contiguous rows, got strides {dst.stride()}")
        row = self.nbytes // self.shape[0]
        step = dst.stride(0) * dst.element_size()
        return [(dst.data_ptr() + i * step, row) for i in range(self.shape[0])]


READ_THREADS = min(4, os.cpu_count() or 1)
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked worker makes its own
_pool_lock = threading.Lock()


def read_all(pairs: Sequence[tuple[StoredTensor | torch.Tensor, torch.Tensor]]) -> None:
    """dst <- src for every (src, dst) pair; stored sources are read on up to READ_THREADS threads. A read
    is one preadv, a kernel copy from the page cache that runs without the GIL, so the reads of a batch
    overlap (one thread read a batch's 294 MiB at ~2.8 GB/s on the GPU host: docs/benchmarks.md §5d).
    The first failing read's error is raised once all have finished."""
    global _pool
    stored = [(src, dst) for src, dst in pairs if isinstance(src, StoredTensor)]
    for src, dst in pairs:
        if not isinstance(src, StoredTensor):
            dst.copy_(src)
    if len(stored) < 2 or READ_THREADS < 2:
        for src, dst in stored:
            src.read_into(dst)
        return
    with _pool_lock:  # (prefetch threads collate batches side by side: one pool for all)
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(READ_THREADS, thread_name_prefix="llmdiff-cache-read"))
        pool = _pool[1]
    done = [pool.submit(src.read_into, dst) for src, dst in stored]
    wait(done)
    for f in done:
        f.result()


def stored_tensors(path: str | os.PathLike[str], sample: int) -> dict[str, StoredTensor]:
    """kind ("latent", "hidden", ...) -> the place of tensor "<sample>.<kind>" in the shard at path."""
    index = _index(os.fspath(path))
    return {kind: index.place(sample, kind) for kind in index.kinds_of(sample)}


class _ShardIndex:
    """What a shard's header says, kept compact for the life of the process (a 256-sample shard's header
    parses into ~1 MB of dicts, and re-parsing it per sample would cost milliseconds): per tensor kind,
    each sample's byte offset (-1: absent) and shape (interned), and the kind's dtype."""

    def __init__(self, path: str, version: tuple[int, int, int]) -> None:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.path, self.version, self.base = path, version, 8 + n
        entries = []
        for name, info in header.items():
            sample, _, kind = name.partition(".")
            if sample.isdigit():
                entries.append((int(sample), kind, info))
        count = 1 + max((j for j, _, _ in entries), default=-1)
        self.begin: dict[str, array] = {}
        self.shape: dict[str, list[tuple[int, ...] | None]] = {}
        self.dtype: dict[str, torch.dtype] = {}
        interned: dict[tuple[int, ...], tuple[int, ...]] = {}
        for j, kind, info in entries:
            if kind not in self.begin:
                self.begin[kind], self.shape[kind] = array("q", [-1]) * count, [None] * count
                self.dtype[kind] = DTYPES[info["dtype"]]
            if DTYPES[info["dtype"]] != self.dtype[kind]:
                raise LLMDiffError(f"the feature cache file '{path}' mixes dtypes for '{kind}': delete the cache "
                                   f"folder and let training build it again")
            shape = tuple(info["shape"])
            self.begin[kind][j] = int(info["data_offsets"][0])
            self.shape[kind][j] = interned.setdefault(shape, shape)

    def kinds_of(self, sample: int) -> list[str]:
        return [k for k, begin in self.begin.items() if sample < len(begin) and begin[sample] >= 0]

    def place(self, sample: int, kind: str) -> StoredTensor:
        begin, shape = self.begin[kind][sample], self.shape[kind][sample]
        if begin < 0 or shape is None:
            raise KeyError(f"{sample}.{kind}")
        return StoredTensor(self.path, self.base + begin, self.dtype[kind], shape, self.version)


def _index(path: str) -> _ShardIndex:
    return _index_of(path, _version(path))


@lru_cache(maxsize=4096)
def _index_of(path: str, version: tuple[int, int, int]) -> _ShardIndex:
    return _ShardIndex(path, version)


def _version(path: str) -> tuple[int, int, int]:
    """(inode, size, mtime): a cache file rewritten in place or replaced is another file to the caches here."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class _OpenFiles(OrderedDict):  # (pid, path, version) -> descriptor, least recently used first
    def __del__(self) -> None:  # the thread ended: its descriptors go with it
        for (pid, _, _), fd in self.items():
            if pid == os.getpid():
                os.close(fd)


class _Descriptors(threading.local):
    """Each thread's own read-only descriptors, one per (process, file version): a read never shares a
    descriptor with another thread, so reads of one batch run in parallel (read_all) and no thread
    closes a descriptor another one is reading from."""

    def __init__(self) -> None:
        self.open = _OpenFiles()


_fds = _Descriptors()
_MAX_OPEN = 32  # per thread (a batch of 16 touches at most 16 shards)


def _read_into(path: str, version: tuple[int, int, int], blocks: list[tuple[int, int]], offset: int) -> bool:
    return _preadv_all(_fd(path, version), blocks, offset)


def _fd(path: str, version: tuple[int, int, int]) -> int:
    """This thread's descriptor of the file version, in this process (a forked DataLoader worker opens
    its own), checked against the version on every read."""
    fds = _fds.open
    key = (os.getpid(), path, version)
    fd = fds.get(key)
    if fd is None:
        fd = fds[key] = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    fds.move_to_end(key)
    st = os.fstat(fd)  # every read: a file rewritten in place keeps its descriptor and inode
    if (st.st_ino, st.st_size, st.st_mtime_ns) != version:
        del fds[key]
        os.close(fd)
        raise LLMDiffError(f"the feature cache file '{path}' changed while training read it: let the cache "
                           f"build finish (or delete the cache folder) before training from it")
    while len(fds) > _MAX_OPEN:
        old_key, old = fds.popitem(last=False)
        if old_key[0] == os.getpid():  # a parent's descriptors are the parent's to close
            os.close(old)
    return fd


def _preadv_all(fd: int, blocks: list[tuple[int, int]], offset: int) -> bool:
    """Fill the memory blocks (address, size) with the file's bytes from offset on (preadv may stop short).
    False if the file ends first."""
    views = [memoryview((ctypes.c_char * size).from_address(address)).cast("B") for address, size in blocks]
    while views:
        got = os.preadv(fd, views[:_IOV_MAX], offset)
        if got <= 0:
            return False
        offset += got
        while got and views:  # drop what was filled; keep the rest of a partly filled block
            if got >= len(views[0]):
                got -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][got:]
                got = 0
    return True


def _read_bytes(path: str, offset: int, size: int) -> torch.Tensor:
    with open(path, "rb") as f:
        f.seek(offset)
        return torch.frombuffer(bytearray(f.read(size)), dtype=torch.uint8)
