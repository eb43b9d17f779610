"""data_prep.image_folder and data_prep.nifti on small files written here in the real formats
(PNG, JPEG, BMP with Pillow; NIfTI with nibabel): exact values, labels, classes, statistics, and
the one-line refusals that leave no file."""

import os
import subprocess
import sys

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from data_prep import image_folder, nifti
from mpidd.data import SPLITS, inspect

FLIP_X = np.diag([-1.0, 1.0, 1.0, 1.0])  # a left-right flipped (LAS) orientation


def read(path):
    with h5py.File(path, "r") as f:
        data = {s: (f[s]["images"][...], f[s]["labels"][...]) for s in SPLITS}
        attrs = dict(f.attrs)
    return data, attrs


def save_image(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def random_rgb(rng, h=5, w=6):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def chw(a):
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def check_stats(data, attrs):
    """channel_mean / channel_std: numpy over the training split (uint8 in units of /255)."""
    x = data["train"][0].astype(np.float64)
    if data["train"][0].dtype == np.uint8:
        x /= 255
    axes = (0,) + tuple(range(2, x.ndim))
    np.testing.assert_allclose(attrs["channel_mean"], x.mean(axis=axes), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(attrs["channel_std"], x.std(axis=axes), rtol=1e-7, atol=1e-12)


def check_samples(data, expected):
    """Every stored (image, label) is one of `expected` {image bytes: label}, each exactly once."""
    seen = []
    for split in SPLITS:
        images, labels = data[split]
        assert labels.dtype == np.int64 and len(images) == len(labels) >= 1
        for x, y in zip(images, labels):
            assert expected.get(x.tobytes()) == y
            seen.append(x.tobytes())
    assert sorted(seen) == sorted(expected)


def check_refused(capsys, main, argv, out, phrase):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and phrase in err, err
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(os.path.dirname(out)) if f.endswith(".tmp")]


# ---------------------------------------------------------------- image_folder


def test_png_bmp_exact(tmp_path):
    rng = np.random.default_rng(0)
    root, expected = tmp_path / "imgs", {}
    for label, cls in enumerate(["ant", "bee", "cat"]):
        for k in range(4):
            a = random_rgb(rng)
            suffix = [".png", ".bmp", ".PNG", ".Bmp"][k]
            save_image(str(root / cls / f"{k}{suffix}"), a)
            expected[chw(a).tobytes()] = label
    save_image(str(root / "bee" / "sub" / "deep.png"), a := random_rgb(rng))  # searched recursively
    expected[chw(a).tobytes()] = 1
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / "ant" / ".hidden.png").write_bytes(b"garbage: ignored because hidden")
    (root / ".cache").mkdir()  # a hidden folder is no class
    (root / "README.md").write_text("files beside the class folders are ignored")
    out = str(tmp_path / "out" / "x.h5")
    assert image_folder.main([str(root), "--out", out, "--val", "0.2", "--test", "0.2"]) == 0
    data, attrs = read(out)
    assert list(attrs["classes"]) == ["ant", "bee", "cat"]
    assert {s: len(data[s][1]) for s in SPLITS} == {"train": 7, "val": 3, "test": 3}  # round(0.2 * 13) = 3
    assert data["train"][0].dtype == np.uint8 and data["train"][0].shape[1:] == (3, 5, 6)
    check_samples(data, expected)
    check_stats(data, attrs)
    info = inspect(out)
    assert info.classes == ["ant", "bee", "cat"] and info.image_shape == (3, 5, 6)
    # the split is seeded: the same seed gives the same file, another seed another split
    again = str(tmp_path / "out" / "again.h5")
    assert image_folder.main([str(root), "--out", again, "--val", "0.2", "--test", "0.2"]) == 0
    assert all(np.array_equal(read(again)[0][s][0], data[s][0]) for s in SPLITS)
    other = str(tmp_path / "out" / "other.h5")
    assert image_folder.main([str(root), "--out", other, "--val", "0.2", "--test", "0.2", "--seed", "1"]) == 0
    assert not all(np.array_equal(read(other)[0][s][0], data[s][0]) for s in SPLITS)


def test_folder_files_are_written_in_a_mixed_class_order(tmp_path):
    """Class folders list their files class by class; the file must not (--shuffle blocks mixes
    only a few chunk rows): every split in a seeded random order, the same for the same seed."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for cls in ("a", "b", "c", "d"):
        for k in range(10):
            save_image(str(root / cls / f"{k}.png"), random_rgb(rng))
    outs = [str(tmp_path / f"{k}.h5") for k in range(2)]
    for out in outs:
        assert image_folder.main([str(root), "--out", out, "--val", "0.1", "--test", "0.1"]) == 0
    labels = [read(out)[0]["train"][1] for out in outs]
    assert np.array_equal(labels[0], labels[1])  # seeded
    assert np.any(np.diff(labels[0]) < 0)  # not in class order: a later class before an earlier one
    assert sorted(labels[0].tolist()) != labels[0].tolist()


def test_jpeg_against_pillow_decode(tmp_path):
    rng = np.random.default_rng(1)
    root, expected = tmp_path / "jpg", {}
    for label, cls in enumerate(["no", "yes"]):
        for k in range(3):
            path = str(root / cls / f"{k}.{'jpeg' if k else 'JPG'}")
            save_image(path, random_rgb(rng, 8, 8))
            decoded = np.asarray(Image.open(path).convert("RGB"))  # JPEG is lossy: compare with its decode
            expected[chw(decoded).tobytes()] = label
    out = str(tmp_path / "jpg.h5")
    assert image_folder.main([str(root), "--out", out, "--val", "0.1", "--test", "0.1"]) == 0
    data, attrs = read(out)
    assert {s: len(data[s][1]) for s in SPLITS} == {"train": 4, "val": 1, "test": 1}  # at least 1 each
    check_samples(data, expected)
    check_stats(data, attrs)


def test_gray(tmp_path):
    rng = np.random.default_rng(2)
    root, expected = tmp_path / "g", {}
    for label, cls in enumerate(["a", "b"]):
        for k in range(3):
            path = save_image(str(root / cls / f"{k}.png"), random_rgb(rng))
            expected[chw(np.asarray(Image.open(path).convert("L"))).tobytes()] = label
    path = save_image(str(root / "b" / "grey.pgm"), g := rng.integers(0, 256, (5, 6), dtype=np.uint8))
    expected[chw(g).tobytes()] = 1  # an L image stays as it is
    out = str(tmp_path / "g.h5")
    assert image_folder.main([str(root), "--out", out, "--color", "gray"]) == 0
    data, attrs = read(out)
    assert data["train"][0].shape[1:] == (1, 5, 6)
    check_samples(data, expected)
    check_stats(data, attrs)


def test_split_folders(tmp_path):
    """train/ and val/ are used as they are; test/ is missing, so it is drawn from train/."""
    rng = np.random.default_rng(3)
    root, files = tmp_path / "s", {"train": {}, "val": {}}
    for split, per_class in (("train", 5), ("val", 2)):
        for label, cls in enumerate(["cat", "dog", "owl"]):
            if split == "val" and cls == "owl":
                continue  # a class may be absent from val/
            for k in range(per_class):
                save_image(str(root / split / cls / f"{k}.png"), a := random_rgb(rng))
                files[split][chw(a).tobytes()] = label
    out = str(tmp_path / "s.h5")
    assert image_folder.main([str(root), "--out", out, "--test", "0.2", "--val", "0.5"]) == 0
    data, attrs = read(out)
    assert list(attrs["classes"]) == ["cat", "dog", "owl"]
    assert {s: len(data[s][1]) for s in SPLITS} == {"train": 12, "val": 4, "test": 3}  # --val is not used
    assert sorted(x.tobytes() for x in data["val"][0]) == sorted(files["val"])
    assert [files["val"][x.tobytes()] for x in data["val"][0]] == list(data["val"][1])
    seen = [x.tobytes() for s in ("train", "test") for x in data[s][0]]
    assert sorted(seen) == sorted(files["train"])
    assert all(files["train"][x.tobytes()] == y for s in ("train", "test") for x, y in zip(*data[s]))
    check_stats(data, attrs)

    # with test/ as well, every split comes from its folder
    for cls in ["cat", "owl"]:
        save_image(str(root / "test" / cls / "t.bmp"), random_rgb(rng))
    assert image_folder.main([str(root), "--out", out]) == 0
    assert {s: len(read(out)[0][s][1]) for s in SPLITS} == {"train": 15, "val": 4, "test": 2}


def test_resize_bicubic(tmp_path):
    rng = np.random.default_rng(4)
    root, expected = tmp_path / "r", {}
    for label, cls in enumerate(["a", "b"]):
        for k, (h, w) in enumerate([(5, 6), (9, 4), (4, 6)]):  # (4, 6) already has the size: kept as is
            path = save_image(str(root / cls / f"{k}.png"), random_rgb(rng, h, w))
            im = Image.open(path).convert("RGB")
            if im.size != (6, 4):
                im = im.resize((6, 4), Image.Resampling.BICUBIC)
            expected[chw(np.asarray(im)).tobytes()] = label
    out = str(tmp_path / "r.h5")
    assert image_folder.main([str(root), "--out", out, "--size", "4x6"]) == 0  # H x W
    data, attrs = read(out)
    assert data["train"][0].shape[1:] == (3, 4, 6)
    check_samples(data, expected)


def image_tree(root, broken=None):
    """Two classes of two 5x6 PNGs; `broken(root)` then spoils it."""
    rng = np.random.default_rng(5)
    for cls in ("a", "b"):
        for k in range(2):
            save_image(str(root / cls / f"{k}.png"), random_rgb(rng))
    if broken:
        broken(root)
    return root


def truncate(path):
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:len(raw) // 2])


FOLDER_REFUSALS = {
    "missing root": (lambda r: None, [], "does not exist"),
    "no class folders": (lambda r: (r.mkdir(), (r / "x.png").write_bytes(b"")), [], "no class folders"),
    "empty class": (lambda r: (image_tree(r), (r / "c" / "sub").mkdir(parents=True),
                               (r / "c" / "notes.txt").write_text("")), [], os.sep + "c holds no .png"),
    "corrupt image": (lambda r: image_tree(r, lambda r: (r / "b" / "9.png").write_bytes(b"not a png")),
                      [], "9.png: not a readable image"),
    "truncated image": (lambda r: image_tree(r, lambda r: truncate(r / "a" / "1.png")), [],
                        "1.png: not a readable image"),
    "mixed sizes": (lambda r: image_tree(r, lambda r: save_image(str(r / "b" / "2.png"),
                                                                 np.zeros((7, 7, 3), np.uint8))),
                    [], "pass --size"),
    "one class": (lambda r: save_image(str(r / "only" / "0.png"), np.zeros((2, 2), np.uint8)), [],
                  "at least 2 class"),
    "bad size": (image_tree, ["--size", "32by32"], "--size '32by32'"),
    "zero size": (image_tree, ["--size", "0x4"], "--size '0x4'"),
    "class not in train": (lambda r: (image_tree(r / "train"), image_tree(r / "val"),
                                      save_image(str(r / "val" / "new" / "0.png"), np.zeros((5, 6, 3), np.uint8))),
                           [], "'new' is in val/ but not in train/"),
    "bad fraction": (image_tree, ["--val", "1.5"], "--val 1.5"),
    "too few files": (image_tree, ["--val", "0.5", "--test", "0.5"], "4 training file(s) are too few"),
}


@pytest.mark.parametrize("case", FOLDER_REFUSALS)
def test_folder_refusals(tmp_path, capsys, case):
    make, extra, phrase = FOLDER_REFUSALS[case]
    root = tmp_path / "root"
    make(root)
    out = str(tmp_path / "out.h5")
    check_refused(capsys, image_folder.main, [str(root), "--out", out] + extra, out, phrase)


def test_folder_command_line(tmp_path):
    root = image_tree(tmp_path / "cli")
    out = str(tmp_path / "cli.h5")
    run = subprocess.run([sys.executable, "-m", "data_prep.image_folder", str(root), "--out", out,
                          "--val", "0.25", "--test", "0.25"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}: train 2, val 1, test 1" in run.stdout
    assert inspect(out).sizes == {"train": 2, "val": 1, "test": 1}
    bad = subprocess.run([sys.executable, "-m", "data_prep.image_folder", str(tmp_path / "nowhere"),
                          "--out", out + "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and not os.path.exists(out + "2")


# ---------------------------------------------------------------- nifti


def save_nifti(path, data, affine=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4) if affine is None else affine).to_filename(path)
    return path


def canonical(path):
    return nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32)


def test_nifti_canonical_roundtrip(tmp_path):
    rng = np.random.default_rng(6)
    root, expected = tmp_path / "vols", {}
    for label, cls in enumerate(["healthy", "tumour"]):
        for k in range(4):
            data = rng.normal(size=(4, 5, 6)).astype(np.float32) * 100
            if k == 3:
                data = data[..., None]  # (x, y, z, 1): squeezed
            path = save_nifti(str(root / cls / f"{k}.nii{'.gz' if k % 2 else ''}"), data,
                              FLIP_X if k < 2 else None)
            expected[canonical(path).reshape(1, 4, 5, 6).tobytes()] = label
    flipped = str(root / "healthy" / "0.nii")
    raw = np.asanyarray(nib.load(flipped).dataobj)
    np.testing.assert_array_equal(canonical(flipped), raw[::-1])  # the reorientation is not a no-op
    out = str(tmp_path / "v.h5")
    assert nifti.main([str(root), "--out", out, "--shape", "4x5x6"]) == 0
    data, attrs = read(out)
    assert list(attrs["classes"]) == ["healthy", "tumour"]
    assert data["train"][0].dtype == np.float32 and data["train"][0].shape[1:] == (1, 4, 5, 6)
    assert {s: len(data[s][1]) for s in SPLITS} == {"train": 6, "val": 1, "test": 1}
    check_samples(data, expected)  # exact: trilinear at the same shape is the identity
    check_stats(data, attrs)
    assert inspect(out).image_shape == (1, 4, 5, 6)


def test_interpolate_same_shape_is_identity():
    import torch
    import torch.nn.functional as F
    x = torch.from_numpy(np.random.default_rng(7).normal(size=(1, 1, 3, 7, 5)).astype(np.float32) * 1e3)
    assert torch.equal(F.interpolate(x, size=(3, 7, 5), mode="trilinear", align_corners=False), x)


def window_volume():
    """Values whose windowed * 255 are k + 0.25 (no rounding ties), and values beyond the window."""
    lo, hi = -1000.0, 400.0
    inside = lo + (hi - lo) * (np.round(np.linspace(0, 254, 56)) + 0.25) / 255
    return np.concatenate([inside, [-3000, -1000, 400, 2500]]).reshape(2, 5, 6), lo, hi


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_nifti_window(tmp_path, dtype):
    vol, lo, hi = window_volume()
    root = tmp_path / "ct"
    for label, cls in enumerate(["a", "b"]):
        for k in range(3):
            save_nifti(str(root / cls / f"{k}.nii.gz"), vol + 10 * k * label)
    out = str(tmp_path / "ct.h5")
    assert nifti.main([str(root), "--out", out, "--shape", "2x5x6", "--window", "-1000,400", "--dtype", dtype]) == 0
    data, attrs = read(out)
    assert data["train"][0].dtype == np.dtype(dtype)
    for split in SPLITS:
        for x, y in zip(*data[split]):
            if y == 0:
                windowed = np.clip((vol - lo) / (hi - lo), 0, 1)
                if dtype == "uint8":
                    np.testing.assert_array_equal(x[0], np.rint(255 * windowed))
                else:
                    np.testing.assert_allclose(x[0], windowed, atol=1e-6)
    x = np.concatenate([data[s][0] for s in SPLITS])
    assert x.min() == 0 and x.max() == (255 if dtype == "uint8" else 1)
    check_stats(data, attrs)


def test_nifti_resample(tmp_path):
    rng = np.random.default_rng(8)
    root = tmp_path / "rs"
    for label, cls in enumerate(["a", "b"]):
        for k in range(3):
            save_nifti(str(root / cls / f"{k}.nii"), rng.uniform(-50, 150, (8, 7, 9)), FLIP_X)
        save_nifti(str(root / cls / "const.nii"), np.full((6, 6, 6), 42.0))  # other shapes are resampled too
    out = str(tmp_path / "rs.h5")
    assert nifti.main([str(root), "--out", out, "--shape", "4x6x10", "--val", "0.2", "--test", "0.2"]) == 0
    data, attrs = read(out)
    x = np.concatenate([data[s][0] for s in SPLITS])
    assert x.shape == (8, 1, 4, 6, 10) and x.dtype == np.float32
    assert x.min() >= -50 and x.max() <= 150 and x.std() > 1  # trilinear stays within the values
    assert sum(np.all(v == np.float32(42)) for v in x) == 2  # a constant volume stays constant
    out8 = str(tmp_path / "rs8.h5")
    assert nifti.main([str(root), "--out", out8, "--shape", "3x3x3", "--window", "0,100", "--dtype", "uint8"]) == 0
    x8 = np.concatenate([read(out8)[0][s][0] for s in SPLITS])
    assert x8.shape == (8, 1, 3, 3, 3) and x8.dtype == np.uint8 and x8.max() > 200 and x8.min() < 50
    check_stats(data, attrs)


def volume_tree(root, broken=None):
    for cls in ("a", "b"):
        for k in range(2):
            save_nifti(str(root / cls / f"{k}.nii"), np.ones((2, 3, 4)) * k)
    if broken:
        broken(root)
    return root


def nan_volume():
    v = np.zeros((2, 3, 4))
    v[1, 2, 3] = np.nan
    return v


NIFTI_REFUSALS = {
    "missing root": (lambda r: None, [], "does not exist"),
    "no class folders": (lambda r: save_nifti(str(r / "x.nii"), np.zeros((2, 2, 2))), [], "no class folders"),
    "empty class": (lambda r: volume_tree(r, lambda r: (r / "c").mkdir()), [], "holds no .nii/.nii.gz"),
    "one class": (lambda r: save_nifti(str(r / "a" / "x.nii"), np.zeros((2, 3, 4))), [], "at least 2 class"),
    "unreadable": (lambda r: volume_tree(r, lambda r: (r / "b" / "bad.nii.gz").write_bytes(b"garbage")), [],
                   "bad.nii.gz: not a readable NIfTI"),
    "truncated": (lambda r: volume_tree(r, lambda r: truncate(r / "a" / "1.nii")), [], "1.nii: not a readable NIfTI"),
    "2-D": (lambda r: volume_tree(r, lambda r: save_nifti(str(r / "a" / "flat.nii"), np.zeros((2, 3)))), [],
            "expected 3 dimensions"),
    "4-D": (lambda r: volume_tree(r, lambda r: save_nifti(str(r / "b" / "t.nii"), np.zeros((2, 3, 4, 2)))), [],
            "(2, 3, 4, 2); expected 3 dimensions"),
    "NaN": (lambda r: volume_tree(r, lambda r: save_nifti(str(r / "b" / "nan.nii"), nan_volume())), [],
            "nan.nii: the volume holds NaN"),
    "bad shape": (volume_tree, ["--shape", "2x3"], "--shape '2x3'"),
    "bad shape text": (volume_tree, ["--shape", "ax3x4"], "--shape 'ax3x4'"),
    "bad window": (volume_tree, ["--window", "5,2"], "--window '5,2'"),
    "bad window text": (volume_tree, ["--window", "low,high"], "--window 'low,high'"),
    "window one value": (volume_tree, ["--window", "100"], "--window '100'"),
    "uint8 without window": (volume_tree, ["--dtype", "uint8"], "--dtype uint8 needs --window"),
}


@pytest.mark.parametrize("case", NIFTI_REFUSALS)
def test_nifti_refusals(tmp_path, capsys, case):
    make, extra, phrase = NIFTI_REFUSALS[case]
    root = tmp_path / "root"
    make(root)
    out = str(tmp_path / "out.h5")
    argv = [str(root), "--out", out] + (extra if "--shape" in extra else extra + ["--shape", "2x3x4"])
    check_refused(capsys, nifti.main, argv, out, phrase)


def test_ct_phantom_volumes(tmp_path, capsys):
    """data_prep.ct_phantom: uint8 volumes of --shape in one-sample chunks, seeded, four balanced
    lesion counts; the lungs are dark, and their density rises with the number of lesions."""
    from data_prep import ct_phantom
    from mpidd.data import inspect
    out = str(tmp_path / "ct.h5")
    assert ct_phantom.main(["--out", out, "--shape", "32x32x16", "--train", "60", "--val", "4", "--test", "4",
                            "--tile", "8"]) == 0
    info = inspect(out)
    assert info.image_shape == (1, 32, 32, 16) and info.dtype == "uint8" and info.classes == ct_phantom.CLASSES
    assert info.sizes == {"train": 60, "val": 4, "test": 4} and info.chunk_samples == 1
    with h5py.File(out, "r") as f:
        assert f["train/images"].chunks == (1, 1, 8, 8, 8)
        labels = f["train/labels"][...]
        assert sorted(set(labels.tolist())) == [0, 1, 2, 3]
    assert ct_phantom.main(["--out", str(tmp_path / "again.h5"), "--shape", "32x32x16", "--train", "60", "--val", "4",
                            "--test", "4", "--tile", "8"]) == 0
    with h5py.File(out, "r") as a, h5py.File(tmp_path / "again.h5", "r") as b:
        assert np.array_equal(a["train/images"][...], b["train/images"][...])  # seeded
    rng = np.random.default_rng(5)
    shape = (64, 64, 32)
    lung_hu = {}
    for k in range(4):
        vols = [ct_phantom.phantom(rng, shape, k) for _ in range(6)]
        lung_hu[k] = np.mean([v[(v > -1000) & (v < -500)].size for v in vols])  # lung voxels not covered
    assert lung_hu[0] > lung_hu[1] > lung_hu[2] > lung_hu[3]  # each lesion fills part of a lung
    assert ct_phantom.windowed(np.array([-2000.0, -1000.0, 400.0, 3000.0])).tolist() == [0, 0, 255, 255]
    assert ct_phantom.main(["--out", str(tmp_path / "bad.h5"), "--shape", "4x32x32"]) == 2
    assert "at least 8 voxels" in capsys.readouterr().err and not (tmp_path / "bad.h5").exists()


# ---------------------------------------------------------------- segmentation masks

def mask_tree(root, masks, n=6, h=5, w=6, seed=7):
    """n RGB images in ROOT (some in a subfolder, one JPEG) and their palette PNG masks of
    classes 0..2 at the same paths below MASKS; {image bytes (C, H, W): mask}."""
    rng = np.random.default_rng(seed)
    expected = {}
    for k in range(n):
        rel = os.path.join("sub" if k % 2 else "", f"{k}.{'jpg' if k == 5 else 'png'}")
        image = random_rgb(rng, h, w)
        save_image(str(root / rel), image)
        mask = rng.integers(0, 3, (h, w), dtype=np.uint8)
        os.makedirs(os.path.dirname(str(masks / rel)), exist_ok=True)
        im = Image.fromarray(mask, mode="P")
        im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)  # colours: the values stay indices
        im.save(str(masks / os.path.splitext(rel)[0]) + ".png")
        with Image.open(str(root / rel)) as stored:  # (the JPEG's decoded pixels)
            expected[chw(np.asarray(stored.convert("RGB"))).tobytes()] = mask
    return expected


def test_folder_masks_become_the_targets(tmp_path):
    root, masks = tmp_path / "images", tmp_path / "masks"
    expected = mask_tree(root, masks)
    out = str(tmp_path / "seg.h5")
    assert image_folder.main([str(root), "--masks", str(masks), "--mask-classes", "bg,red,green", "--out", out,
                              "--val", "0.2", "--test", "0.2"]) == 0
    info = inspect(out, task="segment")
    assert info.targets.kind == "mask" and info.targets.classes == ["bg", "red", "green"]
    seen = 0
    with h5py.File(out) as f:
        assert all("labels" not in f[s] for s in SPLITS)
        for s in SPLITS:
            for x, t in zip(f[s]["images"][...], f[s]["targets"][...]):
                np.testing.assert_array_equal(t, expected[x.tobytes()])  # each mask beside its own image
                seen += 1
    assert seen == 6
    # --size resizes the masks by nearest neighbour: still classes, never blends of them
    small = str(tmp_path / "small.h5")
    assert image_folder.main([str(root), "--masks", str(masks), "--out", small, "--size", "3x3"]) == 0
    with h5py.File(small) as f:
        t = f["train"]["targets"][...]
        assert t.shape[1:] == (3, 3) and set(np.unique(t)) <= {0, 1, 2}
    assert inspect(small, task="segment").targets.classes == ["0", "1", "2"]  # 0..the largest value


MASK_REFUSALS = {
    "missing mask": (lambda m: os.remove(m / "sub" / "3.png"), [], "no mask for"),
    "rgb mask": (lambda m: save_image(str(m / "0.png"), np.zeros((5, 6, 3), np.uint8)), [], "a RGB image"),
    "mask size": (lambda m: save_image(str(m / "0.png"), np.zeros((4, 6), np.uint8)), [], "a mask of 4x6"),
    "class outside": (lambda m: None, ["--mask-classes", "bg,red"], "is outside 0..1"),
    "classes without masks": (lambda m: None, ["NO_MASKS", "--mask-classes", "a,b"], "pass --masks"),
}


@pytest.mark.parametrize("case", MASK_REFUSALS)
def test_folder_mask_refusals(tmp_path, capsys, case):
    root, masks = tmp_path / "images", tmp_path / "masks"
    mask_tree(root, masks)
    edit, extra, phrase = MASK_REFUSALS[case]
    edit(masks)
    out = str(tmp_path / "out.h5")
    flags = ["--masks", str(masks)] if "NO_MASKS" not in extra else []
    check_refused(capsys, image_folder.main, [str(root), "--out", out, *flags, *[e for e in extra if e != "NO_MASKS"]],
                  out, phrase)


def test_nifti_label_volumes_become_the_targets(tmp_path, capsys):
    rng = np.random.default_rng(8)
    root, labels, expected = tmp_path / "vols", tmp_path / "labels", {}
    for k in range(5):
        data = rng.normal(size=(4, 4, 6)).astype(np.float32)
        label = rng.integers(0, 4, (4, 4, 6)).astype(np.float32)
        suffix = ".nii.gz" if k % 2 else ".nii"
        path = save_nifti(str(root / f"{k}{suffix}"), data, FLIP_X)
        lpath = save_nifti(str(labels / f"{k}{'.nii' if k % 2 else '.nii.gz'}"), label, FLIP_X)  # either suffix
        expected[canonical(path).reshape(1, 4, 4, 6).tobytes()] = canonical(lpath)
    out = str(tmp_path / "v.h5")
    assert nifti.main([str(root), "--masks", str(labels), "--out", out, "--shape", "4x4x6", "--val", "0.2",
                       "--test", "0.2"]) == 0
    assert inspect(out, task="segment").targets.classes == ["0", "1", "2", "3"]
    with h5py.File(out) as f:
        for s in SPLITS:
            for x, t in zip(f[s]["images"][...], f[s]["targets"][...]):
                np.testing.assert_array_equal(t, expected[x.tobytes()])  # reoriented as its volume
    # resampled by nearest neighbour: classes only
    assert nifti.main([str(root), "--masks", str(labels), "--out", str(tmp_path / "w.h5"), "--shape", "3x5x5"]) == 0
    with h5py.File(str(tmp_path / "w.h5")) as f:
        assert set(np.unique(f["train"]["targets"][...])) <= {0, 1, 2, 3}
    save_nifti(str(labels / "2.nii.gz"), np.full((4, 4, 6), 0.5, np.float32))
    check_refused(capsys, nifti.main, [str(root), "--masks", str(labels), "--out", str(tmp_path / "x.h5"),
                                       "--shape", "4x4x6"], str(tmp_path / "x.h5"), "this one fractions")
