"""Coarse combiners of local class probabilities. No MPI.

`probs` is (n, N, K): the K class probabilities of each of the N local models for n images
(the gathered (n, N*K) array reshaped). All functions return predicted classes (n,).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .engine import TrainOptions, train_classifier
from .models import COARSE_INPUTS, CoarseDNN
from .seeds import seed_for


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


def coarse_epochs(n: int, opts: TrainOptions, min_steps: int) -> int:
    """opts.epochs, or more when n samples give fewer than min_steps optimizer steps: a budget
    in steps, so that small training sets still train the coarse DNN (a 2,000-image set gives
    16 steps an epoch at batch 128)."""
    steps_per_epoch = max(1, math.ceil(n / opts.batch_size))
    return max(opts.epochs, math.ceil(min_steps / steps_per_epoch))


def initial_coarse_dnn(in_features, num_classes, hidden, dropout, seed: int) -> CoarseDNN:
    """The coarse DNN as training starts it: initialised from seed_for(seed, "coarse")."""
    torch.manual_seed(seed_for(seed, "coarse"))
    return CoarseDNN(in_features, num_classes, hidden, dropout)


@torch.no_grad()
def transformed_inputs(model: CoarseDNN, x, rows: int = 8192) -> torch.Tensor:
    """model.transform(x) as one float32 (n, F) tensor, computed in blocks of `rows` rows: the
    temporaries are a block's (the training split's probabilities can be large on rank 0)."""
    x = torch.as_tensor(x)
    out = torch.empty(x.shape, dtype=torch.float32)
    for a in range(0, len(x), rows):
        out[a:a + rows] = model.transform(x[a:a + rows])
    return out


def train_coarse_dnn(train, val, num_classes, hidden, dropout, opts: TrainOptions, seed: int, log=None,
                     control=None, inputs: str = "logprob", min_steps: int = 0):
    """Train the coarse DNN on flattened (n, N*K) probabilities for coarse_epochs(...) epochs;
    the best epoch on val is kept (opts.select_best). inputs: "logprob" (standardised
    log-probabilities, see CoarseDNN) or "prob" (as they are). `control`: stop, checkpoint and
    resume (mpidd.engine.Control)."""
    x, y = train
    if inputs not in COARSE_INPUTS:
        raise ValueError(f"coarse DNN inputs {inputs!r}: one of {', '.join(COARSE_INPUTS)}")
    model = initial_coarse_dnn(x.shape[1], num_classes, hidden, dropout, seed)
    if inputs == "logprob":
        model.use_log_probabilities(x)
    opts = dataclasses.replace(opts, epochs=coarse_epochs(len(y), opts, min_steps))
    x = transformed_inputs(model, x)  # once, not every batch of every epoch
    val = val if val is None else (transformed_inputs(model, val[0]), val[1])
    with model.transformed_inputs():
        history, _ = train_classifier(model, (x, y), val, opts, seed_for(seed, "coarse_order"), log, control=control)
    return model, history
