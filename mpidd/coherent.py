"""The coherent CNN-DNN: N local CNNs and the coarse DNN trained as one model with one loss
(Klawonn, Lanser & Weber, arXiv 2408.14442). No MPI here: the exchange is passed in.

Model parallel, one step on a mini-batch (the same sample indices on every rank):

    every rank   out_r = [f(CNN_i(x_i)) for its subdomains i]       (B, m_r*K), f = softmax or identity
    exchange     z = gather(out_r) on the root, in subdomain order   (B, N*K)
    root         loss = CE(DNN(z), y); backward down to dL/dz
    exchange     dL/dout_r scattered back to rank r
    every rank   backward through its CNNs; its optimizer steps its own parameters (root: + DNN)

`exchange` is a callable with an `is_root` attribute: mpidd.parallel.ModelParallelExchange
under MPI, or `SerialExchange` (all N subdomains in one process), which makes the same code
the single-process reference of the model-parallel one.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from .engine import TrainOptions, lr_factor, make_optimizer, to_channels_last, to_float

OUTPUTS = ("probabilities", "logits")  # what the local CNNs send to the DNN
NAMES = {"random": "coherent (random init)", "pretrained": "coherent (transfer learning)"}  # by init


class SerialExchange:
    """Every subdomain in this process: the gathered tensor is the local one."""
    is_root, rank = True, 0
    seconds = cpu_seconds = bytes = 0

    def __call__(self, local: torch.Tensor) -> torch.Tensor:
        return local


def local_outputs(models: dict, xs: dict, idx, output: str) -> torch.Tensor:
    """(B, m*K): this rank's local CNN outputs on samples `idx`, its subdomains in ascending order."""
    outs = [models[i](to_float(xs[i][idx])) for i in sorted(models)]
    if output == "probabilities":
        outs = [torch.softmax(o, dim=1) for o in outs]
    return torch.cat(outs, dim=1)


def coherent_step(models, dnn, xs, y, idx, optimizer, *, exchange, output="probabilities"):
    """One training step; returns (loss, correct) on the root, (None, None) elsewhere."""
    optimizer.zero_grad(set_to_none=True)
    z = exchange(local_outputs(models, xs, idx, output))
    if exchange.is_root:
        logits = dnn(z)
        loss = nn.functional.cross_entropy(logits, y[idx])
        loss.backward()
    else:  # root owns the loss: this only receives dL/d(local outputs) and back-propagates it
        torch.autograd.backward(z, torch.zeros_like(z))
    optimizer.step()
    if exchange.is_root:
        return loss.item(), (logits.argmax(1) == y[idx]).sum().item()
    return None, None


@torch.no_grad()
def evaluate_coherent(models, dnn, xs: dict, y, *, exchange, output="probabilities", batch_size=256):
    """(loss, accuracy) of the coherent model on the root; None elsewhere. Collective."""
    for m in [*models.values(), dnn]:
        if m is not None:
            m.eval()
    xs = {i: torch.as_tensor(x) for i, x in xs.items()}
    for i in models:
        to_channels_last(models[i], xs[i].dim())
    n = len(next(iter(xs.values())))
    logits = []
    for start in range(0, n, batch_size):
        z = exchange(local_outputs(models, xs, slice(start, start + batch_size), output))
        if exchange.is_root:
            logits.append(dnn(z))
    if not exchange.is_root:
        return None
    logits, y = torch.cat(logits), torch.as_tensor(y)
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train_coherent(models: dict, dnn, train_xs: dict, train_y, val_xs: dict, val_y, opts: TrainOptions,
                   seed: int, *, exchange, output="probabilities", eval_batch_size=256, log=None):
    """Train the coherent model for opts.epochs; returns (history, optimizer, timing).

    `models` are this rank's local CNNs {subdomain: module}; `dnn` is the coarse DNN on the
    root (None elsewhere); `*_xs` map subdomain -> its subimages. Every rank must call this
    with the same sample counts, options and seed: the batch order is drawn from `seed` alone,
    so every rank takes the same samples at every step. `timing` holds the training steps'
    wall and CPU seconds and the parts of them spent in the exchange.
    """
    generator = torch.Generator().manual_seed(seed)
    xs = {i: torch.as_tensor(x) for i, x in train_xs.items()}
    y = torch.as_tensor(train_y)
    for i in models:
        to_channels_last(models[i], xs[i].dim())
    owned = nn.ModuleList([*models.values(), *([dnn] if exchange.is_root else [])])
    optimizer = make_optimizer(owned, opts)
    n = len(y)
    bounds = list(range(0, n, opts.batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]  # no batch of one image (BatchNorm)
    steps_per_epoch = len(bounds) - 1
    total_steps = steps_per_epoch * opts.epochs
    history, step = [], 0
    timing = {"steps": 0, "step_s": 0.0, "step_cpu_s": 0.0, "exchange_s": 0.0, "exchange_cpu_s": 0.0,
              "exchange_bytes": 0}
    start = time.perf_counter()
    for epoch in range(1, opts.epochs + 1):
        owned.train()
        t0, cpu0 = time.perf_counter(), time.process_time()
        exchanged0, exchange_cpu0, bytes0 = exchange.seconds, exchange.cpu_seconds, exchange.bytes
        order = torch.randperm(n, generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        for b in range(steps_per_epoch):
            idx = order[bounds[b]:bounds[b + 1]]
            for group in optimizer.param_groups:
                group["lr"] = opts.lr * lr_factor(opts.schedule, step, total_steps)
            loss, right = coherent_step(models, dnn, xs, y, idx, optimizer, exchange=exchange, output=output)
            step, seen = step + 1, seen + len(idx)
            if loss is not None:
                loss_sum, correct = loss_sum + loss * len(idx), correct + right
            if log and opts.log_interval and (b + 1) % opts.log_interval == 0 and b + 1 < steps_per_epoch:
                rate = seen / (time.perf_counter() - t0)
                log({"epoch": epoch, "batch": b + 1, "batches": steps_per_epoch,
                     "loss": loss_sum / seen if exchange.is_root else math.nan,
                     "acc": correct / seen if exchange.is_root else math.nan,
                     "images_per_s": rate, "eta_s": (total_steps - step) * opts.batch_size / rate})
        seconds = time.perf_counter() - t0
        timing["steps"] += steps_per_epoch
        timing["step_s"] += seconds
        timing["step_cpu_s"] += time.process_time() - cpu0
        timing["exchange_s"] += exchange.seconds - exchanged0
        timing["exchange_cpu_s"] += exchange.cpu_seconds - exchange_cpu0
        timing["exchange_bytes"] += exchange.bytes - bytes0
        val = evaluate_coherent(models, dnn, val_xs, val_y, exchange=exchange, output=output,
                                batch_size=eval_batch_size)
        val_loss, val_acc = val if val is not None else (math.nan, math.nan)
        elapsed = time.perf_counter() - start
        record = {"epoch": epoch, "loss": loss_sum / seen if exchange.is_root else math.nan,
                  "acc": correct / seen if exchange.is_root else math.nan,
                  "val_loss": val_loss, "val_acc": val_acc, "lr": optimizer.param_groups[0]["lr"],
                  "images_per_s": seen / seconds, "seconds": seconds,
                  "eta_s": elapsed / epoch * (opts.epochs - epoch)}
        history.append(record)
        if log:
            log(record)
    timing["exchange_fraction"] = timing["exchange_s"] / timing["step_s"] if timing["step_s"] else 0.0
    timing["exchange_cpu_fraction"] = timing["exchange_cpu_s"] / timing["step_cpu_s"] if timing["step_cpu_s"] else 0.0
    return history, optimizer, timing

