"""data_prep.cifar and data_prep.medmnist on small files written here in the real formats:
every pixel and label round trips, the training split's channel statistics are right, and each
kind of bad input is refused with one line, exit code 2 and no output file."""

import os
import pickle
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT
from data_prep import cifar, medmnist

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def dump(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10(folder, per_batch=6, protocol=2, seed=0):
    """A cifar-10-batches-py folder; returns {"train": (data, labels), "test": (...)} as written."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    written = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        dump(os.path.join(folder, name), {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                                          b"filenames": [b"x.png"] * per_batch}, protocol)
        part = written["test" if name == "test_batch" else "train"]
        part[0].append(data)
        part[1].append(labels)
    dump(os.path.join(folder, "batches.meta"), {b"num_cases_per_batch": per_batch, b"num_vis": 3072,
                                                b"label_names": [n.encode() for n in CIFAR10_NAMES]}, protocol)
    return {s: (np.concatenate(d), np.concatenate(y)) for s, (d, y) in written.items()}


def write_cifar100(folder, n=(12, 6), seed=1):
    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    written = {}
    for name, count in zip(("train", "test"), n):
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        fine, coarse = rng.integers(0, 100, count), rng.integers(0, 20, count)
        dump(os.path.join(folder, name), {b"filenames": [b"x.png"] * count, b"batch_label": name.encode(),
                                          b"fine_labels": fine.tolist(), b"coarse_labels": coarse.tolist(),
                                          b"data": data})
        written[name] = (data, {"fine": fine, "coarse": coarse})
    dump(os.path.join(folder, "meta"), {b"fine_label_names": [f"fine{k}".encode() for k in range(100)],
                                        b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)]})
    return written


def check_stats(f):
    """channel_mean / channel_std are numpy's, over the train split, in the units mpidd trains on."""
    x = f["train/images"][...]
    x = x / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    assert np.allclose(f.attrs["channel_mean"], x.mean(axis=axes))
    assert np.allclose(f.attrs["channel_std"], x.std(axis=axes))


def assert_refused(rc, capsys, out, phrase):
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert phrase in err, err
    assert not os.path.exists(out)
    folder = os.path.dirname(out)
    assert not [n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if n.endswith(".tmp")]


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_round_trip(tmp_path, protocol):
    src = tmp_path / "cifar-10-batches-py"
    written = write_cifar10(src, protocol=protocol)
    out = str(tmp_path / "c10.h5")
    assert cifar.main([str(src), "--out", out, "--val", "8"]) == 0  # the cut falls inside batch 4
    data, labels = written["train"]
    images = data.reshape(-1, 3, 32, 32)
    with h5py.File(out, "r") as f:
        assert f["train/images"].dtype == np.uint8 and f["train/images"].shape == (22, 3, 32, 32)
        assert (f["train/images"][...] == images[:22]).all() and (f["train/labels"][...] == labels[:22]).all()
        assert (f["val/images"][...] == images[22:]).all() and (f["val/labels"][...] == labels[22:]).all()
        assert (f["test/images"][...] == written["test"][0].reshape(-1, 3, 32, 32)).all()
        assert (f["test/labels"][...] == written["test"][1]).all()
        assert list(f.attrs["classes"]) == CIFAR10_NAMES
        assert f.attrs["dataset"] == "cifar-10" and f.attrs["source"] == os.path.abspath(src)
        check_stats(f)
    # planes R, G, B: channel 0 of image 0 is its first 1024 bytes, row by row
    assert (images[0, 0, 0] == data[0, :32]).all() and (images[0, 2, 31] == data[0, -32:]).all()


@pytest.mark.parametrize("kind,count", [("fine", 100), ("coarse", 20)])
def test_cifar100_round_trip(tmp_path, kind, count):
    src = tmp_path / "cifar-100-python"
    written = write_cifar100(src)
    out = str(tmp_path / "c100.h5")
    args = [str(src), "--out", out, "--val", "3"] + (["--labels", kind] if kind == "coarse" else [])
    assert cifar.main(args) == 0
    (train, train_y), (test, test_y) = written["train"], written["test"]
    with h5py.File(out, "r") as f:
        assert (f["train/images"][...] == train[:9].reshape(-1, 3, 32, 32)).all()
        assert (f["val/images"][...] == train[9:].reshape(-1, 3, 32, 32)).all()
        assert (f["test/images"][...] == test.reshape(-1, 3, 32, 32)).all()
        assert (f["train/labels"][...] == train_y[kind][:9]).all()
        assert (f["val/labels"][...] == train_y[kind][9:]).all()
        assert (f["test/labels"][...] == test_y[kind]).all()
        assert list(f.attrs["classes"]) == [f"{kind}{k}" for k in range(count)]
        assert f.attrs["dataset"] == f"cifar-100 {kind}"
        check_stats(f)


def batch(folder, name="data_batch_2"):
    with open(os.path.join(folder, name), "rb") as f:
        return pickle.load(f, encoding="bytes")


def edit_batch(change, name="data_batch_2"):
    def edit(folder):
        b = batch(folder, name)
        change(b)
        dump(os.path.join(folder, name), b)
    return edit


def truncate(folder):
    path = os.path.join(folder, "data_batch_2")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


CIFAR_BAD = {
    "missing folder": (lambda d: os.rename(d, d + ".gone"), [], "is not a folder"),
    "neither layout": (lambda d: [os.remove(os.path.join(d, n)) for n in os.listdir(d)], [], "neither CIFAR-10"),
    "missing batch": (lambda d: os.remove(os.path.join(d, "data_batch_3")), [], "data_batch_3 is missing"),
    "missing meta": (lambda d: os.remove(os.path.join(d, "batches.meta")), [], "batches.meta is missing"),
    "truncated": (truncate, [], "is it truncated"),
    "not a pickle": (lambda d: open(os.path.join(d, "test_batch"), "w").write("hello\n"), [], "not a readable"),
    "unsafe pickle": (lambda d: dump(os.path.join(d, "data_batch_1"), {b"data": Evil()}), [], "refusing to load"),
    "wrong width": (edit_batch(lambda b: b.update({b"data": b[b"data"][:, :3000]})), [], "expected uint8 (n, 3072)"),
    "wrong rank": (edit_batch(lambda b: b.update({b"data": b[b"data"].reshape(-1, 3, 1024)})), [], "(n, 3072)"),
    "wrong dtype": (edit_batch(lambda b: b.update({b"data": b[b"data"].astype(np.float32)})), [], "float32"),
    "label count": (edit_batch(lambda b: b[b"labels"].pop()), [], "6 images but 5 labels"),
    "label range": (edit_batch(lambda b: b[b"labels"].__setitem__(0, 10)), [], "labels out of range"),
    "val zero": (lambda d: None, ["--val", "0"], "--val 0 must be between 1 and 29"),
    "val all": (lambda d: None, ["--val", "30"], "--val 30 must be between 1 and 29"),
    "coarse on cifar-10": (lambda d: None, ["--labels", "coarse"], "CIFAR-100 only"),
}


@pytest.mark.parametrize("case", list(CIFAR_BAD))
def test_cifar_refuses(tmp_path, capsys, case):
    change, extra, phrase = CIFAR_BAD[case]
    src = str(tmp_path / "cifar-10-batches-py")
    write_cifar10(src)
    change(src)
    out = str(tmp_path / "out" / "c10.h5")
    assert_refused(cifar.main([src, "--out", out] + extra), capsys, out, phrase)


def test_cifar_command_line(tmp_path):
    src = str(tmp_path / "cifar-10-batches-py")
    write_cifar10(src, per_batch=2)
    out = str(tmp_path / "c10.h5")
    cmd = [sys.executable, "-m", "data_prep.cifar", src, "--out", out, "--val", "3"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}: train 7, val 3, test 2" in run.stdout
    os.remove(out)
    os.remove(os.path.join(src, "data_batch_5"))
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith("python -m data_prep.cifar: error: ") and "data_batch_5 is missing" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not os.path.exists(out)


# ---------------------------------------------------------------- MedMNIST


def medmnist_arrays(kind, n=(10, 4, 5), seed=0):
    """{key: array} like a MedMNIST npz, and the (n, C, ...) images mpidd should store per split."""
    rng = np.random.default_rng(seed)
    shape = {"gray": (8, 6), "rgb": (8, 6, 3), "3d": (4, 8, 6), "3d-float": (4, 8, 6)}[kind]
    arrays, expected = {}, {}
    for split, count in zip(("train", "val", "test"), n):
        if kind == "3d-float":
            x = rng.normal(size=(count,) + shape)
        else:
            x = rng.integers(0, 256, (count,) + shape, dtype=np.uint8)
        y = rng.integers(0, 5, (count, 1), dtype=np.uint8) if kind != "gray" else rng.integers(0, 5, count)
        y[0] = 4  # K = 5 whatever the draw
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
        expected[split] = x.transpose(0, 3, 1, 2) if kind == "rgb" else x[:, None]
    return arrays, expected


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(medmnist, "BLOCK", 3)  # every split spans several blocks, the last one short


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
@pytest.mark.parametrize("kind", ["gray", "rgb", "3d", "3d-float"])
def test_medmnist_round_trip(tmp_path, small_blocks, kind, save):
    arrays, expected = medmnist_arrays(kind)
    src = str(tmp_path / "pathmnist.npz")
    save(src, **arrays)
    out = str(tmp_path / "m.h5")
    assert medmnist.main([src, "--out", out]) == 0
    with h5py.File(out, "r") as f:
        for split in ("train", "val", "test"):
            images = f[f"{split}/images"][...]
            assert images.dtype == (np.float32 if kind == "3d-float" else np.uint8)
            assert images.shape == expected[split].shape
            assert (images == expected[split].astype(images.dtype)).all()
            assert (f[f"{split}/labels"][...] == arrays[f"{split}_labels"].reshape(-1)).all()
        assert list(f.attrs["classes"]) == ["0", "1", "2", "3", "4"]
        assert f.attrs["layout"] == ("NCDHW" if kind.startswith("3d") else "NCHW")
        assert f.attrs["dataset"] == "pathmnist"
        check_stats(f)


def test_medmnist_3d_flag_and_classes(tmp_path):
    """A last axis of 3 is RGB unless --3d; --classes names the classes."""
    rng = np.random.default_rng(2)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.array([0, 1, 2, 1])
    src, out = str(tmp_path / "v.npz"), str(tmp_path / "v.h5")
    np.savez(src, **arrays)
    assert medmnist.main([src, "--out", out, "--classes", "a, b,c"]) == 0
    with h5py.File(out, "r") as f:
        assert f["train/images"].shape == (4, 3, 5, 6)
        assert list(f.attrs["classes"]) == ["a", "b", "c"]
    assert medmnist.main([src, "--out", out, "--3d"]) == 0
    with h5py.File(out, "r") as f:
        assert f["train/images"].shape == (4, 1, 5, 6, 3)
        assert (f["test/images"][...] == arrays["test_images"][:, None]).all()
        assert list(f.attrs["classes"]) == ["0", "1", "2"]


def with_key(key, make):
    def change(arrays):
        arrays[key] = make(arrays[key])
    return change


def drop(key):
    return lambda arrays: arrays.pop(key)


def nan_at(value):
    def change(arrays):
        for split in ("train", "val", "test"):
            arrays[f"{split}_images"] = arrays[f"{split}_images"].astype(np.float64)
        arrays["val_images"][2, 1, 1] = value
    return change


def negative(y):
    y = y.copy()
    y[1] = -1
    return y


MEDMNIST_BAD = {
    "missing key": (drop("val_labels"), [], "key 'val_labels' is missing"),
    "image rank": (with_key("train_images", lambda x: x.reshape(len(x), -1)), [], "train_images has shape (10, 48)"),
    "image rank 5": (with_key("train_images", lambda x: x[:, None, :, :, None]), [], "expected (n, H, W)"),
    "label rank": (with_key("test_labels", lambda y: y[:, None, None]), [], "test_labels has shape (5, 1, 1)"),
    "count mismatch": (with_key("test_labels", lambda y: y[:-1]), [], "4 labels in test_labels but 5 images"),
    "shape mismatch": (with_key("test_images", lambda x: x[:, :, :5]), [], "one image shape for all splits"),
    "multi-label": (with_key("train_labels", lambda y: np.stack([y, y, y], 1)), [],
                    "mpidd trains single-label classifiers"),
    "nan": (nan_at(np.nan), [], "val_images image 2 holds NaN or inf"),
    "inf": (nan_at(np.inf), [], "NaN or inf"),
    "float overflow": (nan_at(1e300), [], "NaN or inf"),
    "mixed pixel kinds": (with_key("test_images", lambda x: x.astype(np.float32)), [], "one kind of pixel"),
    "negative label": (with_key("val_labels", negative), [], "negative label -1"),
    "float labels": (with_key("val_labels", lambda y: y.astype(np.float32)), [], "expected integer class indices"),
    "fortran order": (with_key("train_images", np.asfortranarray), [], "Fortran order"),
    "too few classes": (lambda a: None, ["--classes", "a,b"], "need at least 5 names"),
    "empty class name": (lambda a: None, ["--classes", "a,,c,d,e"], "a class name is empty"),
}


@pytest.mark.parametrize("case", list(MEDMNIST_BAD))
def test_medmnist_refuses(tmp_path, capsys, small_blocks, case):
    change, extra, phrase = MEDMNIST_BAD[case]
    arrays, _ = medmnist_arrays("gray")
    change(arrays)
    src = str(tmp_path / "bad.npz")
    np.savez_compressed(src, **arrays)
    out = str(tmp_path / "out" / "m.h5")
    assert_refused(medmnist.main([src, "--out", out] + extra), capsys, out, phrase)


@pytest.mark.parametrize("content,phrase", [(None, "does not exist"), (b"not a zip\n", "not an npz (zip) file"),
                                            ("truncated", "not an npz (zip) file")])
def test_medmnist_refuses_file(tmp_path, capsys, content, phrase):
    src = str(tmp_path / "x.npz")
    if content == "truncated":
        np.savez(src, **medmnist_arrays("gray")[0])
        with open(src, "r+b") as f:
            f.truncate(os.path.getsize(src) - 100)  # the zip directory is at the end
    elif content is not None:
        with open(src, "wb") as f:
            f.write(content)
    out = str(tmp_path / "out" / "m.h5")
    assert_refused(medmnist.main([src, "--out", out]), capsys, out, phrase)
