"""Online training of the two-level CNN-DNN (TwoLevelClassifier.partial_fit): a solver hands over
new samples call after call and never again. One call, collective over ctx.comm:

    every rank   each local CNN of this rank: `epochs` passes (partial_epochs, default 1) over
                 the new samples and the replay buffer (its subimages of them), with the
                 optimizer kept from the previous calls; then its class probabilities on them
    gather       gather_to_coarse, as in the two-level fit                    (n, N*K) on rank 0
    rank 0       the coarse DNN: coarse epochs (cfg.coarse.epochs) passes over them, its optimizer
                 kept too: it is small, and each call fits it to the local CNNs as they are now
    every rank   the new samples enter the buffer by reservoir sampling: the buffer stays a
                 uniform sample of every sample seen, at most buffer_size of them

Every random draw comes from (seed, call number): the state to keep (OnlineState) is the
weights, the optimizers, the buffers and two counters, and a continued run (save, load,
partial_fit) computes what the uninterrupted one does. Every rank draws the same reservoir
slots, so the buffers of all subdomains hold the same samples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ..engine import Shard, TrainOptions, make_optimizer, train_classifier
from ..seeds import seed_for
from . import twolevel
from .context import Context


@dataclass
class OnlineState:
    """What partial_fit keeps between calls on this rank (save writes it, load restores it)."""
    calls: int = 0                 # partial_fit calls so far
    seen: int = 0                  # samples handed over so far
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # the buffer's (b,) class indices
    buffers: dict = field(default_factory=dict)      # {subdomain: (b, C, *box) subimages} of this rank
    optimizers: dict = field(default_factory=dict)   # {subdomain: torch optimizer}
    coarse_optimizer: object = None                  # rank 0's


def one_call(opts: TrainOptions, epochs: int = 1) -> TrainOptions:
    """`epochs` passes, the learning-rate schedule over the call's steps (restarted each call:
    an online run has no end for one schedule to aim at; a cosine ends each call at a small
    learning rate, and the weights a call hands on are not those of its noisiest steps)."""
    return dataclasses.replace(opts, epochs=epochs, select_best=False)


def reservoir_slots(seen: int, size: int, n_new: int, rng) -> np.ndarray:
    """For each of n_new samples arriving after `seen`: its slot in a buffer of `size`, or -1
    (Vitter's algorithm R: sample t is kept with probability size/(t+1), in a random slot)."""
    t = seen + np.arange(n_new)
    draw = rng.integers(0, t + 1) if n_new else np.zeros(0, np.int64)
    return np.where(t < size, t, np.where(draw < size, draw, -1))


def partial_fit(ctx: Context, state: OnlineState, new: dict, labels: np.ndarray, local: dict, dnn,
                num_subdomains: int, num_classes: int, cfg: twolevel.TwoLevelConfig, buffer_size: int,
                epochs: int = 1) -> dict | None:
    """One online call (see the module docstring). new: {subdomain: (n, C, *box) subimages} of
    this rank; labels: (n,) class indices, the same on every rank; local: {subdomain: model}
    of this rank; dnn: rank 0's coarse DNN; epochs: passes over the new samples and the buffer.
    Returns rank 0's record of the call, None elsewhere."""
    y = np.concatenate([labels.astype(np.int64), state.labels])
    opts = one_call(cfg.local, epochs)
    subsets, local_acc = {}, {}
    for i, model in local.items():
        x = np.concatenate([np.asarray(new[i]), state.buffers[i]]) if len(state.labels) else np.asarray(new[i])
        subsets[i] = {"train": Shard(x, y)}
        if i not in state.optimizers:
            state.optimizers[i] = make_optimizer(model, opts)
        history, _ = train_classifier(model, subsets[i]["train"], None, opts,
                                      seed_for(cfg.seed, "online", state.calls, i), optimizer=state.optimizers[i],
                                      precision=ctx.precision)
        local_acc[i] = history[-1]["acc"]
    probs = twolevel.local_probabilities(ctx, local, subsets, ("train",), cfg.eval_batch_size)
    gathered = twolevel.gather_to_coarse(ctx, probs, subsets, num_subdomains, num_classes, {"train": len(y)})
    record = None
    if ctx.master_process:
        coarse = coarse_pass(state, dnn, gathered["train"], y, cfg)
        record = {"call": state.calls + 1, "samples": len(y), "seen": state.seen + len(labels),
                  "coarse_loss": coarse["loss"], "coarse_acc": coarse["acc"], "local_acc": local_acc,
                  "seconds": coarse["seconds"]}
    remember(state, new, labels, buffer_size, cfg.seed)
    return record


def coarse_pass(state: OnlineState, dnn, gathered: np.ndarray, y: np.ndarray, cfg: twolevel.TwoLevelConfig) -> dict:
    """Rank 0: the coarse DNN's cfg.coarse.epochs passes over the gathered (n, N*K) probabilities of the call."""
    opts = one_call(cfg.coarse, cfg.coarse.epochs)
    if cfg.coarse_input == "logprob":  # standardised with this call's statistics: the local CNNs have changed
        dnn.use_log_probabilities(gathered)
    if state.coarse_optimizer is None:
        state.coarse_optimizer = make_optimizer(dnn, opts)
    history, _ = train_classifier(dnn, (gathered, y), None, opts, seed_for(cfg.seed, "online_coarse", state.calls),
                                  optimizer=state.coarse_optimizer)
    return history[-1]


def remember(state: OnlineState, new: dict, labels: np.ndarray, buffer_size: int, seed: int):
    """The new samples into the buffer (the same slots on every rank); the call is counted."""
    rng = np.random.default_rng(seed_for(seed, "replay", state.calls))
    slots = reservoir_slots(state.seen, buffer_size, len(labels), rng)
    grow = int(min(buffer_size, state.seen + len(labels)) - len(state.labels))
    if grow > 0:
        state.labels = np.concatenate([state.labels, np.zeros(grow, np.int64)])
        for i, part in new.items():
            part = np.asarray(part)
            old = state.buffers.get(i, np.zeros((0,) + part.shape[1:], part.dtype))
            state.buffers[i] = np.concatenate([old, np.zeros((grow,) + part.shape[1:], part.dtype)])
    for k, slot in enumerate(slots):  # in arrival order: a later sample may take an earlier one's slot
        if slot >= 0:
            state.labels[slot] = labels[k]
            for i, part in new.items():
                state.buffers[i][slot] = part[k]
    state.seen += len(labels)
    state.calls += 1
