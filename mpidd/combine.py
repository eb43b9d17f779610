"""Coarse combiners of local class probabilities. No MPI.

`probs` is (n, N, K): the K class probabilities of each of the N local models for n images
(the gathered (n, N*K) array reshaped). All functions return predicted classes (n,).
"""

from __future__ import annotations

import numpy as np
import torch

from .engine import TrainOptions, seed_for, train_classifier
from .models import CoarseDNN


def average_vote(probs: np.ndarray) -> np.ndarray:
    """Average probability: the class with the largest mean probability over the N models."""
    return probs.mean(axis=1).argmax(axis=1)


def majority_vote(probs: np.ndarray) -> np.ndarray:
    """Majority vote of the N local decisions (argmax of each model).

    Tie rule: among the classes with the most votes, the one with the largest summed
    probability over all N models wins (and, if that ties too, the lowest class index).
    """
    n, N, K = probs.shape
    votes = np.zeros((n, K), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(n), N), probs.argmax(axis=2).ravel()), 1)
    tied = votes == votes.max(axis=1, keepdims=True)
    return np.where(tied, probs.sum(axis=1), -np.inf).argmax(axis=1)


def accuracy(pred, labels) -> float:
    return float((np.asarray(pred) == np.asarray(labels)).mean())


def train_coarse_dnn(train, val, num_classes, hidden, dropout, opts: TrainOptions, seed: int, log=None,
                     control=None):
    """Train the coarse DNN on flattened (n, N*K) probabilities; model selection on val.
    `control`: stop, checkpoint and resume (mpidd.engine.Control)."""
    x, y = train
    torch.manual_seed(seed_for(seed, "coarse"))
    model = CoarseDNN(x.shape[1], num_classes, hidden, dropout)
    history, _ = train_classifier(model, (x, y), val, opts, seed_for(seed, "coarse_order"), log, control=control)
    return model, history
