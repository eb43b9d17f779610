"""mpidd.stream and the loops on streamed images (serial): a stream reads exactly what memory holds,
the blocks order reads each chunk row once an epoch, training on a stream equals training in memory."""

import h5py
import numpy as np
import pytest
import torch

from conftest import make_tiny_dataset
from mpidd import stream
from mpidd.data import DataError
from mpidd.writer import write_dataset
from mpidd.engine import Shard, TrainOptions, predict_proba, train_classifier
from mpidd.feed import epoch_order
from mpidd.models import CNNConfig, build_cnn

BOX = (slice(2, 10), slice(4, 16))


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    """The tiny data (192/64/64 images of 16x16), chunks of 32 samples: 6 blocks in train."""
    src = make_tiny_dataset(tmp_path_factory.mktemp("s") / "src.h5")
    with h5py.File(src, "r") as f:
        splits = {s: (f[s]["images"][...], f[s]["labels"][...]) for s in ("train", "val", "test")}
    return write_dataset(str(tmp_path_factory.mktemp("s") / "c32.h5"), splits, chunk_samples=32), splits


def test_a_stream_reads_what_the_same_indices_select_in_memory(chunked):
    path, splits = chunked
    images = splits["train"][0][(slice(None), slice(None)) + BOX]
    s = stream.BoxStream(path, "train", BOX)
    assert s.shape == images.shape and s.dtype == images.dtype and s.block == 32 and s.nbytes == images.nbytes
    rng = np.random.default_rng(0)
    for idx in (rng.permutation(192)[:50], np.arange(40, 90), np.array([5, 5, 3]), np.array([], dtype=int)):
        assert np.array_equal(s[idx], images[idx])
    assert np.array_equal(s[10:20], images[10:20]) and np.array_equal(s[torch.tensor([7, 1])], images[[7, 1]])
    share = stream.BoxStream(path, "train", BOX, rows=range(64, 128))  # a data-parallel rank's share
    assert len(share) == 64 and np.array_equal(share[[0, 63, 5]], images[[64, 127, 69]])
    shard = share.subset(1, 3)  # every third of it, from the second (a width sub-network's shard)
    assert np.array_equal(shard[np.arange(len(shard))], images[64:128][1::3])
    with pytest.raises(IndexError):
        share[[64]]


def test_the_blocks_order_reads_each_chunk_row_once_an_epoch(chunked, monkeypatch):
    path, splits = chunked
    images = splits["train"][0][(slice(None), slice(None)) + BOX]
    order = epoch_order(192, torch.Generator().manual_seed(3), block=32, buffer=2)
    batches = [order[b:b + 20].numpy() for b in range(0, 192, 20)]
    s = stream.BoxStream(path, "train", BOX)
    got = list(s.iter_reads(batches))
    assert all(np.array_equal(g, images[b]) for g, b in zip(got, batches))
    assert s.stats.bytes_read == images.nbytes  # every sample once: whole blocks, each read one time
    exact = [torch.randperm(192, generator=torch.Generator().manual_seed(3))[b:b + 20].numpy()
             for b in range(0, 192, 20)]
    e = stream.BoxStream(path, "train", BOX)
    assert all(np.array_equal(g, images[b]) for g, b in zip(e.iter_reads(exact), exact))
    assert e.stats.bytes_read == images.nbytes  # every block held at once: still within the buffer
    monkeypatch.setattr(stream, "BLOCK_BUFFER_BYTES", 3 * 32 * images[0].nbytes)  # 3 blocks at most
    for order, reads in ((batches, images.nbytes), (exact, sum(map(len, exact)) * images[0].nbytes)):
        limited = stream.BoxStream(path, "train", BOX)
        assert all(np.array_equal(g, images[b]) for g, b in zip(limited.iter_reads(order), order))
        assert limited.stats.bytes_read == reads  # blocks order: as before; exact: each batch apart


def test_epoch_order(chunked):
    def order(block, buffer, seed=1, n=96):
        return epoch_order(n, torch.Generator().manual_seed(seed), block, buffer)
    assert torch.equal(order(1, 8), torch.randperm(96, generator=torch.Generator().manual_seed(1)))
    o = order(16, 2)
    assert (sorted(o.tolist()) == list(range(96)) and torch.equal(o, order(16, 2))
            and not torch.equal(o, order(16, 2, 2)))
    windows = [set((o[w:w + 32] // 16).tolist()) for w in (0, 32, 64)]  # each window: the samples of 2 whole blocks
    assert all(len(w) == 2 for w in windows) and set.union(*windows) == set(range(6))
    assert not torch.equal(o[:32].sort().values, o[:32])  # shuffled inside the window
    assert sorted(order(16, 3, n=100).tolist()) == list(range(100))  # a short last block


def test_the_prefetcher_hands_batches_in_order_counts_waits_and_raises_the_readers_error(chunked):
    path, splits = chunked
    s = stream.BoxStream(path, "val", BOX)
    batches = [np.arange(k, k + 8) for k in range(0, 64, 8)]
    p = s.batches(batches)
    for b in batches:
        assert np.array_equal(p.take(b), splits["val"][0][(b, slice(None)) + BOX])
    with pytest.raises(RuntimeError, match="more batches"):
        p.take(batches[0])
    p.close()
    assert s.stats.batches == 8 and s.stats.wait_s >= 0
    bad = s.batches([np.array([0, 1]), np.array([999])])
    bad.take([0, 1])
    with pytest.raises(IndexError):
        bad.take([999])
    bad.close()
    abandoned = s.batches(batches)  # an epoch stopped early: close ends the reader
    abandoned.take(batches[0])
    abandoned.close()
    assert not abandoned.thread.is_alive()


@pytest.mark.parametrize("block", [1, 32])
def test_training_on_a_stream_equals_training_in_memory(chunked, block):
    """The same weights, bit for bit, whatever holds the images (exact and blocks orders), also
    for a data-parallel share's bookkeeping (Shard start) and for inference."""
    path, splits = chunked
    (x, y), (xv, yv) = splits["train"], splits["val"]
    opts = TrainOptions(epochs=3, batch_size=16, lr=1e-2, shuffle_block=block, shuffle_buffer=2)
    weights, probs = [], []
    for source in ("memory", "stream"):
        torch.manual_seed(0)
        model = build_cnn(1, 4, (16, 16), CNNConfig(width=8, hidden=16))
        train = x if source == "memory" else stream.BoxStream(path, "train", (slice(0, 16), slice(0, 16)))
        val = xv if source == "memory" else stream.BoxStream(path, "val", (slice(0, 16), slice(0, 16)))
        history, _ = train_classifier(model, Shard(train, y), Shard(val, yv), opts, seed=4)
        weights.append([p.detach().clone() for p in model.parameters()])
        probs.append(predict_proba(model, val, batch_size=24))
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    assert np.array_equal(*probs) and history[-1]["val_acc"] > 0.5


def test_check_finite_names_the_first_bad_image_of_a_float_file(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 8, 8)).astype(np.float32)
    splits = {s: (x, rng.integers(0, 2, 40)) for s in ("train", "val", "test")}
    path = write_dataset(str(tmp_path / "f.h5"), splits, chunk_samples=8)
    s = stream.BoxStream(path, "val", (slice(4, 8), slice(4, 8)))
    assert stream.check_finite(s, block=16) == s.nbytes
    s.close()
    with h5py.File(path, "r+") as f:
        f["val"]["images"][27, 0, 6, 5] = np.nan
    assert stream.check_finite(stream.BoxStream(path, "val", (slice(0, 4), slice(0, 4)))) > 0  # not in this box
    with pytest.raises(DataError, match=r"/val/images: image 27 holds NaN or inf values"):
        stream.check_finite(stream.BoxStream(path, "val", (slice(4, 8), slice(4, 8)), rows=range(20, 40)), block=3)
    assert stream.check_finite(stream.BoxStream(make_tiny_dataset(tmp_path / "u.h5"), "train", BOX)) == 0  # uint8


def test_choose_access_and_the_memory_available():
    assert stream.choose_access("stream", 10, 10**12)[0] == "stream"
    assert stream.choose_access("memory", 10**12, 10)[0] == "memory"
    mode, why = stream.choose_access("auto", 2 * 2**20, 4 * 2**20)
    assert mode == "memory" and why == "share 2.0 MiB <= 0.5 x 4.0 MiB available to the rank"
    mode, why = stream.choose_access("auto", 2 * 2**20 + 1, 4 * 2**20)
    assert mode == "stream" and "> 0.5 x 4.0 MiB" in why
    assert stream.choose_access("auto", 5, None)[0] == "memory"
    with pytest.raises(ValueError):
        stream.choose_access("disk", 1, 1)
    available = stream.memory_available()
    assert available is None or 0 < available < 1 << 50
