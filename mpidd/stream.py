"""Images read from the HDF5 file batch by batch (--data-access stream). No MPI.

A `BoxStream` stands for one split's images inside one box (a rank's subimages, or whole
images), samples `rows` of the file, without holding them. The training and inference loops
(mpidd.engine, mpidd.coherent_model) announce the batches of an epoch in order (`batches`), and a
background thread reads them ahead while the model computes. A batch is read as whole blocks
(the file's chunk extent along the samples, a hyperslab each) when its samples lie in few
blocks, as they do in the `blocks` training order (feed.epoch_order); otherwise its samples
are read apart. Either way a batch holds exactly the images that the same indices select from
the array in memory, so both access modes compute the same numbers.

Memory: the blocks that later batches of the epoch still need, plus `lookahead` batches.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import h5py
import numpy as np

from .data import DataError

ACCESS_MODES = ("auto", "memory", "stream")
# auto: memory when a rank's share is at most this fraction of the memory available to it
# (the rest is for the models, their activations, torch and MPI)
MEMORY_FRACTION = 0.5
# A stream reads whole blocks when the blocks that later batches still need never add up to more
# than this (the blocks order: about two windows of --shuffle-buffer blocks); else each batch's
# samples apart (the exact order on a large share, where every batch needs almost every block).
BLOCK_BUFFER_BYTES = 64 << 20


@dataclass
class StreamStats:
    """What one rank's streams did: bytes requested from the file, seconds the reader threads
    spent reading, seconds the loops waited for a batch that was not read yet."""
    bytes_read: int = 0
    read_s: float = 0.0
    wait_s: float = 0.0
    batches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts):
        with self.lock:
            for k, v in amounts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict:
        return {"bytes_read": self.bytes_read, "read_s": self.read_s, "wait_s": self.wait_s, "batches": self.batches}


class BoxStream:
    """images[rows, :, *box] of an images dataset of the HDF5 file at `path`, read on demand.

    dataset: a split of the mpidd layout ("train", "val", "test": /SPLIT/images) or the path of
    any (n, C, *spatial) dataset in the file. box: slices of the spatial axes (default: whole
    images). rows: the file's samples the stream holds (a range or an array of increasing
    indices; default all): a data-parallel rank's share, every M-th sample, a hold-out. Sample k
    of the stream is file row rows[k]. Indexing (stream[idx], idx a slice, an integer array or
    tensor) reads at once; `batches` reads a sequence of batches ahead.
    """

    def __init__(self, path: str, dataset: str, box_slices=None, rows=None, stats: StreamStats | None = None,
                 lookahead: int = 2):
        self.path = str(path)
        self.dataset_name = f"/{dataset}/images" if dataset in ("train", "val", "test") else dataset
        self.name = f"{self.path}:{self.dataset_name}"
        self.stats = stats if stats is not None else StreamStats()
        self.lookahead = lookahead
        self._file = None
        ds = self.dataset
        self.file_samples = ds.shape[0]
        self.box = tuple(box_slices) if box_slices is not None else tuple(slice(0, s) for s in ds.shape[2:])
        self.rows = rows if rows is not None else range(self.file_samples)
        if not isinstance(self.rows, range):
            self.rows = np.asarray(self.rows, dtype=np.int64)
            if len(self.rows) > 1 and not (np.diff(self.rows) > 0).all():
                raise ValueError(f"{self.name}: rows must be increasing")
        if len(self.rows) and (self.rows[0] < 0 or self.rows[-1] >= self.file_samples):
            raise ValueError(f"rows {self.rows[0]}..{self.rows[-1]} outside {self.name}'s {self.file_samples} samples")
        self.dtype = ds.dtype
        self.shape = (len(self.rows), ds.shape[1]) + tuple(s.stop - s.start for s in self.box)
        # chunk-aligned reads: one block is the chunk's extent along the samples
        self.block = int(ds.chunks[0]) if ds.chunks else 1024

    @property
    def dataset(self):
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file[self.dataset_name]

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """What the stream's images would take in memory (they are never held)."""
        return len(self) * self.sample_bytes

    def _derived(self, rows=None, box_slices=None) -> "BoxStream":
        return BoxStream(self.path, self.dataset_name, box_slices if box_slices is not None else self.box,
                         rows if rows is not None else self.rows, self.stats, self.lookahead)

    def subset(self, start: int, step: int) -> "BoxStream":
        """Samples start, start + step, ... of this stream (e.g. a width sub-network's shard)."""
        return self._derived(rows=self.rows[start::step])

    def share(self, lo: int, hi: int) -> "BoxStream":
        """Samples lo..hi-1 of this stream (a data-parallel rank's share)."""
        return self._derived(rows=self.rows[lo:hi])

    def take(self, idx) -> "BoxStream":
        """Samples idx (increasing) of this stream, as a stream (e.g. a validation hold-out)."""
        return self._derived(rows=self._file_rows(np.asarray(idx, dtype=np.int64)))

    def in_box(self, box_slices) -> "BoxStream":
        """The same samples inside `box_slices` (slices of the spatial axes of the whole images)."""
        return self._derived(box_slices=tuple(slice(self.box[a].start + s.start, self.box[a].start + s.stop)
                                              for a, s in enumerate(box_slices)))

    def _file_rows(self, idx: np.ndarray) -> np.ndarray:
        if isinstance(self.rows, range):
            return self.rows.start + idx * self.rows.step
        return self.rows[idx]

    def __getitem__(self, key):
        if isinstance(key, slice):
            key = np.arange(len(self))[key]
        return self.read(key)

    def read(self, idx) -> np.ndarray:
        """The images of sample indices `idx` (any order), read now."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range 0..{len(self) - 1}")
        return self._read_file_rows(self._file_rows(idx))

    def _read_file_rows(self, rows: np.ndarray) -> np.ndarray:
        if rows.size == 0:
            return np.empty((0,) + self.shape[1:], dtype=self.dtype)
        unique, inverse = np.unique(rows, return_inverse=True)
        lo, hi = int(unique[0]), int(unique[-1]) + 1
        selection = slice(lo, hi) if hi - lo == len(unique) else unique
        images = self._read(selection, len(unique))
        return images if np.array_equal(unique, rows) else images[inverse]

    def _read(self, selection, count: int) -> np.ndarray:
        """One hyperslab (a slice of rows) or point set (sorted unique rows) of the box."""
        t = time.perf_counter()
        images = self.dataset[(selection, slice(None)) + self.box]
        self.stats.add(bytes_read=count * self.sample_bytes, read_s=time.perf_counter() - t)
        return images

    def batches(self, index_lists) -> "Prefetcher":
        """The images of each index array of `index_lists` in turn (take() them in order), read
        ahead by a background thread."""
        return Prefetcher(self, index_lists, self.lookahead)

    def iter_reads(self, index_lists):
        """Yield the images of each index array in turn: read as whole blocks, each kept from
        the first batch that needs it to the last, where those held at once stay within
        BLOCK_BUFFER_BYTES; else each batch's samples apart."""
        B = self.block
        rows = [self._file_rows(np.asarray(i, dtype=np.int64).reshape(-1)) for i in index_lists]
        blocks = [np.unique(r // B) for r in rows]
        first_use, last_use = {}, {}
        for k, b in enumerate(blocks):
            for block in b.tolist():
                first_use.setdefault(block, k)
                last_use[block] = k
        live = np.zeros(len(rows) + 1, dtype=np.int64)  # blocks held while batch k is assembled
        for block, k in first_use.items():
            live[k] += 1
            live[last_use[block] + 1] -= 1
        whole = B > 1 and len(rows) > 0 and np.cumsum(live).max() * B * self.sample_bytes <= BLOCK_BUFFER_BYTES
        first, end = (int(self.rows[0]), int(self.rows[-1]) + 1) if len(self.rows) else (0, 0)
        cache = {}
        for k, r in enumerate(rows):
            if not whole:
                yield self._read_file_rows(r)
                continue
            out = np.empty((len(r),) + self.shape[1:], dtype=self.dtype)
            for b in blocks[k].tolist():
                if b not in cache:  # the block, clipped to this stream's rows
                    lo, hi = max(b * B, first), min((b + 1) * B, end)
                    cache[b] = (lo, self._read(slice(lo, hi), hi - lo))
                lo, images = cache[b]
                inside = (r // B) == b
                out[inside] = images[r[inside] - lo]
                if last_use[b] == k:
                    del cache[b]
            yield out


class Prefetcher:
    """Reads the batches of `index_lists` in a background thread, `depth` ahead of take().

    take(idx) returns the next batch (whose indices must be idx) and counts the time it waited
    for it; an error in the reader is raised there. close() stops the thread (an abandoned epoch)."""

    def __init__(self, stream: BoxStream, index_lists, depth: int = 2):
        self.stream = stream
        self.sizes = [len(i) for i in index_lists]
        self.taken = 0
        self.queue = queue.Queue(maxsize=max(1, depth))
        self.cancelled = threading.Event()
        self.thread = threading.Thread(target=self._read_all, args=(list(index_lists),), daemon=True,
                                       name="mpidd-prefetch")
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.cancelled.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _read_all(self, index_lists):
        try:
            for images in self.stream.iter_reads(index_lists):
                if not self._put((True, images)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put((False, e))

    def take(self, idx=None) -> np.ndarray:
        if self.taken >= len(self.sizes):
            raise RuntimeError(f"{self.stream.name}: more batches taken than were announced")
        t = time.perf_counter()
        ok, item = self.queue.get()
        self.stream.stats.add(wait_s=time.perf_counter() - t, batches=1)
        if not ok:
            raise item
        asked = (len(range(*idx.indices(len(self.stream)))) if isinstance(idx, slice)
                 else len(idx) if idx is not None else None)
        if asked is not None and asked != len(item):
            raise RuntimeError(f"{self.stream.name}: batch {self.taken} has {len(item)} samples, {asked} asked for")
        self.taken += 1
        return item

    def close(self):
        self.cancelled.set()
        self.thread.join()


def is_stream(x) -> bool:
    return isinstance(x, BoxStream)


def file_images(x, split: str, stats: StreamStats | None = None):
    """x as a stream of whole images if it names images in an HDF5 file: an h5py.Dataset, or the
    path of an mpidd data file (its `split`, or the split after a colon: "data.h5:val"); else
    None (x is an array). The labels come along: (stream, labels or None)."""
    import os
    if isinstance(x, h5py.Dataset):
        path, name = x.file.filename, x.name
    elif isinstance(x, (str, os.PathLike)):
        path, name = str(x), f"/{split}/images"
        head, _, tail = path.rpartition(":")
        if not os.path.exists(path) and head and tail in ("train", "val", "test"):
            path, name = head, f"/{tail}/images"
        if not os.path.exists(path):
            raise ValueError(f"{path} does not exist")
    else:
        return None, None
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 file ({e})") from None
    with f:
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise ValueError(f"{path} has no dataset {name}")
        ds = f[name]
        if ds.ndim not in (4, 5):
            raise ValueError(f"{path}:{name} has shape {ds.shape}: expected (n, C, H, W) or (n, C, D, H, W)")
        labels_name = name.rsplit("/", 1)[0] + "/labels"
        labels = f[labels_name][...].astype(np.int64) if labels_name in f and f[labels_name].shape == ds.shape[:1] \
            else None
    return BoxStream(path, name, stats=stats), labels


def check_finite(stream: BoxStream, block: int = 4096) -> int:
    """Raise DataError with one line if an image of the stream holds NaN or inf; read in blocks
    of `block` samples, nothing kept. Returns the bytes read (0 for uint8 images, which cannot)."""
    if stream.dtype.kind != "f":
        return 0
    for lo in range(0, len(stream), block):
        hi = min(lo + block, len(stream))
        images = stream.read(np.arange(lo, hi))
        finite = np.isfinite(images).reshape(hi - lo, -1).all(axis=1)
        if not finite.all():
            bad = stream.rows[lo + int(np.flatnonzero(~finite)[0])]
            raise DataError(f"{stream.name}: image {bad} holds NaN or inf values; clean the data file")
    return len(stream) * stream.sample_bytes


def memory_available() -> int | None:
    """Bytes this process may still allocate: MemAvailable, or less under a cgroup memory
    limit (a Slurm job's); None where neither can be read."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            limits.append(max(int(limit) - usage, 0))
        break
    return min(limits) if limits else None


def choose_access(requested: str, share_bytes: int, available_bytes: int | None) -> tuple[str, str]:
    """(memory or stream, why). auto: memory when the share is at most MEMORY_FRACTION of the
    memory available to this rank, stream otherwise (memory where that cannot be read)."""
    if requested not in ACCESS_MODES:
        raise ValueError(f"unknown data access {requested!r} ({', '.join(ACCESS_MODES)})")
    if requested != "auto":
        return requested, f"--data-access {requested}"
    if available_bytes is None:
        return "memory", f"share {human_bytes(share_bytes)}; the available memory is unknown"
    mode = "memory" if share_bytes <= MEMORY_FRACTION * available_bytes else "stream"
    relation = "<=" if mode == "memory" else ">"
    return mode, (f"share {human_bytes(share_bytes)} {relation} {MEMORY_FRACTION:g} x "
                  f"{human_bytes(available_bytes)} available to the rank")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"

