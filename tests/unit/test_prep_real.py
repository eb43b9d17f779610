"""The real-data converters that need no source files: scikit-image's lfw_subset faces and the
RGB patches of the sample photographs shipped with scikit-image and scikit-learn."""

import h5py
import numpy as np
import pytest

from data_prep import lfw_subset, photos
from mpidd.data import inspect

pytest.importorskip("skimage")


def test_lfw_subset_through_the_numpy_path(tmp_path):
    from skimage.data import lfw_subset as source
    out = str(tmp_path / "lfw.h5")
    assert lfw_subset.main(["--out", out, "--val", "30", "--test", "50"]) == 0
    info = inspect(out)
    assert info.classes == ["face", "non-face"] and info.sizes == {"train": 120, "val": 30, "test": 50}
    faces = source().astype(np.float32)
    with h5py.File(out) as f:
        images = np.concatenate([f[s]["images"][:, 0] for s in ("train", "val", "test")])
        labels = np.concatenate([f[s]["labels"][...] for s in ("train", "val", "test")])
    # every source image once, with its label (the first 100 are the faces)
    order = [int(np.flatnonzero((faces == im).all(axis=(1, 2)))[0]) for im in images]
    assert sorted(order) == list(range(200)) and [int(i >= 100) for i in order] == labels.tolist()
    assert info.mean[0] == pytest.approx(float(images[:120].astype(np.float64).mean()), rel=1e-6)


def test_photo_patches_come_from_their_split_band():
    """A photo whose pixels hold their column: each split's patches lie inside its own band."""
    width = 200
    photo = np.broadcast_to(np.arange(width, dtype=np.uint8)[None, :, None], (40, width, 3))
    rng = np.random.default_rng(0)
    for split, (lo, hi) in photos.BANDS.items():
        p = photos.patches(photo, (lo, hi), 50, 8, rng)
        assert p.shape == (50, 3, 8, 8)
        assert p.min() >= int(lo * width) and p.max() < int(hi * width)


def test_photos_set(tmp_path):
    out = str(tmp_path / "photos.h5")
    assert photos.main(["--out", out, "--size", "16", "--train", "5", "--val", "2", "--test", "3"]) == 0
    info = inspect(out)
    assert info.image_shape == (3, 16, 16) and info.num_classes == 8 and len(info.mean) == 3
    assert info.sizes == {"train": 40, "val": 16, "test": 24}
    with h5py.File(out) as f:
        assert f["test/labels"][...].tolist() == [k for k in range(8) for _ in range(3)]
        assert "by construction" in f.attrs["labels"]
        x = f["train/images"][...] / 255.0
    assert np.allclose(info.std, x.std(axis=(0, 2, 3)))
    assert photos.main(["--out", str(tmp_path / "bad.h5"), "--size", "200"]) == 2
    assert not (tmp_path / "bad.h5").exists()
    tiled = str(tmp_path / "tiled.h5")  # --tile, common to the converters: the chunks' spatial edge
    assert photos.main(["--out", tiled, "--size", "16", "--train", "5", "--val", "2", "--test", "3",
                        "--tile", "4"]) == 0
    with h5py.File(tiled) as f, h5py.File(out) as g:
        assert f["train/images"].chunks[2:] == (4, 4) and g["train/images"].chunks[2:] == (8, 8)
        assert np.array_equal(f["train/images"][...], g["train/images"][...])
    assert photos.main(["--out", str(tmp_path / "t0.h5"), "--size", "16", "--tile", "0"]) == 2
