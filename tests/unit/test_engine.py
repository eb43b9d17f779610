"""Stop, checkpoint and resume of the training loops (serial): a resumed run is the uninterrupted one."""

import copy

import numpy as np
import pytest
import torch

from mpidd import engine
from mpidd.engine import Control, Preempted, Shard, TrainOptions, precision_error, predict_proba, train_classifier
from mpidd.feed import batch_bounds, eval_batches
from mpidd.models import CNNConfig, GroupBatchNorm, build_cnn, group_batchnorm
from mpidd.seeds import derive_seed

SCORES = ("epoch", "loss", "acc", "val_loss", "val_acc", "lr")


def problem(n=96):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    x = (torch.rand(n, 1, 8, 8, generator=g) * 100 + y[:, None, None, None] * 60).to(torch.uint8)
    return x.numpy(), y.numpy()


def fresh_model(seed):
    torch.manual_seed(seed)
    return build_cnn(1, 3, (8, 8), CNNConfig(width=4, hidden=8))


def train(opts, control=None, test=None):
    x, y = problem()
    seed = derive_seed(1, 0, 0)
    model = fresh_model(seed)
    history, _ = train_classifier(model, (x, y), (x[:40], y[:40]), opts, seed, control=control,
                                  test=(x[40:], y[40:]) if test else None)
    return model, history


def scores(history):
    return [{k: r[k] for k in SCORES} for r in history]


class StopAfter:
    """stop() that answers True at its k-th call (a step boundary or an evaluation batch)."""

    def __init__(self, k):
        self.k, self.calls = k, 0

    def __call__(self):
        self.calls += 1
        return self.calls == self.k


@pytest.mark.parametrize("select_best", [False, True])
@pytest.mark.parametrize("stop_at", [1, 4, 6, 9, 13, 27])  # 9 polls an epoch: 6 steps, 2 curve points, val
def test_stopped_and_resumed_training_is_the_uninterrupted_one(stop_at, select_best):
    torch.set_num_threads(1)
    opts = TrainOptions(epochs=3, batch_size=16, select_best=select_best, test_points=2)  # 6 steps an epoch
    reference, ref_history = train(opts, test=True)

    saved = []
    with pytest.raises(Preempted):
        train(opts, Control(stop=StopAfter(stop_at), save=lambda s: saved.append(copy.deepcopy(s))), test=True)
    state = saved[-1]
    assert state["stopped"]
    resumed, history = train(opts, Control(resume=state), test=True)  # a fresh model, as after a restart

    assert scores(history) == scores(ref_history)
    assert [[p["test_acc"] for p in r["curve"]] for r in history] == \
           [[p["test_acc"] for p in r["curve"]] for r in ref_history]
    for a, b in zip(resumed.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_a_finished_loop_resumes_to_its_end():
    opts = TrainOptions(epochs=2, batch_size=32, select_best=True)
    saved = []
    reference, ref_history = train(opts, Control(save=lambda s: saved.append(copy.deepcopy(s))))
    assert [s["done"] for s in saved] == [False, True] and saved[0]["epoch"] == 2
    resumed, history = train(opts, Control(resume=saved[-1]))
    assert scores(history) == scores(ref_history)
    x, _ = problem()
    assert np.array_equal(predict_proba(resumed, x), predict_proba(reference, x))


def test_a_stop_inside_prediction_raises():
    x, _ = problem()
    with pytest.raises(Preempted):
        predict_proba(fresh_model(0), x, batch_size=16, stop=StopAfter(3))


def test_batches_and_evaluation_batches_cover_every_sample_once():
    assert batch_bounds(10, 4) == [0, 4, 8, 10]
    assert batch_bounds(9, 4) == [0, 4, 9]  # no batch of one image (BatchNorm)
    # data parallel: every member takes the same number of evaluation batches (the same collectives)
    for size in (1, 2, 3, 7):
        covered, counts = [], set()
        for g in range(size):
            lo, hi = g * 50 // size, (g + 1) * 50 // size
            batches = eval_batches(hi - lo, 50, 16, group=type("G", (), {"size": size})() if size > 1 else None)
            counts.add(len(batches))
            covered += [lo + i for s in batches for i in range(hi - lo)[s]]
        assert sorted(covered) == list(range(50)) and len(counts) == 1


def test_group_batchnorm_with_one_member_is_batchnorm():
    """GroupBatchNorm with the identity as allreduce: forward, backward and running stats of BatchNorm."""
    torch.manual_seed(0)
    model = build_cnn(1, 3, (8, 8), CNNConfig(width=4, hidden=8))
    group_model = group_batchnorm(copy.deepcopy(model), lambda t: t)
    assert any(isinstance(m, GroupBatchNorm) for m in group_model.modules())
    x, y = problem(32)
    xb = torch.as_tensor(x, dtype=torch.float32) / 255
    for m in (model, group_model):
        m.train()
        torch.nn.functional.cross_entropy(m(xb), torch.as_tensor(y)).backward()
    for (name, a), b in zip(model.named_parameters(), group_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(model.state_dict().items(), group_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    model.eval(), group_model.eval()
    torch.testing.assert_close(model(xb), group_model(xb))


def test_shard_knows_its_place():
    s = Shard(np.zeros((5, 1, 2, 2)), np.zeros(5), start=10, total=20)
    assert (s.start, s.total, len(s.y)) == (10, 20, 5)


# --- precision (--precision 32 | bf16-mixed) ---------------------------------------------------

def conv_output_dtypes(model):
    """Record the dtype of every convolution's output (the forward pass's compute type)."""
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    return seen


@pytest.mark.skipif(precision_error("bf16-mixed", "cpu") is not None, reason="this CPU has no bfloat16")
def test_bf16_mixed_training_computes_in_bf16_keeps_float32_state_and_is_reproducible():
    torch.set_num_threads(1)
    x, y = problem()
    opts = TrainOptions(epochs=6, batch_size=16)
    runs = {}
    for name, precision in (("32", "32"), ("bf16", "bf16-mixed"), ("bf16 again", "bf16-mixed")):
        model = fresh_model(3)
        dtypes = conv_output_dtypes(model)
        history, optimizer = train_classifier(model, (x, y), (x[:40], y[:40]), opts, 3, precision=precision)
        state = optimizer.state_dict()["state"]
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(t.dtype == torch.float32 for s in state.values() for k, t in s.items() if k != "step")
        assert set(dtypes) == {torch.bfloat16 if precision == "bf16-mixed" else torch.float32}
        probs = predict_proba(model, x[:10], precision=precision)
        assert probs.dtype == np.float32
        runs[name] = (scores(history), [p.detach().clone() for p in model.parameters()], probs)
    assert runs["bf16"][0] == runs["bf16 again"][0]
    assert all(torch.equal(a, b) for a, b in zip(runs["bf16"][1], runs["bf16 again"][1]))
    assert runs["bf16"][0] != runs["32"][0]  # the forward passes really ran in bf16
    assert runs["bf16"][0][-1]["val_acc"] > 0.9 and runs["32"][0][-1]["val_acc"] > 0.9  # and both learn


def test_precision_errors(monkeypatch):
    assert precision_error("32", "cpu") is None
    assert "unknown --precision 'fp8'" in precision_error("fp8", "cpu", "--precision")
    monkeypatch.setattr(engine, "_cpu_has_bf16", lambda: False)
    assert precision_error("bf16-mixed", "cpu", "--precision") == (
        "--precision bf16-mixed: this CPU has no bfloat16 support in oneDNN (it needs AVX512 or AMX); "
        "use --precision 32")
    assert precision_error("32", "cpu") is None
    with pytest.raises(ValueError, match="unknown precision"):
        engine.autocast("cpu", "16")


@pytest.mark.skipif(precision_error("bf16-mixed", "cpu") is not None, reason="this CPU has no bfloat16")
def test_group_batchnorm_under_bf16_autocast_is_batchnorm():
    """A data-parallel group's BatchNorm normalises bf16 activations in float32, as nn.BatchNorm
    does: outputs in bf16 and within bf16 rounding of it, running statistics close."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    group_bn = GroupBatchNorm(copy.deepcopy(bn), lambda t: t)
    x = torch.randn(32, 4, 6, 6) * 3 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.nn.functional.conv2d(x, torch.eye(4).view(4, 4, 1, 1))  # bf16, as a conv's output
        a, b = bn(h), group_bn(h)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(bn.running_mean, group_bn.running_mean, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(bn.running_var, group_bn.running_var, rtol=1e-3, atol=1e-4)
