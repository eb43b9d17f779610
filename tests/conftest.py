"""Shared fixtures: tiny synthetic data sets in the mpidd layout (written by the tests)."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mpidd.writer import write_dataset  # noqa: E402

# mpirun for the end-to-end tests: CMake passes the MPI it found through the environment
MPIRUN = os.environ.get("MPIDD_MPIRUN") or os.path.join(os.path.dirname(sys.executable), "mpirun")


def launcher(np):
    """mpirun -n np, with the site's flags (CMake passes them through the environment)."""
    return [MPIRUN, os.environ.get("MPIDD_MPIEXEC_NUMPROC_FLAG") or "-n", str(np),
            *os.environ.get("MPIDD_MPIEXEC_PREFLAGS", "").split()]


def make_tiny_dataset(path, n=(192, 64, 64), size=16, num_classes=4, channels=1, dtype="uint8",
                      seed=0, classes=True, spatial=2, noise=0.3):
    """Class k = a fixed random template plus noise (the `noise` share of each pixel), so every
    subimage carries class information."""
    rng = np.random.default_rng(seed)
    shape = (channels,) + (size,) * spatial
    templates = rng.random((num_classes,) + shape)
    splits = {}
    for split, count in zip(("train", "val", "test"), n):
        labels = rng.integers(0, num_classes, count)
        images = (1 - noise) * templates[labels] + noise * rng.random((count,) + shape)
        images = (images * 255).astype(np.uint8) if dtype == "uint8" else images.astype(np.float32)
        splits[split] = (images, labels)
    names = [f"class{k}" for k in range(num_classes)] if classes else None
    return write_dataset(str(path), splits, classes=names)


@pytest.fixture(scope="session")
def tiny_h5(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny.h5")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The end-to-end tests' data: 512/128/128 images of 16x16, 4 classes."""
    return make_tiny_dataset(tmp_path_factory.mktemp("e2e") / "tiny.h5", n=(512, 128, 128))
