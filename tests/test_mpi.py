"""MPI behaviour, under mpirun:  mpirun -n 4 python -m pytest --with-mpi --only-mpi tests/test_mpi.py"""

import os

import h5py
import numpy as np
import pytest

from conftest import make_tiny_dataset


@pytest.fixture(scope="module")
def comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.fixture(scope="module")
def shared_h5(comm):
    """One tiny file, written by rank 0, read by every rank. (Not tmp_path_factory: each
    rank's pytest would number and clean up the same base directory concurrently.)"""
    import shutil
    import tempfile
    path = None
    if comm.rank == 0:
        path = make_tiny_dataset(os.path.join(tempfile.mkdtemp(prefix="mpidd-mpi-"), "tiny.h5"),
                                 n=(90, 30, 30), size=16)
    path = comm.bcast(path, root=0)
    yield path
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(os.path.dirname(path))


@pytest.mark.mpi(min_size=1)
def test_gatherv_assembles_subdomain_order(comm):
    from mpidd.decomposition import subdomains_of_rank
    from mpidd.parallel import gather_probabilities
    N, n, K = 6, 5, 3

    def probs(i):  # a value that names (subdomain, sample, class)
        return (100 * i + 10 * np.arange(n)[:, None] + np.arange(K)[None, :]).astype(np.float32)

    mine = subdomains_of_rank(comm.rank, comm.size, N) if comm.size <= N else []
    out = gather_probabilities(comm, {i: probs(i) for i in mine}, N, n, K)
    if comm.rank == 0:
        expected = np.concatenate([probs(i) for i in range(N)], axis=1)
        assert out.shape == (n, N * K)
        assert np.array_equal(out, expected)
    else:
        assert out is None


@pytest.mark.mpi(min_size=1)
def test_each_rank_reads_only_its_box(comm, shared_h5, monkeypatch):
    from mpidd import data
    from mpidd.decomposition import Decomposition, subdomains_of_rank
    dec = Decomposition((16, 16), (2, 2), 1)
    reads = []
    original = h5py.Dataset.__getitem__

    def recording(self, key):
        reads.append((self.name, key))
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    for i in subdomains_of_rank(comm.rank, comm.size, 4) if comm.size <= 4 else []:
        box = dec.slices(i)
        reads.clear()
        x, y, nbytes = data.load_split(shared_h5, "train", box, block=32)
        image_reads = [k for name, k in reads if name.endswith("images")]
        assert len(image_reads) == 3  # 90 samples in blocks of 32
        for key in image_reads:
            assert all(k.start >= b.start and k.stop <= b.stop for k, b in zip(key[2:], box)), (i, key)
        monkeypatch.setattr(h5py.Dataset, "__getitem__", original)
        with h5py.File(shared_h5, "r") as f:
            assert np.array_equal(x, f["train/images"][(slice(None), slice(None)) + box])
        monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
        assert nbytes == 90 * 10 * 10 + 90 * 8


@pytest.mark.mpi(min_size=1)
def test_agree_spreads_one_ranks_error(comm):
    from mpidd.parallel import agree
    assert agree(comm, None) is None
    last = comm.size - 1
    failed = agree(comm, "bad box" if comm.rank == last else None)
    assert failed == (last, "bad box")


@pytest.mark.mpi(min_size=2)
def test_sleepy_barrier_waits_for_the_slowest_rank(comm):
    import time
    from mpidd.parallel import sleepy_barrier
    start = time.perf_counter()
    if comm.rank == 1:
        time.sleep(0.3)
    c0 = time.process_time()
    sleepy_barrier(comm)
    waited, cpu = time.perf_counter() - start, time.process_time() - c0
    assert waited >= 0.29
    if comm.rank == 0:
        assert cpu < 0.15  # slept rather than spun while rank 1 was busy


@pytest.mark.mpi(min_size=1)
def test_default_threads_divides_cores_among_node_ranks(comm):
    from mpidd.parallel import default_threads
    threads = default_threads(comm)
    cores = len(os.sched_getaffinity(0))
    assert threads == max(1, cores // comm.size)  # all ranks of these tests share one node


@pytest.mark.mpi(min_size=1)
def test_training_path_reads_only_the_ranks_boxes(comm, shared_h5, monkeypatch):
    """mpidd.train's own load phase, recorded at the h5py level."""
    from types import SimpleNamespace

    from mpidd.decomposition import Decomposition, subdomains_of_rank
    from mpidd.train import Phases, load_local_data
    dec = Decomposition((16, 16), (2, 2), 2)
    mine = subdomains_of_rank(comm.rank, comm.size, 4) if comm.size <= 4 else []
    reads = []
    original = h5py.Dataset.__getitem__
    monkeypatch.setattr(h5py.Dataset, "__getitem__",
                        lambda self, key: reads.append((self.name, key)) or original(self, key))
    args = SimpleNamespace(data=shared_h5, read_block=40)
    subsets, nbytes = load_local_data(args, {"decomposition": dec}, mine, Phases())
    boxes = [dec.slices(i) for i in mine]
    image_reads = [k for name, k in reads if name.endswith("images")]
    assert len(image_reads) == len(mine) * (3 + 1 + 1)  # 90 train in blocks of 40, 30 val, 30 test
    for key in image_reads:
        assert any(all(k.start >= b.start and k.stop <= b.stop for k, b in zip(key[2:], box)) for box in boxes)
    assert sorted(subsets) == mine
    assert nbytes == len(mine) * (150 * 12 * 12 + 150 * 8)
