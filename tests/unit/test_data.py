import gzip
import os

import h5py
import numpy as np
import pytest

from conftest import make_tiny_dataset
from data_prep.fashion_mnist import IDXError, convert, read_idx
from mpidd.data import DataError, inspect, load_split, read_box
from mpidd.writer import write_dataset
from mpidd.decomposition import Decomposition


class RecordingDataset:
    """Stands in for an h5py Dataset and records every selection that is read."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]


def inside(key, box_slices):
    return all(k.start >= b.start and k.stop <= b.stop for k, b in zip(key[2:], box_slices))


@pytest.mark.parametrize("grid,overlap", [((2, 2), 0), ((4, 4), 1), ((1, 4), 2), ((3, 2), 1)])
def test_read_box_reads_only_the_box_in_blocks(grid, overlap):
    images = np.random.default_rng(0).integers(0, 255, (1000, 1, 28, 28), dtype=np.uint8)
    dec = Decomposition((28, 28), grid, overlap)
    for i in range(dec.num_subdomains):
        ds = RecordingDataset(images)
        box = dec.slices(i)
        out, nbytes = read_box(ds, box, block=300)
        assert np.array_equal(out, images[(slice(None), slice(None)) + box])
        assert nbytes == out.nbytes == 1000 * np.prod(dec.subimage_shape)
        assert len(ds.reads) == 4  # 300 + 300 + 300 + 100 samples
        assert all(k[0].stop - k[0].start <= 300 for k in ds.reads)
        assert all(inside(k, box) for k in ds.reads)


def test_read_box_refuses_nan(tmp_path):
    images = np.zeros((10, 1, 8, 8), dtype=np.float32)
    images[7, 0, 6, 6] = np.nan
    out, _ = read_box(images, (slice(0, 4), slice(0, 4)))  # the NaN is outside this box
    assert out.shape == (10, 1, 4, 4)
    with pytest.raises(DataError, match="image 7 holds NaN"):
        read_box(images, (slice(4, 8), slice(4, 8)), block=3)
    images[7, 0, 6, 6] = np.inf
    with pytest.raises(DataError, match="NaN or inf"):
        read_box(images, (slice(4, 8), slice(4, 8)))


def test_layout_written_and_inspected(tmp_path):
    path = make_tiny_dataset(tmp_path / "t.h5", n=(20, 8, 8), size=12, num_classes=3)
    info = inspect(path)
    assert info.image_shape == (1, 12, 12) and info.num_classes == 3 and info.dtype == "uint8"
    assert info.sizes == {"train": 20, "val": 8, "test": 8}
    assert info.classes == ["class0", "class1", "class2"]
    with h5py.File(path) as f:
        assert f["train/images"].chunks[2:] == (8, 8)
        assert f["train/labels"].dtype == np.int64
        assert f.attrs["layout"] == "NCHW"
    x, y, nbytes = load_split(path, "val", (slice(0, 6), slice(6, 12)))
    assert x.shape == (8, 1, 6, 6) and y.shape == (8,) and nbytes == x.nbytes + y.nbytes
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _rewrite(path, split, name, data):
    with h5py.File(path, "a") as f:
        del f[split][name]
        f[split][name] = data


@pytest.mark.parametrize("damage,message", [
    (lambda p: os.remove(p), "does not exist"),
    (lambda p: open(p, "w").write("not hdf5"), "not a readable HDF5"),
    (lambda p: h5py.File(p, "a").__delitem__("val"), "group /val is missing"),
    (lambda p: h5py.File(p, "a")["test"].__delitem__("labels"), "/test/labels is missing"),
    (lambda p: _rewrite(p, "train", "images", np.zeros((20, 12, 12), np.uint8)), "expected \\(n, C, H, W\\)"),
    (lambda p: _rewrite(p, "val", "images", np.zeros((8, 1, 10, 10), np.uint8)), "same image shape"),
    (lambda p: _rewrite(p, "train", "labels", np.full(20, 3, np.int64)), "labels out of range.*3 classes"),
    (lambda p: _rewrite(p, "train", "labels", np.full(20, -1, np.int64)), "labels out of range"),
    (lambda p: _rewrite(p, "train", "labels", np.zeros(19, np.int64)), "one label per image"),
    (lambda p: _rewrite(p, "train", "images", np.zeros((20, 1, 12, 12), np.int32)), "dtype int32"),
])
def test_inspect_refuses_bad_files(tmp_path, damage, message):
    path = make_tiny_dataset(tmp_path / "t.h5", n=(20, 8, 8), size=12, num_classes=3)
    damage(path)
    with pytest.raises(DataError, match=message):
        inspect(path)


def test_classes_inferred_from_labels_without_names(tmp_path):
    path = make_tiny_dataset(tmp_path / "t.h5", n=(50, 8, 8), num_classes=5, classes=False)
    assert inspect(path).num_classes == 5


def write_idx(path, array, gz=True, truncate=0):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    raw = raw[:len(raw) - truncate]
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


def fake_idx_dir(d, n_train=30, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    write_idx(d / f"train-images-idx3-ubyte{ext}", rng.integers(0, 255, (n_train, 28, 28)), gz)
    write_idx(d / f"train-labels-idx1-ubyte{ext}", rng.integers(0, 10, n_train), gz)
    write_idx(d / f"t10k-images-idx3-ubyte{ext}", rng.integers(0, 255, (n_test, 28, 28)), gz)
    write_idx(d / f"t10k-labels-idx1-ubyte{ext}", rng.integers(0, 10, n_test), gz)
    return d


@pytest.mark.parametrize("gz", [True, False])
def test_idx_conversion(tmp_path, gz):
    src = fake_idx_dir(tmp_path, gz=gz)
    out = tmp_path / "out" / "f.h5"
    sizes = convert(str(src), str(out), val=5)
    assert sizes == {"train": 25, "val": 5, "test": 10}
    info = inspect(str(out))
    assert info.image_shape == (1, 28, 28) and info.num_classes == 10 and info.classes[0] == "T-shirt/top"
    images = read_idx(str(src / f"train-images-idx3-ubyte{'.gz' if gz else ''}"), 3)
    with h5py.File(out) as f:
        assert np.array_equal(f["val/images"][:, 0], images[25:])
        assert f["train/images"].chunks == (25, 1, 7, 7)
    convert(str(src), str(tmp_path / "t4.h5"), val=5, tile=4)  # --tile: 7x7 grids read only their share
    with h5py.File(tmp_path / "t4.h5") as f, h5py.File(out) as g:
        assert (f["train/images"].chunks == (25, 1, 4, 4)
                and np.array_equal(f["train/images"][...], g["train/images"][...]))


@pytest.mark.parametrize("damage,message", [
    (lambda d: os.remove(d / "t10k-labels-idx1-ubyte.gz"), "not found"),
    (lambda d: write_idx(d / "train-images-idx3-ubyte.gz", np.zeros((30, 28, 28)), truncate=100), "truncated"),
    (lambda d: write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(29)), "30 images but 29 labels"),
    (lambda d: write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros((30, 2))), "not an unsigned-byte IDX"),
    (lambda d: open(d / "train-images-idx3-ubyte.gz", "wb").write(b"\x1f\x8b\x08junk"), "cannot be read"),
])
def test_idx_errors_leave_no_output(tmp_path, damage, message):
    src = fake_idx_dir(tmp_path)
    damage(src)
    out = tmp_path / "out.h5"
    with pytest.raises(IDXError, match=message):
        convert(str(src), str(out), val=5)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_write_is_atomic_on_failure(tmp_path):
    out = tmp_path / "x.h5"
    with pytest.raises(Exception):
        write_dataset(str(out), {"train": (np.zeros((4, 1, 8, 8), np.uint8), np.zeros(3))},
                      attrs={"bad": object()})
    assert os.listdir(tmp_path) == []


def test_dataset_writer_streams_blocks_and_stores_channel_statistics(tmp_path):
    """Blocks of any size, in order; the training split's per-channel mean and std (uint8 in
    units of /255) match numpy's over the whole split; inspect returns them."""
    from mpidd.writer import DatasetWriter
    rng = np.random.default_rng(1)
    x = {s: rng.integers(0, 256, (n, 3, 6, 5), dtype=np.uint8) for s, n in (("train", 23), ("val", 4), ("test", 5))}
    x["train"][:, 2] = 7  # a constant channel: std 1 (nothing to scale), not 0
    y = {s: rng.integers(0, 3, len(v)) for s, v in x.items()}
    path = str(tmp_path / "w.h5")
    with DatasetWriter(path, (3, 6, 5), "uint8", {s: len(v) for s, v in x.items()}, ["a", "b", "c"]) as w:
        for lo, hi in ((0, 1), (1, 10), (10, 23)):
            w.write("train", x["train"][lo:hi], y["train"][lo:hi])
        w.write("val", x["val"], y["val"])
        w.write("test", x["test"], y["test"])
        assert not os.path.exists(path)  # nothing visible before the block ends
    info = inspect(path)
    scaled = x["train"] / 255.0
    assert np.allclose(info.mean, scaled.mean(axis=(0, 2, 3)), atol=1e-12)
    assert np.allclose(info.std[:2], scaled.std(axis=(0, 2, 3))[:2], atol=1e-12) and info.std[2] == 1.0
    with h5py.File(path) as f:
        for s in x:
            assert np.array_equal(f[s]["images"][...], x[s]) and np.array_equal(f[s]["labels"][...], y[s])


def test_float_statistics_are_in_stored_units(tmp_path):
    rng = np.random.default_rng(2)
    splits = {s: (rng.normal(-500, 300, (n, 1, 4, 4, 4)).astype(np.float32), rng.integers(0, 2, n))
              for s, n in (("train", 9), ("val", 3), ("test", 3))}
    info = inspect(write_dataset(str(tmp_path / "f.h5"), splits, block=2))
    assert info.mean[0] == pytest.approx(float(splits["train"][0].astype(np.float64).mean()), rel=1e-9)
    assert info.std[0] == pytest.approx(float(splits["train"][0].astype(np.float64).std()), rel=1e-9)


@pytest.mark.parametrize("change,message", [
    (lambda s: s["train"][0].__setitem__((2, 0, 0, 0), np.nan), "image 2 holds NaN"),
    (lambda s: s.pop("test"), "split 'test' is missing"),
    (lambda s: s.__setitem__("val", (np.zeros((2, 1, 5, 4), np.float32), np.zeros(2, int))), "one image shape"),
    (lambda s: s.__setitem__("val", (np.zeros((2, 1, 4, 4), np.float32), np.array([0, 7]))), "labels out of range"),
    (lambda s: s.__setitem__("val", (np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 3), int))), "labels must be"),
])
def test_write_dataset_refuses_bad_arrays_and_writes_nothing(tmp_path, change, message):
    splits = {s: (np.ones((3, 1, 4, 4), np.float32), np.array([0, 1, 1])) for s in ("train", "val", "test")}
    change(splits)
    with pytest.raises(DataError, match=message):
        write_dataset(str(tmp_path / "bad.h5"), splits, classes=["a", "b"])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("attrs,message", [
    ({"channel_mean": [0.5, 0.5]}, "one per channel"),
    ({"channel_std": [0.0]}, "finite and > 0"),
    ({"channel_mean": [np.nan]}, "finite"),
])
def test_inspect_refuses_bad_channel_statistics(tmp_path, attrs, message):
    path = make_tiny_dataset(tmp_path / "t.h5", n=(20, 8, 8), size=12, num_classes=3)
    with h5py.File(path, "a") as f:
        f.attrs.update(attrs)
    with pytest.raises(DataError, match=message):
        inspect(path)


def test_write_subset_takes_the_first_samples_of_each_split(tmp_path, tiny):
    from mpidd.writer import write_subset
    out = write_subset(tiny, str(tmp_path / "sub.h5"), {"train": 100, "val": 10, "test": 1000})
    info, whole = inspect(out), inspect(tiny)
    assert info.sizes == {"train": 100, "val": 10, "test": whole.sizes["test"]}  # test: all it has
    assert info.classes == whole.classes and info.mean is not None
    with h5py.File(out) as f, h5py.File(tiny) as g:
        assert np.array_equal(f["train/images"][...], g["train/images"][:100])
        assert np.array_equal(f["val/labels"][...], g["val/labels"][:10])
    x = h5py.File(out)["train/images"][...] / 255.0
    assert np.allclose(info.mean, x.mean(axis=(0, 2, 3)), atol=1e-6)  # its own statistics


# ---- dense targets (--task segment | regress) ----------------------------------------------------
def dense_splits(kind, n=6, shape=(8, 8), seed=0):
    """{split: (images, None, targets)}: masks (n, *shape) in 0..2 or fields (n, 2, *shape)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "val", "test"):
        x = rng.random((n, 1) + shape).astype(np.float32)
        t = np.digitize(x[:, 0], [0.3, 0.7]) if kind == "mask" else np.stack([x[:, 0], -x[:, 0]], 1)
        out[split] = (x, None, t)
    return out


@pytest.mark.parametrize("kind,shape", [("mask", (8, 8)), ("field", (8, 8)), ("mask", (4, 6, 8)),
                                        ("field", (4, 6, 8))])
def test_dense_targets_written_inspected_and_read_by_box(tmp_path, kind, shape):
    from mpidd.data import load_targets
    splits = dense_splits(kind, shape=shape)
    path = write_dataset(tmp_path / "d.h5", splits, target_classes=["cold", "warm", "hot"] if kind == "mask" else None)
    info = inspect(path, task="segment" if kind == "mask" else "regress")
    assert info.targets.kind == kind and info.classes == [] and info.num_classes == 0
    if kind == "mask":
        assert info.targets.shape == shape and info.targets.classes == ["cold", "warm", "hot"]
        assert info.targets.channels == 3
    else:
        assert info.targets.shape == (2,) + shape and info.targets.channels == 2
    box = tuple(slice(s // 2, s) for s in shape)
    t, nbytes = load_targets(path, "test", box, block=4, rows=(1, 5))
    want = splits["test"][2][1:5][(slice(None),) * (1 if kind == "mask" else 2) + box]
    assert np.array_equal(t, want) and nbytes == t.nbytes
    with h5py.File(path) as f:
        assert "labels" not in f["train"] and f["train/targets"].chunks is not None


def test_dense_targets_refused_in_one_line(tmp_path):
    from mpidd.data import load_targets
    fields = dense_splits("field")
    path = write_dataset(tmp_path / "f.h5", fields)
    with pytest.raises(DataError, match="labels is missing .*--task segment or regress"):
        inspect(path)
    with pytest.raises(DataError, match="--task segment needs masks"):
        inspect(path, task="segment")
    plain = make_tiny_dataset(tmp_path / "t.h5", n=(8, 4, 4), size=8, num_classes=2)
    with pytest.raises(DataError, match="--task regress needs .*targets"):
        inspect(plain, task="regress")
    bad = dict(fields)
    x, _, t = bad["val"]
    bad["val"] = (x, None, t[:, :, :4])  # a target smaller than its image
    with pytest.raises(DataError, match="targets of shape"):
        write_dataset(tmp_path / "b.h5", bad)
    nan = dict(fields)
    t = fields["test"][2].copy()
    t[3, 1, 2, 2] = np.nan
    nan["test"] = (fields["test"][0], None, t)
    with pytest.raises(DataError, match="target 3 holds NaN"):
        write_dataset(tmp_path / "n.h5", nan)
    masks = dense_splits("mask")
    with pytest.raises(DataError, match="masks out of range"):
        write_dataset(tmp_path / "m.h5", masks, target_classes=["a", "b"])
    # files written by others: the same refusals on reading
    path = write_dataset(tmp_path / "m.h5", masks)
    with h5py.File(path, "r+") as f:
        f["val/targets"][2, 5, 5] = 7
        del f["test/targets"]
        f["test"].create_dataset("targets", data=np.zeros((6, 8, 7), np.int64))
    with pytest.raises(DataError, match=r"/test/targets is int64\(8, 7\) but /train/targets int64\(8, 8\)"):
        inspect(path, task="segment")
    with h5py.File(path, "r+") as f:
        for split in ("train", "val"):
            del f[split]["targets"]
            f[split].create_dataset("targets", data=np.zeros((6, 8, 7), np.int64))
    with pytest.raises(DataError, match=r"/train/targets of shape \(8, 7\) and dtype int64 do not fit images"):
        inspect(path, task="segment")
    path = write_dataset(tmp_path / "m.h5", masks)
    with h5py.File(path, "r+") as f:
        f["val/targets"][2, 5, 5] = 7
    with pytest.raises(DataError, match="mask 2 holds class 7, outside 0..2"):
        load_targets(path, "val", (slice(4, 8), slice(4, 8)))
    path = write_dataset(tmp_path / "f2.h5", fields)
    with h5py.File(path, "r+") as f:
        f["train/targets"][4, 0, 1, 1] = np.inf
    with pytest.raises(DataError, match="target 4 holds NaN or inf"):
        load_targets(path, "train", (slice(0, 4), slice(0, 4)))
