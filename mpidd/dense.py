"""Training and inference of dense-prediction networks (U-Nets, mpidd.unet) on in-memory arrays:
the loop every method of --task segment | regress uses for one network. Pure torch, no MPI.

It is engine.run_epochs' loop (batch order from the seed alone, learning-rate schedule,
progress, stop / checkpoint / resume exactly) with a dense loss (metrics.dense_loss) and a
per-sample score in place of the accuracy: for segment the pixel accuracy, for regress the mean
absolute error (lower is better). Images are uint8 (scaled to [0, 1] batch by batch) or
float32; targets are int64 masks (n, [D,] H, W) or float32 fields (n, C_out, [D,] H, W).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .engine import Control, Preempted, TrainOptions, autocast, make_optimizer, module_device, never, run_epochs, \
    to_channels_last, to_float
from .feed import Feed, eval_batches
from .metrics import dense_loss

SCORE_NAMES = {"segment": "pixel accuracy", "regress": "MAE"}  # what a record's "acc" holds, by task


def score_text(task: str):
    """How progress lines write a dense record's acc (methods.context.progress_printer's score)."""
    if task == "segment":
        return lambda v: f"pixel acc {100 * v:.2f}%"
    return lambda v: f"mae {v:.5f}"


def target_tensor(t, task: str) -> torch.Tensor:
    """Targets as the loss takes them: int64 masks or float32 fields."""
    t = torch.as_tensor(np.asarray(t))
    return t.long() if task == "segment" else t.float()


def sample_scores(out: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    """Per sample (B,): the pixel accuracy (segment) or the mean absolute error (regress)."""
    if task == "segment":
        return (out.argmax(1) == target).flatten(1).float().mean(1)
    return (out - target).abs().flatten(1).mean(1)


def train_dense(model: nn.Module, train, val, opts: TrainOptions, seed: int, task: str, loss: str,
                log=None, control: Control | None = None, precision: str = "32", optimizer=None):
    """Train `model` on train = (x, targets), validating on val = (x, targets) (or None) each
    epoch; returns (history, optimizer). Every record's loss and val_loss are the dense loss,
    its acc and val_acc the task's score (SCORE_NAMES). `control`: stop, checkpoint and resume
    (see engine.Control)."""
    device = module_device(model)
    x, t = Feed(train[0], device), target_tensor(train[1], task).to(device)
    to_channels_last(model, x.dim())
    loss_fn = dense_loss(task, loss)
    optimizer = optimizer if optimizer is not None else make_optimizer(model, opts)

    def step(idx):
        xb, tb = to_float(x.take(idx.to(device)).to(device)), t[idx.to(device)]
        with autocast(device, precision):
            out = model(xb)
        value = loss_fn(out.float(), tb)
        value.backward()
        return value.item() * len(idx), sample_scores(out.detach().float(), tb, task).sum().item()

    def validate(stop):
        return evaluate_dense(model, val[0], val[1], task, loss, stop=stop, precision=precision)

    try:
        history = run_epochs(model, optimizer, opts, seed, len(t), step,
                             validate=validate if val is not None else None, log=log, control=control,
                             plan=lambda batches: x.plan(batches))
    finally:
        x.close()
    return history, optimizer


@torch.no_grad()
def predict_dense(model: nn.Module, x, batch_size: int = 64, stop=never, precision: str = "32") -> torch.Tensor:
    """The float32 outputs (n, C_out, ...) of `model` on x, in batches (class scores for
    segment: their argmax over axis 1 is the mask)."""
    model.eval()
    device = module_device(model)
    feed = Feed(x)
    to_channels_last(model, feed.dim())
    batches = eval_batches(len(feed), len(feed), batch_size, None)
    feed.plan([torch.arange(b.start, b.stop) for b in batches])
    out = None
    try:
        for batch in batches:
            if stop():
                raise Preempted
            with autocast(device, precision):
                y = model(to_float(feed.take(batch).to(device))).float().cpu()
            if out is None:
                out = torch.empty((len(feed),) + tuple(y.shape[1:]), dtype=torch.float32)
            out[batch] = y
    finally:
        feed.close()
    return out if out is not None else torch.zeros(0)


def evaluate_dense(model: nn.Module, x, t, task: str, loss: str, batch_size: int = 64, stop=never,
                   precision: str = "32") -> tuple[float, float]:
    """(dense loss, mean per-sample score) of `model` on (x, t): what validation reports."""
    out = predict_dense(model, x, batch_size, stop, precision)
    target = target_tensor(t, task)
    return dense_loss(task, loss)(out, target).item(), sample_scores(out, target, task).mean().item()
