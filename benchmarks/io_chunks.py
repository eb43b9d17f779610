"""How much of the HDF5 file each rank's subdomain read really touches, by grid and overlap.

    python benchmarks/io_chunks.py --data data/fashion_mnist.h5

For every grid (default 2x2, 4x4, 7x7) and overlap (default 0 and 2) and every subdomain i, this
compares three byte counts against the subdomain's share of the file (images storage / N):

  requested  n * C * box area * itemsize: the hyperslab images[:, :, y0:y1, x0:x1] asked for;
  touched    the stored size of every HDF5 chunk that intersects that hyperslab (from the file's
             chunk index): HDF5 reads whole chunks, so this is what a rank really pulls in;
  read()     the bytes the process read from the file during the read (rchar in /proc/self/io),
             a check that HDF5 does read whole chunks (it includes a few KB of file metadata).

It also times the read done the way a rank does it: open the file, mpidd.data.read_box on the box.
Subdomains are read one after the other in this one process (no MPI): each rank's read is
independent of the others, so a serial loop measures the same bytes. The file is read once
beforehand, so the seconds are WARM page-cache seconds (nothing drops the cache): they show the
cost of HDF5's chunk handling and copying, not of the disk.

Target (issue): touched <= 1.25 x share for chunk-aligned grids (every box edge on a chunk
boundary or the image border). Unaligned grids and grids with overlap get no verdict ("--").

By default the same table is printed again for a temporary copy of the first --samples (8192)
images written with another spatial tile (--chunks 4) by mpidd.writer.DatasetWriter, to compare
e.g. 7x7 on tile 4 with tile 7. The copy has fewer samples, so compare its ratios and MB/s, not
its seconds. --chunks "" leaves the copy out; --chunks 4,14 makes two.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from mpidd.data import SPLITS, read_box  # noqa: E402
from mpidd.writer import DatasetWriter  # noqa: E402
from mpidd.decomposition import Decomposition, DecompositionError, format_grid, parse_grid  # noqa: E402

TARGET = 1.25


def chunk_table(dset):
    """(offsets, sizes): the logical offset (ndim ints) and stored bytes of every allocated chunk."""
    rows = []
    if hasattr(dset.id, "chunk_iter"):  # one pass over the chunk index (HDF5 >= 1.12.3)
        dset.id.chunk_iter(lambda info: rows.append((info.chunk_offset, info.size)))
    else:
        for k in range(dset.id.get_num_chunks()):
            info = dset.id.get_chunk_info(k)
            rows.append((info.chunk_offset, info.size))
    return np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows], dtype=np.int64)


def touched_bytes(offsets, sizes, chunks, box):
    """Stored bytes of the chunks meeting the box on every spatial axis (all samples and channels
    are read, so only the spatial axes select chunks)."""
    hit = np.ones(len(sizes), dtype=bool)
    for axis, (lo, hi) in enumerate(box, start=2):
        start = offsets[:, axis]
        hit &= (start < hi) & (start + chunks[axis] > lo)
    return int(sizes[hit].sum())


def aligned(decomp, chunks):
    """Every box edge on a chunk boundary or at the image border."""
    return all((lo % c == 0) and (hi % c == 0 or hi == length)
               for box in decomp.boxes()
               for (lo, hi), c, length in zip(box, chunks[2:], decomp.shape))


def rchar():
    """Bytes this process has read() so far (page cache included), or None off Linux."""
    try:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])
    except (OSError, StopIteration):
        return None


def timed_read(path, split, box, repeat):
    """Best of `repeat` reads of the box, each as a rank does it (fresh file, fresh chunk cache):
    (seconds, read() bytes of that read)."""
    best, nread = float("inf"), None
    for _ in range(repeat):
        before = rchar()
        t0 = time.perf_counter()
        with h5py.File(path, "r") as f:
            read_box(f[split]["images"], tuple(slice(lo, hi) for lo, hi in box))
        seconds = time.perf_counter() - t0
        after = rchar()
        if seconds < best:
            best, nread = seconds, (after - before if before is not None else None)
    return best, nread


def warm(path):
    """Read the whole file once so every timing below is from the page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def table(path, split, grids, overlaps, repeat):
    with h5py.File(path, "r") as f:
        dset = f[split]["images"]
        if dset.chunks is None:
            sys.exit(f"{path}:/{split}/images is not chunked: nothing to measure")
        shape, chunks, dtype = dset.shape, dset.chunks, dset.dtype
        storage = dset.id.get_storage_size()
        offsets, sizes = chunk_table(dset)
    n, channels, spatial = shape[0], shape[1], shape[2:]
    print(f"\n{path}:/{split}/images  {n} x {channels} x {format_grid(spatial)} {dtype}, "
          f"chunks {chunks} ({len(sizes)} chunks of {int(sizes.max()) / 1024:.0f} KiB), "
          f"storage {storage / 2**20:.1f} MiB")
    warm(path)
    print(f"{'grid':>5} {'ovl':>3} {'N':>3} {'subimage':>8} {'aligned':>7} {'req/share':>9} "
          f"{'touched/share':>13} {'read()/share':>12} {'s(max)':>7} {'MB/s':>6}  target")
    print(f"{'':>37} {'max':>9} {'max':>6} {'mean':>6} {'max':>12}")
    for grid in grids:
        for overlap in overlaps:
            try:
                decomp = Decomposition(tuple(spatial), grid, overlap)
            except DecompositionError as e:
                print(f"{format_grid(grid):>5} {overlap:>3}  skipped: {e}")
                continue
            N = decomp.num_subdomains
            share = storage / N
            req, touched, nread, secs = [], [], [], []
            for i in range(N):
                box = decomp.box(i)
                area = int(np.prod([hi - lo for lo, hi in box]))
                req.append(n * channels * area * dtype.itemsize)
                touched.append(touched_bytes(offsets, sizes, chunks, box))
                s, r = timed_read(path, split, box, repeat)
                secs.append(s)
                nread.append(r)
            ok = aligned(decomp, chunks)
            worst = int(np.argmax(secs))
            verdict = ("PASS" if max(touched) <= TARGET * share else "FAIL") if ok else "--"
            read_ratio = (f"{max(nread) / share:12.2f}" if None not in nread else f"{'n/a':>12}")
            print(f"{format_grid(grid):>5} {overlap:>3} {N:>3} {format_grid(decomp.subimage_shape):>8} "
                  f"{'yes' if ok else 'no':>7} {max(req) / share:9.2f} {max(touched) / share:6.2f} "
                  f"{np.mean(touched) / share:6.2f} {read_ratio} {secs[worst]:7.3f} "
                  f"{req[worst] / secs[worst] / 1e6:6.0f}  {verdict}")


def write_copy(src, split, samples, tile, path):
    """The first `samples` images of `split` as the train split of a new file chunked with `tile`
    (val and test get one image each: the layout needs them, the benchmark does not read them)."""
    with h5py.File(src, "r") as f:
        x = f[split]["images"][:samples]
        y = f[split]["labels"][:samples]
        classes = list(f.attrs.get("classes", [])) or [str(k) for k in range(int(y.max()) + 1)]
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in classes]
    sizes = {s: (len(x) if s == "train" else 1) for s in SPLITS}
    with DatasetWriter(path, x.shape[1:], x.dtype, sizes, classes, tile=tile) as w:
        for s in SPLITS:
            w.write(s, x[:sizes[s]], y[:sizes[s]])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " (prints a table; see the module docstring)")
    p.add_argument("--data", default="data/fashion_mnist.h5", help="mpidd HDF5 file (default %(default)s)")
    p.add_argument("--split", default="train", help="split whose images are read (default %(default)s)")
    p.add_argument("--grids", default="2x2,4x4,7x7", help="comma-separated grids (default %(default)s)")
    p.add_argument("--overlaps", default="0,2", help="comma-separated overlaps in pixels (default %(default)s)")
    p.add_argument("--chunks", default="4",
                   help="comma-separated spatial tiles: also measure a temporary copy written with each "
                        "(default %(default)s; '' for none)")
    p.add_argument("--samples", type=int, default=8192,
                   help="images in each temporary copy: the first ones of --split (default %(default)s, "
                        "to keep it quick)")
    p.add_argument("--repeat", type=int, default=3,
                   help="reads per subdomain; the fastest counts (default %(default)s)")
    args = p.parse_args(argv)

    grids = [parse_grid(g) for g in args.grids.split(",") if g.strip()]
    overlaps = [int(o) for o in args.overlaps.split(",") if o.strip()]
    tiles = [int(t) for t in args.chunks.split(",") if t.strip()]
    print("Per subdomain vs its share of the file (images storage / N); max and mean over subdomains.")
    print(f"touched = stored bytes of the chunks the hyperslab meets; read() = bytes actually read "
          f"(/proc/self/io rchar); s(max) = slowest subdomain's read (open + mpidd.data.read_box, "
          f"best of {args.repeat}, warm page cache); MB/s = its requested bytes / s. "
          f"target: touched <= {TARGET} x share, judged for chunk-aligned grids only.")
    table(args.data, args.split, grids, overlaps, args.repeat)
    if tiles:
        with tempfile.TemporaryDirectory(prefix="io_chunks.") as tmp:
            for tile in tiles:
                copy = os.path.join(tmp, f"tile{tile}.h5")
                write_copy(args.data, args.split, args.samples, tile, copy)
                print(f"\n--- temporary copy: first {args.samples} images, tile {tile} "
                      f"(mpidd.writer.DatasetWriter(..., tile={tile}))")
                table(copy, "train", grids, overlaps, args.repeat)


if __name__ == "__main__":
    main()
