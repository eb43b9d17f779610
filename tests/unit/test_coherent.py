"""The coherent CNN-DNN in one process (SerialExchange); the MPI version is in test_mpi.py."""

import numpy as np
import pytest
import torch

from mpidd.coherent_model import SerialExchange, coherent_step, evaluate_coherent, local_outputs, train_coherent
from mpidd.engine import TrainOptions, make_optimizer, precision_error
from mpidd.models import CNNConfig, CoarseDNN, build_cnn


def problem(N=2, K=3, n=96, seed=0):
    """Class k: subdomain i shows pattern (k + i) mod K, so every subdomain alone carries the class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    templates = rng.random((K, 1, 6, 6))
    xs = {i: ((0.6 * templates[(y + i) % K] + 0.4 * rng.random((n, 1, 6, 6))) * 255).astype(np.uint8)
          for i in range(N)}
    return xs, y


def build(N, K, seed=0, arch="vgg"):
    torch.manual_seed(seed)
    models = {i: build_cnn(1, K, (6, 6), CNNConfig(arch=arch, width=4, hidden=8, blocks_per_stage=1))
              for i in range(N)}
    return models, CoarseDNN(N * K, K, (8,))


def test_local_outputs_are_probabilities_or_logits_in_subdomain_order():
    xs, _ = problem(N=3)
    models, _ = build(3, 3)
    idx = torch.arange(5)
    xs = {i: torch.as_tensor(x) for i, x in xs.items()}
    p = local_outputs(models, xs, idx, "probabilities")
    z = local_outputs(models, xs, idx, "logits")
    assert p.shape == z.shape == (5, 9)
    torch.testing.assert_close(p.view(5, 3, 3).sum(2), torch.ones(5, 3))
    torch.testing.assert_close(p[:, 3:6], torch.softmax(z[:, 3:6], dim=1))


@pytest.mark.parametrize("output,arch", [("probabilities", "vgg"), ("logits", "vgg"), ("probabilities", "resnet")])
def test_coherent_training_learns_and_is_reproducible(output, arch):
    torch.set_num_threads(1)
    xs, y = problem()
    runs = []
    for _ in range(2):
        models, dnn = build(2, 3, arch=arch)
        hist, _, timing = train_coherent(models, dnn, xs, y, xs, y, TrainOptions(epochs=8, batch_size=16, lr=1e-2),
                                         5, exchange=SerialExchange(), output=output)
        runs.append(hist)
    assert [h["loss"] for h in runs[0]] == [h["loss"] for h in runs[1]]
    # chance is 1/3; from random weights the softmax between the CNNs and the DNN slows learning
    assert runs[0][-1]["val_acc"] > 0.6 and runs[0][-1]["loss"] < 0.9 * runs[0][0]["loss"]
    assert timing["steps"] == 8 * 6 and timing["exchange_s"] == 0 and timing["step_s"] > 0


def test_one_step_trains_every_local_cnn_and_the_dnn():
    xs, y = problem()
    models, dnn = build(2, 3)
    before = {name: p.detach().clone() for name, p in torch.nn.ModuleList([*models.values(), dnn]).named_parameters()}
    owned = torch.nn.ModuleList([*models.values(), dnn])
    optimizer = make_optimizer(owned, TrainOptions(lr=1e-2))
    loss_sum, correct = coherent_step(models, dnn, {i: torch.as_tensor(x) for i, x in xs.items()}, torch.as_tensor(y),
                                      torch.arange(16), exchange=SerialExchange())
    optimizer.step()
    assert loss_sum > 0 and 0 <= correct <= 16
    changed = [name for name, p in owned.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert len(changed) == len(before)


def test_evaluate_coherent_matches_a_direct_forward():
    xs, y = problem()
    models, dnn = build(2, 3)
    loss, acc = evaluate_coherent(models, dnn, xs, y, exchange=SerialExchange(), batch_size=7)
    with torch.no_grad():
        for m in [*models.values(), dnn]:
            m.eval()
        logits = dnn(torch.cat([torch.softmax(models[i](torch.as_tensor(xs[i]).float() / 255), 1)
                                for i in range(2)], 1))
    assert acc == pytest.approx((logits.argmax(1).numpy() == y).mean())
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.as_tensor(y)).item(), rel=1e-5)


@pytest.mark.skipif(precision_error("bf16-mixed", "cpu") is not None, reason="this CPU has no bfloat16")
def test_bf16_mixed_sends_float32_and_trains_reproducibly():
    """The local CNNs compute in bf16, what crosses the exchange is float32 (within bf16 rounding
    of the float32 outputs), the DNN runs in float32, and training is reproducible and learns."""
    torch.set_num_threads(1)
    xs, y = problem()
    models, dnn = build(2, 3)
    txs = {i: torch.as_tensor(x) for i, x in xs.items()}
    for output in ("probabilities", "logits"):
        z32 = local_outputs(models, txs, torch.arange(16), output)
        z16 = local_outputs(models, txs, torch.arange(16), output, precision="bf16-mixed")
        assert z16.dtype == torch.float32 and not torch.equal(z16, z32)
        torch.testing.assert_close(z16, z32, rtol=0.05, atol=0.02)
    runs = []
    for _ in range(2):
        models, dnn = build(2, 3)
        hist, _, _ = train_coherent(models, dnn, xs, y, xs, y, TrainOptions(epochs=8, batch_size=16, lr=1e-2), 5,
                                    exchange=SerialExchange(), precision="bf16-mixed")
        assert all(p.dtype == torch.float32 for m in [*models.values(), dnn] for p in m.parameters())
        runs.append(hist)
    assert [h["loss"] for h in runs[0]] == [h["loss"] for h in runs[1]]
    assert runs[0][-1]["val_acc"] > 0.6 and runs[0][-1]["loss"] < 0.9 * runs[0][0]["loss"]


@pytest.mark.parametrize("stop_at", [3, 8])  # in epoch 1, and in epoch 2 (6 steps + 1 validation batch an epoch)
def test_coherent_training_with_dropout_stopped_and_resumed_is_the_uninterrupted_one(stop_at):
    """Every model's dropout stream is part of the saved state (DropoutStreams), so a resumed run
    draws the masks the uninterrupted one drew; the stream, not the process's generator."""
    from mpidd.engine import Control, Preempted
    torch.set_num_threads(1)
    xs, y = problem()
    opts = TrainOptions(epochs=3, batch_size=16, lr=1e-2)

    def models():
        torch.manual_seed(0)
        local = {i: build_cnn(1, 3, (6, 6), CNNConfig(width=4, hidden=8, dropout=0.5)) for i in range(2)}
        return local, CoarseDNN(6, 3, (8,), dropout=0.5)

    local, dnn = models()
    reference, _, _ = train_coherent(local, dnn, xs, y, xs, y, opts, 5, exchange=SerialExchange())
    torch.manual_seed(123)  # the process's generator must not matter
    saved, calls = [], {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] == stop_at

    local, dnn = models()
    with pytest.raises(Preempted):
        train_coherent(local, dnn, xs, y, xs, y, opts, 5, exchange=SerialExchange(),
                       control=Control(stop=stop, save=saved.append))
    state = saved[-1]
    assert state["stopped"] and set(state["dropout"]) == {0, 1, "dnn"}
    torch.manual_seed(456)
    local, dnn = models()
    resumed, _, _ = train_coherent(local, dnn, xs, y, xs, y, opts, 5, exchange=SerialExchange(),
                                   control=Control(resume=state))
    assert [h["loss"] for h in resumed] == [h["loss"] for h in reference]
    assert [h["val_acc"] for h in resumed] == [h["val_acc"] for h in reference]
