import numpy as np

from mpidd.combine import accuracy, average_vote, majority_vote, train_coarse_dnn
from mpidd.engine import TrainOptions, evaluate


def onehotish(classes, K=3, p=0.6):
    out = np.full((len(classes), K), (1 - p) / (K - 1))
    out[np.arange(len(classes)), classes] = p
    return out


def test_average_picks_largest_mean_probability():
    probs = np.array([[[0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.4, 0.6, 0.0]]])
    assert average_vote(probs).tolist() == [0]  # mean 0.567 vs 0.433
    assert majority_vote(probs).tolist() == [1]  # two votes for class 1


def test_vote_tie_broken_by_summed_probability_then_lowest_index():
    probs = np.array([
        [[0.9, 0.1, 0.0], [0.1, 0.6, 0.3], [0.8, 0.2, 0.0], [0.0, 0.55, 0.45]],  # 2-2 tie: class 0 sums 1.8
        [[0.6, 0.4, 0.0], [0.4, 0.6, 0.0], [0.6, 0.4, 0.0], [0.4, 0.6, 0.0]],    # full tie: lowest index
    ])
    assert majority_vote(probs).tolist() == [0, 0]
    probs[0, 1] = [0.0, 1.0, 0.0]
    probs[0, 3] = [0.0, 1.0, 0.0]
    assert majority_vote(probs).tolist()[0] == 1  # class 1 now sums 2.3 > 1.7


def test_vote_and_average_on_random_probabilities_agree_with_reference():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), size=(200, 4))
    votes = probs.argmax(2)
    for n in range(200):
        counts = np.bincount(votes[n], minlength=5)
        tied = np.flatnonzero(counts == counts.max())
        expect = tied[np.argmax(probs[n].sum(0)[tied])]
        assert majority_vote(probs[n:n + 1])[0] == expect
    assert (average_vote(probs) == probs.sum(1).argmax(1)).all()


def test_coarse_dnn_learns_which_subdomain_to_trust():
    # subdomain 1 is always right, subdomain 0 is noise: the DNN must beat the average
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 1200)
    noise = rng.integers(0, 3, 1200)
    probs = np.stack([onehotish(noise, p=0.9), onehotish(y, p=0.5)], axis=1).astype(np.float32)
    x = probs.reshape(1200, -1)
    opts = TrainOptions(epochs=15, batch_size=64, lr=3e-3, select_best=True)
    model, history = train_coarse_dnn((x[:1000], y[:1000]), (x[1000:], y[1000:]), 3, (16,), 0.0, opts, seed=0)
    dnn_acc = evaluate(model, x[1000:], y[1000:])[1]
    assert dnn_acc > 0.95
    assert accuracy(average_vote(probs[1000:]), y[1000:]) < 0.6
    assert len(history) == 15 and sum(1 for h in history if h.get("best")) >= 1


def test_confusion_matrix_counts_true_rows_predicted_columns():
    from mpidd.methods.twolevel import confusion_matrix
    m = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert m == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert confusion_matrix([], [], 2) == [[0, 0], [0, 0]]


def weak_local_probabilities(n, N=4, K=4, signal=0.8, seed=0):
    """(n, N*K) probabilities of N weak local models: softmax(noise + signal at the true class),
    each model confident in its own way (a per-model temperature), and the labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    logits = rng.normal(size=(n, N, K)) + signal * np.eye(K)[y][:, None, :]
    logits *= rng.uniform(0.2, 3.0, size=(1, N, 1))
    p = np.exp(logits - logits.max(axis=2, keepdims=True))
    return (p / p.sum(axis=2, keepdims=True)).reshape(n, N * K).astype(np.float32), y


def test_coarse_dnn_learns_from_weak_locals_on_small_data():
    import dataclasses
    """200 training samples: the coarse DNN must not end at the uniform prediction while the
    average beats chance (the papers' probabilities with 5 epochs of batch 512 did)."""
    from mpidd.combine import accuracy, average_vote, train_coarse_dnn
    from mpidd.engine import TrainOptions, predict_proba
    N, K = 4, 4
    (x, y), (xv, yv), (xt, yt) = (weak_local_probabilities(n, N, K, seed=s) for n, s in ((200, 0), (200, 1), (1000, 2)))
    average = accuracy(average_vote(xt.reshape(-1, N, K)), yt)
    assert average > 1 / K + 0.1  # the locals carry signal
    opts = TrainOptions(epochs=5, batch_size=128, lr=3e-3, optimizer="adam", weight_decay=1e-4, select_best=True)
    dnn, history = train_coarse_dnn((x, y), (xv, yv), K, (64, 64), 0.0, opts, seed=0, min_steps=400)
    assert len(history) == 200  # 2 steps an epoch at batch 128: 400 steps are 200 epochs
    predicted = predict_proba(dnn, xt).argmax(1)
    assert len(set(predicted.tolist())) == K and accuracy(predicted, yt) > 1 / K + 0.2
    papers = dataclasses.replace(opts, batch_size=512, weight_decay=0.0)  # 5 steps on raw probabilities
    dnn, _ = train_coarse_dnn((x, y), (xv, yv), K, (64, 64), 0.0, papers, seed=0, inputs="prob", min_steps=0)
    assert accuracy(predict_proba(dnn, xt).argmax(1), yt) < 1 / K + 0.2  # what the step budget fixes


def test_coarse_dnn_input_transform_is_part_of_the_model():
    import torch
    from mpidd.models import PROBABILITY_FLOOR, CoarseDNN
    x, _ = weak_local_probabilities(300)
    x[0, 0] = 0.0  # a probability that underflowed
    dnn = CoarseDNN(16, 4)
    plain = dnn.net(torch.as_tensor(x))
    assert torch.equal(dnn(torch.as_tensor(x)), plain)  # built: the papers' probabilities as they are
    old = {k: v for k, v in dnn.state_dict().items() if k.startswith("net.")}  # a file from before
    dnn.use_log_probabilities(x)
    logs = np.log(np.maximum(x.astype(np.float64), PROBABILITY_FLOOR))
    assert np.allclose(dnn.input_mean.numpy(), logs.mean(0), atol=1e-5)
    assert np.allclose(dnn.input_std.numpy(), logs.std(0), rtol=1e-5)
    expected = dnn.net(torch.as_tensor(((logs - logs.mean(0)) / logs.std(0)).astype(np.float32)))
    assert torch.allclose(dnn(torch.as_tensor(x)), expected, atol=1e-4)
    again = CoarseDNN(16, 4)
    again.load_state_dict(dnn.state_dict())  # saved and loaded with the model
    assert torch.equal(again(torch.as_tensor(x)), dnn(torch.as_tensor(x)))
    again.load_state_dict(old)  # a file written before the transform: the identity
    assert torch.equal(again(torch.as_tensor(x)), plain)


def test_coarse_dnn_trains_on_inputs_transformed_once_as_on_each_batch():
    """train_coarse_dnn transforms the inputs once (CoarseDNN.transformed_inputs): the same
    model as a loop that transforms every batch in forward, and forward transforms again after."""
    import torch
    from mpidd.combine import initial_coarse_dnn, train_coarse_dnn
    from mpidd.engine import TrainOptions, train_classifier
    from mpidd.seeds import seed_for
    x, y = weak_local_probabilities(600)
    xv, yv = weak_local_probabilities(200, seed=1)
    x[0, 0] = 0.0
    opts = TrainOptions(epochs=2, batch_size=64, lr=3e-3, weight_decay=1e-4, select_best=True)
    dnn, history = train_coarse_dnn((x, y), (xv, yv), 4, (8, 8), 0.0, opts, seed=3, min_steps=0)
    per_batch = initial_coarse_dnn(16, 4, (8, 8), 0.0, seed=3).use_log_probabilities(x)
    reference, _ = train_classifier(per_batch, (x, y), (xv, yv), opts, seed_for(3, "coarse_order"))
    assert not dnn.inputs_transformed and [h["val_acc"] for h in history] == [h["val_acc"] for h in reference]
    for name, value in per_batch.state_dict().items():
        assert torch.allclose(dnn.state_dict()[name], value, rtol=1e-5, atol=1e-6), name
    with torch.no_grad(), dnn.transformed_inputs():
        once = dnn(dnn.transform(torch.as_tensor(xv)))
    assert torch.equal(once, dnn(torch.as_tensor(xv)).detach())


def test_log_moments_in_blocks_equal_the_whole_array():
    from mpidd.models import PROBABILITY_FLOOR, log_moments
    x, _ = weak_local_probabilities(1001)
    x[3, 2] = 0.0
    logs = np.log(np.maximum(x.astype(np.float64), PROBABILITY_FLOOR))
    for rows in (1, 100, 1000, 5000):  # blocks of one row, a ragged last block, one block
        mean, std = log_moments(x, rows=rows)
        assert np.allclose(mean, logs.mean(0), rtol=1e-12, atol=1e-12)
        assert np.allclose(std, logs.std(0), rtol=1e-12, atol=1e-12)


def test_coarse_epochs_are_a_budget_in_steps():
    from mpidd.combine import coarse_epochs
    from mpidd.engine import TrainOptions
    opts = TrainOptions(epochs=5, batch_size=128)
    assert coarse_epochs(55000, opts, 2000) == 5      # 430 steps an epoch: the epochs suffice
    assert coarse_epochs(2000, opts, 2000) == 125     # 16 steps an epoch
    assert coarse_epochs(2000, opts, 0) == 5
