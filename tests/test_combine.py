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
