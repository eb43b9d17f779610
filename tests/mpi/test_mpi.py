"""MPI behaviour, under mpirun:  mpirun -n 4 python -m pytest --with-mpi --only-mpi tests/mpi/test_mpi.py"""

import os

import h5py
import numpy as np
import pytest

from conftest import make_tiny_dataset


@pytest.fixture(scope="module", params=["world", "split"])
def comm(request):
    """Every test runs on COMM_WORLD and on a Split sub-communicator whose ranks are numbered
    backwards (4 ranks: two sub-communicators of 2, working at once), so that any hidden use of
    COMM_WORLD (its ranks, its root, its collectives) inside mpidd fails."""
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    if request.param == "world":
        yield world
        return
    size = world.Get_size()
    sub = world.Split(color=world.rank % 2 if size >= 4 else 0, key=size - world.rank)
    yield sub
    sub.Free()


@pytest.fixture(scope="module")
def shared_h5():
    """One tiny file, written by rank 0, read by every rank. (Not tmp_path_factory: each
    rank's pytest would number and clean up the same base directory concurrently.)"""
    import shutil
    import tempfile

    from mpi4py import MPI
    world = MPI.COMM_WORLD
    path = None
    if world.rank == 0:
        path = make_tiny_dataset(os.path.join(tempfile.mkdtemp(prefix="mpidd-mpi-"), "tiny.h5"),
                                 n=(90, 30, 30), size=16)
    path = world.bcast(path, root=0)
    yield path
    world.Barrier()
    if world.rank == 0:
        shutil.rmtree(os.path.dirname(path))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("round_rows", [None, 1, 2])
def test_gatherv_assembles_subdomain_order(comm, monkeypatch, round_rows):
    """Whole, then in rounds of 1 and 2 samples (a ragged last round)."""
    from mpidd.decomposition import subdomains_of_rank
    from mpidd.parallel import collectives, gather_probabilities
    N, n, K = 6, 5, 3
    if round_rows:
        monkeypatch.setattr(collectives, "GATHER_ROUND_BYTES", round_rows * N * K * 4)

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
def test_gather_refuses_samples_missing_or_sent_twice(comm):
    """Every rank sends subdomain 0 whole (twice over at 2+ ranks), nobody sends subdomain 1."""
    from mpidd.parallel import gather_probabilities
    n, K = 4, 2
    if comm.rank == 0:
        with pytest.raises(RuntimeError, match="subdomain 0" if comm.size > 1 else "subdomain 1"):
            gather_probabilities(comm, {0: np.zeros((n, K), np.float32)}, 2, n, K)
    else:
        assert gather_probabilities(comm, {0: np.zeros((n, K), np.float32)}, 2, n, K) is None


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
@pytest.mark.parametrize("access", ["memory", "stream"])
def test_training_path_reads_only_the_ranks_boxes(comm, shared_h5, monkeypatch, access):
    """mpidd.train's own load phase, recorded at the h5py level (streamed: the load reads only
    labels, and the streams read only the boxes, here through a whole inference pass)."""
    from types import SimpleNamespace

    from mpidd.decomposition import Decomposition, subdomains_of_rank
    from mpidd import data
    from mpidd.methods.context import PhaseTimer
    from mpidd.cli.phases import load_local_data
    dec = Decomposition((16, 16), (2, 2), 2)
    mine = subdomains_of_rank(comm.rank, comm.size, 4) if comm.size <= 4 else []
    reads = []
    original = h5py.Dataset.__getitem__
    monkeypatch.setattr(h5py.Dataset, "__getitem__",
                        lambda self, key: reads.append((self.name, key)) or original(self, key))
    from mpidd.stream import StreamStats
    run = SimpleNamespace(args=SimpleNamespace(data=shared_h5, read_block=40),
                          ctx=SimpleNamespace(mine=mine, group=None, timer=PhaseTimer()),
                          plan=SimpleNamespace(decomposition=dec, info=data.inspect(shared_h5)),
                          access=access, io=StreamStats())
    reads.clear()
    subsets, nbytes = load_local_data(run)
    boxes = [dec.slices(i) for i in mine]
    if access == "stream":  # uint8: nothing to check for NaN; the labels alone are read now
        assert not [k for name, k in reads if name.endswith("images")]
        assert nbytes == len(mine) * 150 * 8
        import torch
        from mpidd.engine import predict_proba
        from mpidd.models import CNNConfig, build_cnn
        model = build_cnn(1, 4, dec.subimage_shape, CNNConfig(width=4, hidden=8))
        for i in mine:
            for s in ("train", "val", "test"):
                with h5py.File(shared_h5, "r") as f:  # (unrecorded: the reference)
                    expected = original(f[s]["images"], (slice(None), slice(None)) + dec.slices(i))
                torch.manual_seed(0)
                assert np.array_equal(predict_proba(model, subsets[i][s].x, batch_size=32),
                                      predict_proba(model, expected, batch_size=32))
        image_reads = [k for name, k in reads if name.endswith("images")]
        assert len(image_reads) == len(mine) * 3  # each split in one block (one chunk row): 90, 30, 30 samples
        for key in image_reads:
            assert any(all(k.start >= b.start and k.stop <= b.stop for k, b in zip(key[2:], box)) for box in boxes)
        assert run.io.bytes_read == len(mine) * 150 * 12 * 12
        return
    image_reads = [k for name, k in reads if name.endswith("images")]
    assert len(image_reads) == len(mine) * (3 + 1 + 1)  # 90 train in blocks of 40, 30 val, 30 test
    for key in image_reads:
        assert any(all(k.start >= b.start and k.stop <= b.stop for k, b in zip(key[2:], box)) for box in boxes)
    assert sorted(subsets) == mine
    assert nbytes == len(mine) * (150 * 12 * 12 + 150 * 8)


def _coherent_problem(N=4, K=5, n=40, size=(8, 8), arch="vgg", dropout=0.0):
    """Data, labels and deterministic builders of every local CNN and the DNN."""
    import torch
    from mpidd.models import CNNConfig, CoarseDNN, build_cnn
    rng = np.random.default_rng(0)
    xs = {i: rng.integers(0, 256, (n, 1, *size), dtype=np.uint8) for i in range(N)}
    y = rng.integers(0, K, n)
    cfg = CNNConfig(arch=arch, width=4, hidden=8, blocks_per_stage=1, dropout=dropout)

    def local(i):
        torch.manual_seed(100 + i)
        return build_cnn(1, K, size, cfg, 0.75)

    def dnn():
        torch.manual_seed(7)
        return CoarseDNN(N * K, K, (16,), dropout)
    return xs, y, local, dnn


def _assembled_step(xs, y, local, dnn, N, idx, output, opts):
    """The reference: the assembled CNN-DNN in this process, plain autograd, one optimizer step.
    Returns (local CNNs, DNN, loss, the local CNNs' gradients, the DNN's gradients)."""
    import torch

    from mpidd.engine import make_optimizer, to_float
    ref_locals, ref_dnn = {i: local(i) for i in range(N)}, dnn()
    outs = [ref_locals[i](to_float(torch.as_tensor(xs[i])[idx])) for i in range(N)]
    if output == "probabilities":
        outs = [torch.softmax(o, dim=1) for o in outs]
    loss = torch.nn.functional.cross_entropy(ref_dnn(torch.cat(outs, dim=1)), torch.as_tensor(y)[idx])
    loss.backward()
    grads = {i: [p.grad.clone() for p in ref_locals[i].parameters()] for i in range(N)}
    dnn_grads = [p.grad.clone() for p in ref_dnn.parameters()]
    make_optimizer(torch.nn.ModuleList([*ref_locals.values(), ref_dnn]), opts).step()
    return ref_locals, ref_dnn, loss, grads, dnn_grads


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("output,arch", [("probabilities", "vgg"), ("logits", "vgg"), ("probabilities", "resnet")])
def test_coherent_step_equals_the_single_process_model(comm, output, arch):
    """One model-parallel step gives every rank the gradients, and after the optimizer step the
    parameters, of the assembled model (all local CNNs + DNN) trained in one process."""
    import torch
    from mpidd.coherent_model import coherent_step
    from mpidd.decomposition import subdomains_of_rank
    from mpidd.engine import TrainOptions, make_optimizer
    from mpidd.parallel import ModelParallelExchange
    torch.set_num_threads(1)
    N, K = 4, 5
    if comm.size > N:
        pytest.skip("more ranks than subdomains")
    xs, y, local, dnn = _coherent_problem(N, K, arch=arch)
    idx = torch.as_tensor([3, 17, 5, 0, 39, 22, 8, 11, 30, 2, 19, 27])
    opts = TrainOptions(lr=1e-2)

    ref_locals, ref_dnn, ref_loss, ref_grads, ref_dnn_grads = _assembled_step(xs, y, local, dnn, N, idx, output, opts)

    # model parallel: this rank's local CNNs (+ the DNN on rank 0)
    mine = subdomains_of_rank(comm.rank, comm.size, N)
    models = {i: local(i) for i in mine}
    coarse = dnn() if comm.rank == 0 else None
    exchange = ModelParallelExchange(comm, mine, N, K)
    optimizer = make_optimizer(torch.nn.ModuleList([*models.values(), *([coarse] if coarse else [])]), opts)
    result = coherent_step(models, coarse, {i: torch.as_tensor(xs[i]) for i in mine}, torch.as_tensor(y),
                           idx, exchange=exchange, output=output)
    optimizer.step()
    loss = result[0] / len(idx) if result is not None else None

    tol = dict(rtol=1e-4, atol=1e-6)
    for i in mine:
        for p, g in zip(models[i].parameters(), ref_grads[i]):
            assert p.grad is not None and g.abs().sum() > 0
            torch.testing.assert_close(p.grad, g, **tol)
        for p, q in zip(models[i].state_dict().values(), ref_locals[i].state_dict().values()):
            torch.testing.assert_close(p.float(), q.float(), **tol)  # parameters and BatchNorm statistics
    if comm.rank == 0:
        assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
        for p, g, q in zip(coarse.parameters(), ref_dnn_grads, ref_dnn.parameters()):
            torch.testing.assert_close(p.grad, g, **tol)
            torch.testing.assert_close(p.data, q.data, **tol)
    else:
        assert loss is None
    assert exchange.calls == 2 and exchange.bytes == 2 * len(idx) * len(mine) * K * 4


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_coherent_training_is_the_same_on_any_number_of_ranks(comm, dropout):
    """Two epochs of model-parallel training end with the parameters and accuracies that the
    single-process run (SerialExchange) reaches; with dropout too (every model draws its masks
    from a stream of its own, whichever rank runs it)."""
    import torch
    from mpidd.coherent_model import SerialExchange, evaluate_coherent, train_coherent
    from mpidd.decomposition import subdomains_of_rank
    from mpidd.engine import TrainOptions
    from mpidd.parallel import ModelParallelExchange
    torch.set_num_threads(1)
    N, K = 4, 5
    if comm.size > N:
        pytest.skip("more ranks than subdomains")
    xs, y, local, dnn = _coherent_problem(N, K, dropout=dropout)
    opts = TrainOptions(epochs=2, batch_size=16, lr=5e-3)
    val = {i: x[:24] for i, x in xs.items()}

    ref_locals, ref_dnn = {i: local(i) for i in range(N)}, dnn()
    ref_hist, _, _ = train_coherent(ref_locals, ref_dnn, xs, y, val, y[:24], opts, 11, exchange=SerialExchange())

    mine = subdomains_of_rank(comm.rank, comm.size, N)
    models, coarse = {i: local(i) for i in mine}, dnn() if comm.rank == 0 else None
    exchange = ModelParallelExchange(comm, mine, N, K)
    hist, _, timing = train_coherent(models, coarse, {i: xs[i] for i in mine}, y,
                                     {i: val[i] for i in mine}, y[:24], opts, 11, exchange=exchange)
    for i in mine:  # parameters and BatchNorm statistics
        for (name, p), q in zip(models[i].state_dict().items(), ref_locals[i].state_dict().values()):
            torch.testing.assert_close(p.float(), q.float(), rtol=1e-3, atol=1e-5, msg=lambda m: f"{i} {name}: {m}")
    if comm.rank == 0:
        for p, q in zip(coarse.parameters(), ref_dnn.parameters()):
            torch.testing.assert_close(p.data, q.data, rtol=1e-3, atol=1e-5)
    assert timing["steps"] == 2 * 3 and 0 <= timing["exchange_s"] <= timing["step_s"]
    result = evaluate_coherent(models, coarse, {i: xs[i] for i in mine}, y, exchange=exchange)
    if comm.rank == 0:
        assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in ref_hist], rel=1e-4)
        assert result[1] == pytest.approx(evaluate_coherent(ref_locals, ref_dnn, xs, y, exchange=SerialExchange())[1])
    else:
        assert result is None


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("round_rows", [None, 3])
def test_gather_of_data_parallel_shares(comm, monkeypatch, round_rows):
    """P = G*N: the G members of a subdomain each send their share of its samples (whole, and
    in rounds of 3 samples that cut across the shares)."""
    from mpidd.decomposition import layout
    from mpidd.parallel import DataParallelGroup, collectives, gather_probabilities
    N = 2 if comm.size % 2 == 0 else 1
    n, K = 7, 3
    if round_rows:
        monkeypatch.setattr(collectives, "GATHER_ROUND_BYTES", round_rows * N * K * 4)
    mine, replicas, member = layout(comm.rank, comm.size, N)
    group = DataParallelGroup(comm, color=mine[0], key=member)
    assert group.size == replicas and group.rank == member
    lo, hi = group.share(n)

    def probs(i, rows):
        return (100 * i + 10 * rows[:, None] + np.arange(K)[None, :]).astype(np.float32)
    out = gather_probabilities(comm, {i: probs(i, np.arange(lo, hi)) for i in mine}, N, n, K,
                               starts={i: lo for i in mine})
    if comm.rank == 0:
        assert np.array_equal(out, np.concatenate([probs(i, np.arange(n)) for i in range(N)], axis=1))
    group.comm.Free()


@pytest.mark.mpi(min_size=2)
def test_data_parallel_training_equals_one_process_on_the_whole_batch(comm):
    """Every rank of the group holds a share of the samples; two epochs of group training
    (gradients summed, BatchNorm statistics over the group) end where one process ends."""
    import torch
    from mpidd.engine import Shard, TrainOptions, evaluate, train_classifier
    from mpidd.seeds import derive_seed
    from mpidd.models import CNNConfig, build_cnn, group_batchnorm
    from mpidd.parallel import DataParallelGroup
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    n, K = 100, 3
    y = rng.integers(0, K, n)
    x = (rng.random((n, 1, 8, 8)) * 100 + y[:, None, None, None] * 60).astype(np.uint8)
    opts = TrainOptions(epochs=2, batch_size=16)
    seed = derive_seed(3, 0, 1)

    def model():
        torch.manual_seed(seed)
        return build_cnn(1, K, (8, 8), CNNConfig(width=4, hidden=8))
    reference = model()
    ref_history, _ = train_classifier(reference, (x, y), (x[:40], y[:40]), opts, seed)

    group = DataParallelGroup(comm, color=0, key=comm.rank)
    lo, hi = group.share(n)
    vlo, vhi = group.share(40)
    member = group_batchnorm(model(), group.allreduce)
    history, _ = train_classifier(member, Shard(x[lo:hi], y[lo:hi], lo, n), Shard(x[vlo:vhi], y[vlo:vhi], vlo, 40),
                                  opts, seed, group=group)
    for (name, p), q in zip(member.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(p.float(), q.float(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in ref_history], rel=1e-5)
    assert [h["val_acc"] for h in history] == pytest.approx([h["val_acc"] for h in ref_history], abs=1e-6)
    assert (evaluate(member, x[lo:hi], y[lo:hi], group=group, total=n)
            == pytest.approx(evaluate(reference, x, y), rel=1e-5))
    group.comm.Free()


@pytest.mark.mpi(min_size=1)
def test_a_signal_on_one_rank_stops_every_rank(comm):
    """The last rank gets SIGUSR1; every rank learns it by polling, and the phase boundary agrees."""
    import signal
    import time
    from mpidd.parallel import StopAgreement
    stopper = StopAgreement(comm)
    try:
        assert not stopper.sync()  # nobody stops: a boundary says so everywhere
        if comm.rank == comm.size - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not stopper.poll():  # a step boundary, over and over: the stop reaches every rank
            assert time.monotonic() < deadline, "the stop did not reach this rank"
            time.sleep(0.001)
        # the signalled rank names its signal; the root names where it came from, and tells the rest
        assert stopper.reason == ("SIGUSR1" if comm.rank == comm.size - 1 else f"SIGUSR1 on rank {comm.size - 1}")
        assert stopper.sync(stopping=True)
        stopper.barrier()
    finally:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        stopper.comm.Free()


@pytest.mark.mpi(min_size=2)
def test_a_rank_stopping_mid_phase_stops_ranks_waiting_at_the_boundary(comm):
    """Rank 0 stops between boundaries (as after its own poll) while the others wait at the
    next boundary: they learn the stop from that boundary's agreement."""
    import signal
    from mpidd.parallel import StopAgreement
    stopper = StopAgreement(comm)
    try:
        if comm.rank == 0:
            stopper.signal = signal.SIGTERM  # what the handler does
            assert stopper.poll()
            assert stopper.sync(stopping=True)
        else:
            assert stopper.sync()
            assert stopper.requested
        stopper.barrier()
    finally:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        stopper.comm.Free()


# --- adjoint tests of the autograd Functions over MPI: <F x, y> = <x, F* y> ---------------------

@pytest.mark.mpi(min_size=1)
def test_model_parallel_exchange_is_adjoint_to_its_backward(comm):
    """F: every rank's (B, m_r*K) local outputs -> (B, N*K) on the root (Gatherv); its backward
    must be F* (Scatterv of the root's columns), so <F x, y> on the root = sum over ranks <x_r, F* y>."""
    import torch
    from mpidd.decomposition import subdomains_of_rank
    from mpidd.parallel import ModelParallelExchange
    N, K, B = 5, 3, 7
    if comm.size > N:
        pytest.skip("more ranks than subdomains")
    mine = subdomains_of_rank(comm.rank, comm.size, N)
    exchange = ModelParallelExchange(comm, mine, N, K)
    g = torch.Generator().manual_seed(100 + comm.rank)
    x = torch.randn(B, len(mine) * K, generator=g, dtype=torch.float32, requires_grad=True)
    fx = exchange(x)
    y = torch.randn(B, N * K, generator=torch.Generator().manual_seed(7)) if comm.rank == 0 else torch.zeros_like(fx)
    torch.autograd.backward(fx, y)
    lhs = comm.bcast(float((fx.detach().double() * y.double()).sum()) if comm.rank == 0 else None, root=0)
    rhs = comm.allreduce(float((x.detach().double() * x.grad.double()).sum()))
    assert lhs == pytest.approx(rhs, rel=1e-6) and abs(lhs) > 1e-3


@pytest.mark.mpi(min_size=1)
def test_group_sum_is_adjoint_to_its_backward(comm):
    """F: (x_1..x_G) -> (s, ..., s), s = sum of x_r (each member gets the sum); F* sums too:
    sum_r <F(x)_r, y_r> = sum_r <x_r, F*(y)_r>."""
    import torch
    from mpidd.parallel import DataParallelGroup
    group = DataParallelGroup(comm, color=0, key=comm.rank)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(comm.rank), dtype=torch.float64,
                    requires_grad=True)
    y = torch.randn(4, 6, generator=torch.Generator().manual_seed(50 + comm.rank), dtype=torch.float64)
    fx = group.allreduce(x)
    torch.autograd.backward(fx, y)
    lhs = comm.allreduce(float((fx.detach() * y).sum()))
    rhs = comm.allreduce(float((x.detach() * x.grad).sum()))
    assert lhs == pytest.approx(rhs, rel=1e-12) and abs(lhs) > 1e-3
    group.comm.Free()


def _tiles(whole, grid, mine, width=0):
    """(S, B, C, *tile) of the subdomains `mine` of `whole` (B, C, *shape) zero-padded by `width`:
    each tile's box grown by width on every side."""
    from mpidd.decomposition import Decomposition
    dec = Decomposition(whole.shape[2:], grid, 0)
    padded = np.pad(whole, [(0, 0), (0, 0)] + [(width, width)] * len(grid))
    return np.stack([padded[(slice(None), slice(None), *(slice(a, b + 2 * width) for a, b in dec.tile(i)))]
                     for i in mine])


@pytest.mark.mpi(min_size=1)
def test_the_subdomain_sum_adds_in_subdomain_order_at_every_rank_count(comm):
    """SubdomainSum over 6 subdomains (round robin, 1 to 6 per rank): on every rank the float32
    rows of every subdomain added in subdomain order, the bits of ordered_sum in one process
    (values whose sum depends on the order); rows that do not match the rank's subdomains refused."""
    import torch
    from mpidd.decomposition import subdomains_of_rank
    from mpidd.parallel import SubdomainSum
    from mpidd.tiled_unet import ordered_sum
    rows = torch.tensor(np.random.default_rng(4).standard_normal((6, 3, 50)) * 10.0 ** np.arange(6)[:, None, None],
                        dtype=torch.float32)
    mine = subdomains_of_rank(comm.rank, comm.size, 6)
    total = SubdomainSum(comm, mine, 6)(rows[mine])
    assert total.dtype == torch.float32 and torch.equal(total, ordered_sum(rows))
    assert not torch.equal(ordered_sum(rows), ordered_sum(rows.flip(0)))  # the order shows in these bits
    with pytest.raises(ValueError, match=f"{len(mine) + 1} rows for {len(mine)} subdomains"):
        SubdomainSum(comm, mine, 6)(rows[mine + [0]])  # every rank refuses before the collective


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("grid,shape,width", [((2, 3), (8, 9), 1), ((2, 3), (8, 9), 2), ((2, 2, 2), (4, 6, 4), 1)])
def test_halo_exchange_pads_each_tile_with_its_neighbours_and_is_adjoint(comm, grid, shape, width):
    """F: each subdomain's tile -> the tile grown by `width` layers of its neighbours' values
    (zeros where the image ends), what cutting the zero-padded whole image gives; its backward
    must be F*: sum over ranks <F x, y> = sum over ranks <x, F* y>."""
    import torch
    from mpidd.decomposition import subdomains_of_rank
    from mpidd.parallel import HaloExchange
    N = int(np.prod(grid))
    mine = subdomains_of_rank(comm.rank, comm.size, N)
    whole = np.random.default_rng(3).standard_normal((2, 3, *shape)).astype(np.float32)
    halo = HaloExchange(comm, grid, mine, width)
    x = torch.tensor(_tiles(whole, grid, mine), requires_grad=True)
    fx = halo(x)
    assert torch.equal(fx.detach(), torch.from_numpy(_tiles(whole, grid, mine, width)))
    y = torch.randn(fx.shape, generator=torch.Generator().manual_seed(10 + comm.rank))
    torch.autograd.backward(fx, y)
    lhs = comm.allreduce(float((fx.detach().double() * y.double()).sum()))
    rhs = comm.allreduce(float((x.detach().double() * x.grad.double()).sum()))
    assert lhs == pytest.approx(rhs, rel=1e-6) and abs(lhs) > 1e-3
    assert (halo.bytes > 0) == (len(mine) < N)  # messages only to other ranks' subdomains


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("grid,shape", [((2, 2), (8, 10)), ((2, 2, 2), (6, 4, 8))])
def test_convolutions_across_the_halo_equal_one_process_and_their_gradients(comm, grid, shape):
    """Two 3x3 convolutions (ReLU between), each after a halo exchange of one layer and with no
    padding, on the ranks' tiles: the outputs and the input's gradient of the same convolutions
    with zero padding on the whole image in one process, cut to the tiles; the weights'
    gradients summed over the ranks equal its."""
    import torch
    from mpidd.decomposition import subdomains_of_rank
    from mpidd.parallel import HaloExchange
    torch.set_num_threads(1)
    conv = torch.nn.Conv2d if len(grid) == 2 else torch.nn.Conv3d
    torch.manual_seed(0)
    whole_net = torch.nn.Sequential(conv(2, 4, 3, padding=1), torch.nn.ReLU(), conv(4, 3, 3, padding=1)).double()
    mine = subdomains_of_rank(comm.rank, comm.size, int(np.prod(grid)))
    whole = torch.tensor(np.random.default_rng(4).standard_normal((3, 2, *shape)), requires_grad=True)
    out = whole_net(whole)
    out.square().sum().backward()
    halo = HaloExchange(comm, grid, mine, 1)
    layers = [conv(2, 4, 3), conv(4, 3, 3)]
    for layer, reference in zip(layers, (whole_net[0], whole_net[2])):
        layer.double().load_state_dict(reference.state_dict())

    def tiled(x, layer):  # (S, B, C, *tile) -> (S, B, C', *tile)
        padded = halo(x)
        return layer(padded.flatten(0, 1)).unflatten(0, padded.shape[:2])

    x = torch.tensor(_tiles(whole.detach().numpy(), grid, mine), requires_grad=True)
    y = tiled(torch.relu(tiled(x, layers[0])), layers[1])
    assert torch.allclose(y.detach(), torch.from_numpy(_tiles(out.detach().numpy(), grid, mine)), atol=1e-12)
    y.square().sum().backward()
    assert torch.allclose(x.grad, torch.from_numpy(_tiles(whole.grad.numpy(), grid, mine)), atol=1e-10)
    for layer, reference in zip(layers, (whole_net[0], whole_net[2])):
        for p, q in zip(layer.parameters(), reference.parameters()):
            summed = comm.allreduce(p.grad.numpy())
            assert np.allclose(summed, q.grad.numpy(), atol=1e-9)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("grid,shape", [((2, 2), (16, 24)), ((2, 2, 2), (8, 8, 16))])
def test_a_domain_parallel_unet_is_the_unet_on_whole_images(comm, grid, shape):
    """A U-Net built for the tile and made tile-wise (3x3 convolutions padded by the halo exchange,
    BatchNorm over every tile of every rank), from the global U-Net's weights: in training and
    in eval mode the outputs of the U-Net on whole images in one process cut into tiles, its
    running statistics, and (the subdomains' parts summed) its weights' gradients."""
    import torch
    from mpidd.decomposition import Decomposition, subdomains_of_rank
    from mpidd.parallel import HaloExchange, SubdomainSum
    from mpidd.tiled_unet import Tiles, tile_wise
    from mpidd.unet import UNetConfig, build_unet
    torch.set_num_threads(1)
    dec = Decomposition(shape, grid, 0)
    mine = subdomains_of_rank(comm.rank, comm.size, dec.num_subdomains)
    cfg = UNetConfig(width=4, depth=2, input_mean=(0.5,), input_std=(0.25,))
    torch.manual_seed(0)
    whole_net = build_unet(1, 2, shape, cfg).double()
    tiled = build_unet(1, 2, dec.tile_shape, cfg).double()
    tiled.load_state_dict(whole_net.state_dict())
    assert tiled.pooled == whole_net.pooled == [True, True]
    tiles = Tiles(len(mine), HaloExchange(comm, grid, mine, 1), SubdomainSum(comm, mine, dec.num_subdomains))
    tile_wise(tiled, tiles)
    x = torch.tensor(np.random.default_rng(5).random((3, 1, *shape)))
    out = whole_net(x)
    out.square().mean().backward()
    mine_out = tiled(torch.from_numpy(_tiles(x.numpy(), grid, mine)).flatten(0, 1))
    assert torch.allclose(mine_out.detach().unflatten(0, (len(mine), 3)),
                          torch.from_numpy(_tiles(out.detach().numpy(), grid, mine)), atol=1e-10)
    (mine_out.square().sum() / out.numel()).backward()
    tiles.sum_gradients(tiled)
    for (name, p), q in zip(tiled.named_parameters(), whole_net.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-9), name
    for (name, b), c in zip(tiled.named_buffers(), whole_net.buffers()):
        assert torch.allclose(b.double(), c.double(), atol=1e-10), name
    tiled.eval(), whole_net.eval()
    with torch.no_grad():
        assert torch.allclose(tiled(torch.from_numpy(_tiles(x.numpy(), grid, mine)).flatten(0, 1)),
                              torch.from_numpy(_tiles(whole_net(x).numpy(), grid, mine)).flatten(0, 1), atol=1e-10)


# --- the Python API on a communicator ------------------------------------------------------------

def _api_problem():
    rng = np.random.default_rng(1)
    templates = rng.random((3, 1, 12, 12))
    y = rng.integers(0, 3, 150)
    x = ((0.4 * templates[y] + 0.6 * rng.random((150, 1, 12, 12))) * 255).astype(np.uint8)
    return x, y


@pytest.mark.mpi(min_size=1)
def test_api_fit_on_a_communicator_equals_one_process(comm, tmp_path_factory):
    """TwoLevelClassifier on `comm` (P <= N: whole models per rank) gives, bit for bit, the
    probabilities of the same fit in one process (COMM_SELF); save on `comm`, load on COMM_SELF."""
    import tempfile

    import mpidd
    from mpi4py import MPI
    x, y = _api_problem()
    opts = dict(grid="2x2", epochs=2, batch_size=16, width=8, hidden=16, coarse_epochs=3, coarse_batch_size=32,
                threads=1, seed=4)
    if comm.size > 4:
        pytest.skip("more ranks than subdomains: see the data-parallel tests")
    clf = mpidd.TwoLevelClassifier(**opts, comm=comm).fit(x[:100], y[:100], x[100:125], y[100:125])
    alone = mpidd.TwoLevelClassifier(**opts, comm=MPI.COMM_SELF).fit(x[:100], y[:100], x[100:125], y[100:125])
    test = x[125:]
    for model in ("cnn-dnn", "average", "vote"):
        assert np.array_equal(clf.predict_proba(test, model), alone.predict_proba(test, model)), model
    assert clf.local_scores_ == alone.local_scores_ and clf.scores_ == alone.scores_
    # form (b): each rank passes only its own subimages
    boxes = clf.local_boxes(test.shape[1:])
    assert sorted(boxes) == list(range(comm.rank, 4, comm.size))
    local = {i: test[(slice(None), slice(None)) + b] for i, b in boxes.items()}
    assert np.array_equal(clf.predict_proba(local, image_shape=test.shape[1:]), alone.predict_proba(test))
    sent = 4 * 3 * len(boxes) * (100 + 25 + 3 * 25 + 25)  # float32 x K x subdomains x (fit + 4 predictions)
    assert clf.bytes_sent_["probabilities"] == (0 if comm.rank == 0 else sent)  # rank 0's stay where they are
    scores = clf.score_all(test, alone.predict(test))
    assert scores["cnn-dnn"] == 1.0 and sorted(scores["local"]) == [0, 1, 2, 3]
    directory = comm.bcast(tempfile.mkdtemp(prefix="mpidd-api-") if comm.rank == 0 else None, root=0)
    path = clf.save(os.path.join(directory, "model.pt"))
    assert clf.bytes_sent_["parameters"] > 0 or comm.rank == 0
    again = mpidd.TwoLevelClassifier.load(path, comm=MPI.COMM_SELF)
    assert np.array_equal(again.predict_proba(test), alone.predict_proba(test))
    comm.Barrier()


@pytest.mark.mpi(min_size=1)
def test_api_on_a_data_file_reads_only_the_ranks_boxes_and_equals_arrays(comm, shared_h5, monkeypatch):
    """fit(FILE) and predict_proba(FILE) (its train, val and test splits) on `comm`: the same
    probabilities, bit for bit, as the arrays read from it; every image read of the streams,
    in the background threads too, lies in one of the rank's boxes."""
    import mpidd
    if comm.size > 4:
        pytest.skip("more ranks than subdomains: see the data-parallel tests")
    with h5py.File(shared_h5, "r") as f:
        arrays = {s: (f[s]["images"][...], f[s]["labels"][...]) for s in ("train", "val", "test")}
    opts = dict(grid="2x2", overlap=1, epochs=2, batch_size=16, width=8, hidden=16, coarse_steps=50, threads=1,
                seed=2)
    reads = []
    original = h5py.Dataset.__getitem__
    monkeypatch.setattr(h5py.Dataset, "__getitem__",
                        lambda self, key: reads.append((self.name, key)) or original(self, key))
    clf = mpidd.TwoLevelClassifier(**opts, comm=comm).fit(shared_h5)
    streamed = clf.predict_proba(shared_h5)
    boxes = list(clf.local_boxes((1, 16, 16)).values())
    image_reads = [k for name, k in reads if name.endswith("images")]
    assert image_reads and clf.bytes_read_ > 0
    for key in image_reads:
        assert any(all(k.start >= b.start and k.stop <= b.stop for k, b in zip(key[2:], box)) for box in boxes), key
    monkeypatch.setattr(h5py.Dataset, "__getitem__", original)
    in_memory = mpidd.TwoLevelClassifier(**opts, comm=comm).fit(*arrays["train"], *arrays["val"])
    assert np.array_equal(streamed, in_memory.predict_proba(arrays["test"][0]))
    assert clf.score(shared_h5) == in_memory.score(*arrays["test"]) == clf.score(f"{shared_h5}:test")
    mine = len(boxes)  # 9x9 subimages (overlap 1): 2 training epochs of 90 images each, at least
    assert clf.bytes_read_ >= mine * 2 * 90 * 81 and in_memory.bytes_read_ == 0
    comm.Barrier()


# --- the coherent model on P = G*N ranks: model parallel across subdomains, data parallel inside -

def _groups(comm):
    """N subdomains (2, or 1 on an odd number of ranks) and this rank's data-parallel group of G = P/N."""
    from mpidd.decomposition import layout
    from mpidd.parallel import DataParallelGroup
    N = 2 if comm.size % 2 == 0 else 1
    mine, _, member = layout(comm.rank, comm.size, N)
    return N, mine, DataParallelGroup(comm, color=mine[0], key=member)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("output", ["probabilities", "logits"])
def test_coherent_step_on_data_parallel_groups_equals_the_single_process_model(comm, output):
    """Each member of a subdomain's group computes its share of the batch; the exchange assembles
    every row on the root and scatters their gradients back; the group sums gradients and
    BatchNorm statistics: the step is the assembled model's single-process step."""
    import torch
    from mpidd.coherent_model import coherent_step
    from mpidd.parallel import ModelParallelExchange
    from mpidd.engine import TrainOptions, make_optimizer
    from mpidd.models import group_batchnorm
    torch.set_num_threads(1)
    K, n = 5, 40
    N, mine, group = _groups(comm)
    xs, y, local, dnn = _coherent_problem(N, K, n=n)
    idx = torch.as_tensor([3, 17, 5, 0, 39, 22, 8, 11, 30, 2, 19, 27])
    opts = TrainOptions(lr=1e-2)
    ref_locals, ref_dnn, _, ref_grads, _ = _assembled_step(xs, y, local, dnn, N, idx, output, opts)

    lo, hi = group.share(n)
    models = {i: group_batchnorm(local(i), group.allreduce) for i in mine}
    coarse = dnn() if comm.rank == 0 else None
    exchange = ModelParallelExchange(comm, mine, N, K, member=(group.rank, group.size))
    optimizer = make_optimizer(torch.nn.ModuleList([*models.values(), *([coarse] if coarse else [])]), opts)
    coherent_step(models, coarse, {i: torch.as_tensor(xs[i][lo:hi]) for i in mine}, torch.as_tensor(y), idx,
                  exchange=exchange, output=output, start=lo, group=group)
    optimizer.step()
    tol = dict(rtol=1e-4, atol=1e-6)  # the data-parallel tolerance: sums in another order
    for i in mine:
        for p, g in zip(models[i].parameters(), ref_grads[i]):
            torch.testing.assert_close(p.grad, g, **tol)
        for p, q in zip(models[i].state_dict().values(), ref_locals[i].state_dict().values()):
            torch.testing.assert_close(p.float(), q.float(), **tol)  # parameters and BatchNorm statistics
    if comm.rank == 0:
        for p, q in zip(coarse.parameters(), ref_dnn.parameters()):
            torch.testing.assert_close(p.data, q.data, **tol)
    mine_rows = int(((idx >= lo) & (idx < hi)).sum())
    assert exchange.bytes == 2 * mine_rows * len(mine) * K * 4  # its rows only, each way
    group.comm.Free()


@pytest.mark.mpi(min_size=1)
def test_coherent_training_on_data_parallel_groups_ends_where_one_process_ends(comm):
    import torch
    from mpidd.coherent_model import SerialExchange, evaluate_coherent, train_coherent
    from mpidd.parallel import ModelParallelExchange
    from mpidd.engine import TrainOptions
    from mpidd.models import group_batchnorm
    torch.set_num_threads(1)
    K, n = 5, 40
    N, mine, group = _groups(comm)
    xs, y, local, dnn = _coherent_problem(N, K, n=n)
    opts = TrainOptions(epochs=2, batch_size=16, lr=5e-3)
    val = {i: x[:24] for i, x in xs.items()}
    ref_locals, ref_dnn = {i: local(i) for i in range(N)}, dnn()
    ref_hist, _, _ = train_coherent(ref_locals, ref_dnn, xs, y, val, y[:24], opts, 11, exchange=SerialExchange())

    lo, hi = group.share(n)
    vlo, vhi = group.share(24)
    models = {i: group_batchnorm(local(i), group.allreduce) for i in mine}
    coarse = dnn() if comm.rank == 0 else None
    exchange = ModelParallelExchange(comm, mine, N, K, member=(group.rank, group.size))
    hist, _, _ = train_coherent(models, coarse, {i: xs[i][lo:hi] for i in mine}, y,
                                {i: val[i][vlo:vhi] for i in mine}, y[:24], opts, 11, exchange=exchange,
                                train_start=lo, val_start=vlo, group=group)
    for i in mine:
        for (name, p), q in zip(models[i].state_dict().items(), ref_locals[i].state_dict().values()):
            torch.testing.assert_close(p.float(), q.float(), rtol=1e-3, atol=1e-5, msg=lambda m: f"{i} {name}: {m}")
    result = evaluate_coherent(models, coarse, {i: xs[i][lo:hi] for i in mine}, y, exchange=exchange, start=lo)
    if comm.rank == 0:
        assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in ref_hist], rel=1e-4)
        assert [h["val_acc"] for h in hist] == pytest.approx([h["val_acc"] for h in ref_hist], abs=1e-6)
        assert result[1] == pytest.approx(evaluate_coherent(ref_locals, ref_dnn, xs, y, exchange=SerialExchange())[1])
    group.comm.Free()


@pytest.mark.mpi(min_size=1)
def test_grid_search_clone_and_string_labels_under_mpirun(comm):
    """sklearn's GridSearchCV (cv=2 over two values of epochs) on a collective estimator: every
    rank runs the same search and finds the same best parameters and score; the refitted
    estimator, trained on string labels, predicts strings, the same on every rank."""
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV

    import mpidd
    x, y = _api_problem()
    names = np.array(["circle", "square", "triangle"])[y % 3]
    base = mpidd.TwoLevelClassifier(grid="2x2", batch_size=16, width=4, hidden=8, coarse_steps=20, coarse_epochs=1,
                                    threads=1, seed=3, comm=comm)
    twin = clone(base).set_params(epochs=2)
    assert twin.comm is comm and twin.epochs == 2 and base.epochs == 3
    search = GridSearchCV(base, {"epochs": [1, 2]}, cv=2).fit(x[:96], names[:96])
    best = comm.allgather((search.best_params_, search.best_score_))
    assert all(b == best[0] for b in best), best
    predicted = search.predict(x[96:])
    assert predicted.dtype.kind == "U" and set(predicted) <= set(names)
    assert all(np.array_equal(p, predicted) for p in comm.allgather(predicted))
    assert search.best_estimator_.comm is comm


@pytest.mark.mpi(min_size=2)
def test_data_parallel_groups_are_split_once_and_freed_by_close(comm):
    """P > N (a 1x1 grid: every rank trains the one local CNN, data parallel): fitting again
    reuses the group's communicator instead of splitting another; close() frees it; a `with`
    block closes."""
    import mpidd
    x, y = _api_problem()
    opts = dict(grid="1x1", epochs=1, batch_size=16, width=4, hidden=8, coarse_steps=5, threads=1, comm=comm)
    with mpidd.TwoLevelClassifier(**opts) as clf:
        clf.fit(x[:64], y[:64])
        first = clf._ctx.group.comm
        clf.fit(x[:64], y[:64])
        assert clf._ctx.group.comm is first and list(clf._groups.values()) == [first]
    assert clf._groups == {} and first == type(first)()  # MPI_COMM_NULL: freed


@pytest.mark.mpi(min_size=1)
def test_partial_fit_on_a_communicator_equals_one_process(comm):
    """Online training on `comm` (P <= N), each rank handing over only its own subimages (form
    b), gives, bit for bit, the probabilities of the same calls in one process on whole images."""
    import mpidd
    from mpi4py import MPI
    if comm.size > 4:
        pytest.skip("partial_fit runs on at most as many ranks as subdomains")
    x, y = _api_problem()
    opts = dict(grid="2x2", batch_size=16, width=4, hidden=8, coarse_batch_size=16, buffer_size=30, threads=1, seed=5)
    clf, alone = mpidd.TwoLevelClassifier(**opts, comm=comm), mpidd.TwoLevelClassifier(**opts, comm=MPI.COMM_SELF)
    for k in range(3):
        rows = slice(25 * k, 25 * (k + 1))
        boxes = clf.local_boxes(x.shape[1:])
        mine = {i: x[rows][(slice(None), slice(None)) + b] for i, b in boxes.items()}
        clf.partial_fit(mine, y[rows], classes=[0, 1, 2], image_shape=x.shape[1:])
        alone.partial_fit(x[rows], y[rows], classes=[0, 1, 2])
    test = x[100:]
    for model in ("cnn-dnn", "average", "vote"):
        assert np.array_equal(clf.predict_proba(test, model), alone.predict_proba(test, model)), model
    assert clf.history_["online"][-1]["coarse_loss"] == alone.history_["online"][-1]["coarse_loss"]


@pytest.mark.mpi(min_size=1)
def test_each_rank_checks_only_its_own_boxes_for_nan(comm, monkeypatch):
    """Whole images on every rank (form a): a rank checks NaN and inf only in the boxes of its
    subdomains, not the whole array; a NaN in one box is still refused on every rank."""
    import mpidd
    from mpidd import estimator
    if comm.size > 4:
        pytest.skip("at most one rank per subdomain here")
    x, y = _api_problem()
    x = x.astype(np.float32) / 255
    checked = []
    original = estimator.check_values
    monkeypatch.setattr(estimator, "check_values", lambda a, what: (checked.append(np.asarray(a).size),
                                                                     original(a, what))[1])
    clf = mpidd.TwoLevelClassifier(grid="2x2", epochs=1, batch_size=16, width=4, hidden=8, coarse_steps=5, threads=1,
                                   comm=comm).fit(x[:40], y[:40], x[40:50], y[40:50])
    mine = len(clf.local_boxes(x.shape[1:]))
    assert sum(checked) == mine * 50 * 6 * 6  # its 6x6 boxes of the 50 images, nothing else
    x[3, 0, 1, 1] = np.nan  # in subdomain 0's box: its rank finds it, every rank raises
    with pytest.raises(ValueError, match="subdomain 0's box, holds NaN"):
        clf.fit(x[:40], y[:40], x[40:50], y[40:50])


@pytest.mark.mpi(min_size=1)
def test_scatter_from_root_is_adjoint_to_its_backward(comm):
    """F: the root's (B, N*F) -> every rank's (B, m_r*F) (Scatterv); its backward must be F*
    (Gatherv of the gradients to the root): <F x, y> summed over ranks = <x, F* y> on the root."""
    import torch
    from mpidd.decomposition import subdomains_of_rank
    from mpidd.parallel import ModelParallelExchange, ScatterFromRoot
    N, F, B = 5, 3, 7
    if comm.size > N:
        pytest.skip("more ranks than subdomains")
    mine = subdomains_of_rank(comm.rank, comm.size, N)
    exchange = ModelParallelExchange(comm, mine, N, F)
    x = (torch.randn(B, N * F, generator=torch.Generator().manual_seed(5), requires_grad=True) if comm.rank == 0
         else torch.zeros(0, requires_grad=True))
    fx = ScatterFromRoot.apply(x, exchange, None, None, B)
    assert fx.shape == (B, len(mine) * F)
    whole = torch.randn(B, N * F, generator=torch.Generator().manual_seed(5)).reshape(B, N, F)
    assert torch.equal(fx.detach().reshape(B, len(mine), F), whole[:, mine])  # each rank gets its columns
    y = torch.randn(B, len(mine) * F, generator=torch.Generator().manual_seed(100 + comm.rank))
    torch.autograd.backward(fx, y)
    lhs = comm.allreduce(float((fx.detach().double() * y.double()).sum()))
    rhs = comm.bcast(float((x.detach().double() * x.grad.double()).sum()) if comm.rank == 0 else None, root=0)
    assert lhs == pytest.approx(rhs, rel=1e-6) and abs(lhs) > 1e-3


def _dense_run(comm, task):
    """Local U-Nets, the gathered bottlenecks, the coarse correction and the scores of local
    only and two-level on a tiny 2x2 problem, on `comm` (its ranks take the subdomains in turn)."""
    import torch
    from mpidd.decomposition import Decomposition, subdomains_of_rank
    from mpidd.engine import TrainOptions
    from mpidd.methods import dense
    from mpidd.methods.context import Context
    from mpidd.unet import UNetConfig
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(80, 1, 8, 8, generator=g)
    field = torch.nn.functional.avg_pool2d(x, 5, 1, 2) * 4.0  # reaches across the subdomains' borders
    target = field if task == "regress" else (field[:, 0] > 1.0).long() + (field[:, 0] > 1.2).long()
    dec = Decomposition((8, 8), (2, 2))
    split = {"train": slice(0, 48), "val": slice(48, 64), "test": slice(64, 80)}
    mine = subdomains_of_rank(comm.rank, comm.size, 4)
    channel = (slice(None),) if task == "regress" else ()
    subsets = {i: {s: (x[r][(slice(None), slice(None)) + dec.slices(i)].numpy(),
                       target[r][(slice(None),) + channel + dec.slices(i)].numpy()) for s, r in split.items()}
               for i in mine}
    cfg = dense.DenseConfig(task=task, loss="mse" if task == "regress" else "ce", unet=UNetConfig(width=4, depth=1),
                            local=TrainOptions(epochs=1, batch_size=16, lr=1e-2),
                            coarse=TrainOptions(epochs=2, batch_size=16, lr=1e-2), coarse_hidden=8, seed=3)
    ctx = Context(comm=comm, mine=mine)
    out_channels = 1 if task == "regress" else 3
    models, _ = dense.fit_local_unets(ctx, subsets, dec, 1, out_channels, 0.7, cfg)
    trained_first_weights = {i: next(m.parameters()).detach().clone() for i, m in models.items()}
    local_scores = dense.dense_scores(ctx, dense.local_predictions(models, subsets, "test", cfg), subsets, "test", cfg)
    gathered = dense.gather_bottlenecks(ctx, models, subsets, 4)
    shape = models[mine[0]].bottleneck_shape
    coarse, history = dense.fit_coarse_correction(ctx, models, subsets, gathered, dec, shape, cfg)
    step = dense.CoarseStep(ctx, models, coarse, 4, shape, gathered)
    outputs = dense.exchanged_predictions(ctx, step, subsets, "test", cfg)
    scores = dense.dense_scores(ctx, outputs, subsets, "test", cfg)
    result = {"local": local_scores, "two_level": scores, "outputs": outputs, "history": history,
              "outputs_local_weights": trained_first_weights,
              "coarse": None if coarse is None else [p.detach().clone() for p in coarse.parameters()]}
    # coherent, end to end: from the two-level model (transfer learning) and from random weights
    opts = TrainOptions(epochs=1, batch_size=16, lr=5e-3)
    for init in ("pretrained", "random"):
        local, net = dense.coherent_start(ctx, init, dec, 1, out_channels, 0.7, cfg, shape, models, coarse)
        hist = dense.fit_coherent_dense(ctx, local, net, subsets, dec, shape, cfg, opts, f"coherent {init}")
        step = dense.CoarseStep(ctx, local, net, 4, shape, coherent=True)
        result[init] = {"outputs": dense.exchanged_predictions(ctx, step, subsets, "test", cfg),
                        "local": {i: [p.detach().clone() for p in m.parameters()] for i, m in local.items()},
                        "coarse": None if net is None else [p.detach().clone() for p in net.parameters()],
                        "history": hist}
    return result


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("task,overlap", [("regress", 0), ("segment", 1)])
def test_the_domain_parallel_unet_trains_as_the_global_unet(comm, task, overlap):
    """fit_domain_parallel_unet on comm's ranks (the subdomains in turn; with an overlap, each
    box cut to its tile) against fit_global_unet on whole images in one process: the same
    weights, validation scores and test outputs after an epoch of 3 steps, up to the order of
    float32 sums; and the same bits as fit_domain_parallel_unet in one process holding every
    subdomain (at 3 ranks, ranks of 2 and 1 subdomains)."""
    import torch
    from mpidd.decomposition import Decomposition, subdomains_of_rank
    from mpidd.dense import predict_dense
    from mpidd.engine import TrainOptions
    from mpidd.methods import dense
    from mpidd.methods.context import Context
    from mpidd.unet import UNetConfig
    torch.set_num_threads(1)
    x = torch.rand(80, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    field = torch.nn.functional.avg_pool2d(x, 5, 1, 2) * 4.0
    target = field if task == "regress" else (field[:, 0] > 1.0).long() + (field[:, 0] > 1.2).long()
    channel = (slice(None),) if task == "regress" else ()
    dec = Decomposition((8, 8), (2, 2), overlap)
    split = {"train": slice(0, 48), "val": slice(48, 64), "test": slice(64, 80)}
    mine = subdomains_of_rank(comm.rank, comm.size, 4)
    subsets = {i: {s: (x[r][(slice(None), slice(None)) + dec.slices(i)].numpy(),
                       target[r][(slice(None),) + channel + dec.tile_slices(i)].numpy()) for s, r in split.items()}
               for i in mine}
    cfg = dense.DenseConfig(task=task, loss="mse" if task == "regress" else "ce", unet=UNetConfig(width=4, depth=1),
                            local=TrainOptions(epochs=1, batch_size=16, lr=1e-2), seed=3)
    out_channels = 1 if task == "regress" else 3
    ctx = Context(comm=comm, mine=mine)
    model, history = dense.fit_domain_parallel_unet(ctx, subsets, dec, 1, out_channels, cfg)
    outputs = dense.domain_parallel_predictions(model, subsets, dec, "test", cfg)
    val = dense.dense_scores(ctx, dense.domain_parallel_predictions(model, subsets, dec, "val", cfg), subsets,
                             "val", cfg)
    if comm.size > 1:  # the same bits as one process holding every subdomain
        from mpi4py import MPI
        every = {i: {s: (x[r][(slice(None), slice(None)) + dec.slices(i)].numpy(),
                         target[r][(slice(None),) + channel + dec.tile_slices(i)].numpy()) for s, r in split.items()}
                 for i in range(4)}
        alone = Context(comm=MPI.COMM_SELF, mine=list(range(4)))
        one, one_history = dense.fit_domain_parallel_unet(alone, every, dec, 1, out_channels, cfg)
        for p, q in zip(model.parameters(), one.parameters()):
            assert torch.equal(p, q)
        one_outputs = dense.domain_parallel_predictions(one, every, dec, "test", cfg)
        assert all(torch.equal(outputs[i], one_outputs[i]) for i in mine)
        assert history[-1]["val_acc"] == one_history[-1]["val_acc"]
        if comm.rank == 0:
            assert history[-1]["loss"] == one_history[-1]["loss"]
    whole, whole_history = dense.fit_global_unet(Context(comm=comm, mine=mine), (x[:48].numpy(), target[:48].numpy()),
                                                 (x[48:64].numpy(), target[48:64].numpy()), 1, out_channels, (8, 8),
                                                 cfg)
    for (name, p), q in zip(model.named_parameters(), whole.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
    expected = predict_dense(whole, x[64:80].numpy())
    for i in mine:
        assert torch.allclose(outputs[i], expected[(slice(None), slice(None)) + dec.tile_slices(i)], atol=1e-4), i
    assert history[-1]["val_acc"] == pytest.approx(whole_history[-1]["val_acc"], abs=1e-5)
    if comm.rank == 0:
        key = "mae" if task == "regress" else "pixel_acc"
        assert val[key] == pytest.approx(whole_history[-1]["val_acc"], abs=1e-5)
        assert history[-1]["loss"] == pytest.approx(whole_history[-1]["loss"], rel=1e-5)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("task", ["regress", "segment"])
def test_dense_two_level_is_the_same_on_any_number_of_ranks(comm, task):
    """Local U-Nets, coarse correction (its gradients through ScatterFromRoot's gather) and the
    stitched scores: the same numbers on comm's ranks as on one rank holding every subdomain."""
    import torch
    if comm.size > 4:
        pytest.skip("more ranks than subdomains")
    alone = comm.Split(color=comm.rank, key=0)  # every rank: one process with all 4 subdomains
    try:
        ref = _dense_run(alone, task)
    finally:
        alone.Free()
    got = _dense_run(comm, task)
    for i, out in got["outputs"].items():
        assert torch.equal(out, ref["outputs"][i]), i
    if comm.rank == 0:
        assert got["local"] == ref["local"] and got["two_level"] == ref["two_level"]
        assert all(torch.equal(p, q) for p, q in zip(got["coarse"], ref["coarse"]))
        assert got["coarse"][-2].abs().sum() > 0  # its last convolution starts at zero: it learned
        key = "mse" if task == "regress" else "miou"
        assert got["two_level"][key] != got["local"][key]  # the corrections changed the stitched outputs
        assert [h["val_acc"] for h in got["history"]] == [h["val_acc"] for h in ref["history"]]
    else:
        assert got["two_level"] is None and got["coarse"] is None
    for init in ("pretrained", "random"):  # coherent: every local U-Net and the coarse network end alike
        g, r = got[init], ref[init]
        for i in g["local"]:
            assert all(torch.equal(p, q) for p, q in zip(g["local"][i], r["local"][i])), (init, i)
            assert torch.equal(g["outputs"][i], r["outputs"][i]), (init, i)
        if comm.rank == 0:
            assert all(torch.equal(p, q) for p, q in zip(g["coarse"], r["coarse"])), init
            assert [h["val_acc"] for h in g["history"]] == [h["val_acc"] for h in r["history"]]
    if comm.rank == 0:  # transfer learning moved the local U-Nets (their gradients came through the exchange)
        first = sorted(got["pretrained"]["local"])[0]
        assert not torch.equal(got["pretrained"]["local"][first][0], got["outputs_local_weights"][first])


@pytest.mark.mpi(min_size=1)
def test_coherent_dense_step_has_the_gradients_of_the_single_process_model(comm):
    """The coherent dense step (bottlenecks gathered, corrections scattered, both in autograd)
    gives every local U-Net and the coarse network the gradients that plain autograd gives the
    same model held whole in one process, with no exchange at all."""
    import torch
    from mpidd.decomposition import Decomposition, subdomains_of_rank
    from mpidd.methods import dense
    from mpidd.methods.context import Context
    from mpidd.unet import CoarseCorrection, UNetConfig, build_unet
    if comm.size > 4:
        pytest.skip("more ranks than subdomains")
    torch.set_num_threads(1)
    dec, cfg = Decomposition((8, 8), (2, 2)), UNetConfig(width=4, depth=1)

    def unet(i):
        torch.manual_seed(10 + i)
        return build_unet(1, 2, (4, 4), cfg)

    def coarse_net(shape):
        torch.manual_seed(99)
        net = CoarseCorrection(dec.grid, shape, hidden=6)
        torch.nn.init.normal_(net.body[-1].weight, std=0.1)  # not zero: gradients reach the encoders through it
        return net

    g = torch.Generator().manual_seed(1)
    x, t = torch.rand(6, 1, 8, 8, generator=g), torch.rand(6, 2, 8, 8, generator=g)
    xs = {i: x[(slice(None), slice(None)) + dec.slices(i)].numpy() for i in range(4)}
    ts = {i: t[(slice(None), slice(None)) + dec.slices(i)] for i in range(4)}
    idx = np.arange(6)

    ref = {i: unet(i) for i in range(4)}
    shape = ref[0].bottleneck_shape
    ref_coarse = coarse_net(shape)
    encoded = {i: ref[i].encode(torch.as_tensor(xs[i])) for i in range(4)}
    c = ref_coarse(torch.cat([encoded[i][0].flatten(1) for i in range(4)], 1))
    F = int(np.prod(shape))
    loss = sum(torch.nn.functional.mse_loss(ref[i].decode(encoded[i][0], encoded[i][1],
                                                          c[:, i * F:(i + 1) * F].reshape(encoded[i][0].shape)),
                                            ts[i]) / 4 for i in range(4))
    loss.backward()

    mine = subdomains_of_rank(comm.rank, comm.size, 4)
    models = {i: unet(i) for i in mine}
    coarse = coarse_net(shape) if comm.rank == 0 else None
    step = dense.CoarseStep(Context(comm=comm, mine=mine), models, coarse, 4, shape, coherent=True)
    out = step.outputs(xs, "train", idx)
    step.backward(torch.stack([torch.nn.functional.mse_loss(out[i], ts[i]) / 4 for i in sorted(out)]).sum())
    for i in mine:
        for (name, p), q in zip(models[i].named_parameters(), ref[i].parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{i} {name}: {m}")
        assert models[i].encoders[0][0].weight.grad.abs().sum() > 0
    if comm.rank == 0:
        for p, q in zip(coarse.parameters(), ref_coarse.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)


def _dense_api_problem(task):
    """Sources (n, 1, 8, 8) and the blurred fields (or their level sets) they make."""
    import torch
    g = torch.Generator().manual_seed(5)
    x = torch.rand(60, 1, 8, 8, generator=g)
    field = torch.nn.functional.avg_pool2d(x, 5, 1, 2) * 4.0
    t = field if task == "regress" else (field[:, 0] > 1.0).long() + (field[:, 0] > 1.2).long()
    return x.numpy(), t.numpy()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("task,overlap", [("regress", 0), ("segment", 0), ("regress", 1)])
def test_dense_estimator_on_a_communicator_equals_one_process(comm, task, overlap, tmp_path_factory):
    """TwoLevelUNet on `comm` predicts, bit for bit, what the same fit in one process (COMM_SELF)
    predicts, for every model; arrays and a data file (each rank reads its boxes) agree; with an
    overlap too (each U-Net sees a halo of its neighbours' pixels and predicts its tile)."""
    import mpidd
    from mpi4py import MPI
    if comm.size > 4:
        pytest.skip("more ranks than subdomains")
    x, t = _dense_api_problem(task)
    opts = dict(task=task, grid="2x2", epochs=1, batch_size=16, unet_width=4, unet_depth=1, coarse_channels=8,
                coarse_epochs=2, coarse_batch_size=16, coherent_epochs=1, threads=1, seed=2, overlap=overlap)
    nets = {}
    for name, c in (("comm", comm), ("alone", MPI.COMM_SELF)):
        net = mpidd.TwoLevelUNet(**opts, comm=c).fit(x[:40], t[:40], x[40:50], t[40:50])
        net.fit_coherent(x[:40], t[:40], x[40:50], t[40:50], init="pretrained")
        nets[name] = net
    test = x[50:]
    for model in ("local-only", "two-level", "coherent-pretrained"):
        got, want = nets["comm"].predict(test, model), nets["alone"].predict(test, model)
        assert np.array_equal(got, want), model
        assert got.shape == ((10, 1, 8, 8) if task == "regress" else (10, 8, 8))
    assert nets["comm"].scores_ == nets["alone"].scores_
    two, local = (nets["comm"].scores(test, t[50:], m) for m in ("two-level", "local-only"))
    assert set(two) == ({"mae", "mse", "rel_l2", "ssim"} if task == "regress" else
                        {"iou", "dice", "miou", "mean_dice", "pixel_acc"})
    if task == "regress":  # (a step of the coarse network changes fields, not always a mask's argmax)
        assert two["mae"] != local["mae"]  # the coarse corrections reached the outputs
    # a data file: each rank reads only its boxes; the same predictions as from arrays
    from mpidd.writer import write_dataset
    path = None
    if comm.rank == 0:
        d = tmp_path_factory.mktemp("dense_api")
        splits = {"train": (x[:40], None, t[:40]), "val": (x[40:50], None, t[40:50]), "test": (x[50:], None, t[50:])}
        if task == "segment":
            splits = {s: (a, np.zeros(len(a), np.int64), m.astype(np.uint8)) for s, (a, _, m) in splits.items()}
        path = write_dataset(str(d / "f.h5"), splits, **({"classes": ["a", "b"], "target_classes": ["0", "1", "2"]}
                                                          if task == "segment" else {}))
    path = comm.bcast(path, root=0)
    from_file = mpidd.TwoLevelUNet(**opts, comm=comm).fit(path)
    assert np.array_equal(from_file.predict(path), nets["alone"].predict(test))
    assert from_file.scores(path) == nets["alone"].scores(test, t[50:])
    # save on comm (rank 0 gathers every U-Net), load on one process and on comm: the same predictions
    saved = nets["comm"].save(path + ".pt")
    for c in (MPI.COMM_SELF, comm):
        again = mpidd.TwoLevelUNet.load(saved, comm=c)
        for model in ("local-only", "two-level", "coherent-pretrained"):
            assert np.array_equal(again.predict(test, model), nets["alone"].predict(test, model)), (c.size, model)
        assert again.scores_ == nets["alone"].scores_
    with pytest.raises(mpidd.ModelFileError, match="corrupt, or not a model file"):
        mpidd.TwoLevelUNet.load(path, comm=comm)  # the data file
    comm.Barrier()
