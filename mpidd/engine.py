"""Training and inference loops on in-memory arrays. Pure torch, no MPI.

Images arrive as numpy uint8 (scaled to [0, 1] batch by batch, so only the batch is ever
float) or float32 arrays; the coarse DNN's inputs are float32 probabilities.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class TrainOptions:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 2e-3
    optimizer: str = "adam"      # adam | sgd
    momentum: float = 0.9        # sgd only
    weight_decay: float = 0.0
    schedule: str = "cosine"     # cosine | step | constant (per step; step: x0.1 at 50% and 75%)
    select_best: bool = False    # keep the weights of the epoch with the best validation accuracy
    test_points: int = 1         # with a test set: test accuracy this many times per epoch (curve)
    log_interval: int = 0        # progress every this many batches (0: per epoch only)


def derive_seed(seed: int, *keys: int) -> int:
    """Independent 63-bit seed for (seed, keys): e.g. (seed, 0, subdomain) for a local model."""
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1, np.uint64)[0] >> 1)


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images -> [0, 1]; image batches in channels-last order, which oneDNN's CPU
    convolutions run about 1.4x faster than the default order for these small CNNs."""
    batch = batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()
    return batch.contiguous(memory_format=_memory_format(batch.dim()))


def _memory_format(ndim: int):
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim, torch.contiguous_format)


def to_channels_last(model: nn.Module, ndim: int) -> nn.Module:
    """Store conv weights in the same order as the batches (see to_float)."""
    return model.to(memory_format=_memory_format(ndim)) if ndim in (4, 5) else model


def make_optimizer(model, opts: TrainOptions):
    if opts.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay, foreach=True)
    if opts.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=opts.momentum,
                               weight_decay=opts.weight_decay, nesterov=opts.momentum > 0, foreach=True)
    raise ValueError(f"unknown optimizer {opts.optimizer!r} (adam or sgd)")


def lr_factor(schedule: str, step: int, total: int) -> float:
    if schedule == "constant" or total <= 0:
        return 1.0
    frac = step / total
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "step":
        return 1.0 if frac < 0.5 else (0.1 if frac < 0.75 else 0.01)
    raise ValueError(f"unknown schedule {schedule!r} (cosine, step or constant)")


@torch.no_grad()
def predict_logits(model: nn.Module, x, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    x = torch.as_tensor(x)
    to_channels_last(model, x.dim())
    return torch.cat([model(to_float(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def predict_proba(model: nn.Module, x, batch_size: int = 256) -> np.ndarray:
    """Softmax class probabilities, float32 (n, K)."""
    return torch.softmax(predict_logits(model, x, batch_size), dim=1).numpy().astype(np.float32)


def evaluate(model: nn.Module, x, y, batch_size: int = 256) -> tuple[float, float]:
    """(cross-entropy loss, accuracy) of `model` on (x, y)."""
    logits = predict_logits(model, x, batch_size)
    y = torch.as_tensor(y)
    loss = nn.functional.cross_entropy(logits, y).item()
    return loss, (logits.argmax(1) == y).float().mean().item()


def train_classifier(model: nn.Module, train, val, opts: TrainOptions, seed: int, log=None, test=None):
    """Train `model` on train=(x, y), validating on val each epoch.

    `log(record)` is called after every epoch (record has epoch, loss, acc, val_loss, val_acc,
    lr, images_per_s, eta_s, seconds and cpu_seconds of the epoch's training steps) and every
    `opts.log_interval` batches (record has "batch"). With `test`=(x, y) every epoch's record
    also has test_loss, test_acc and `curve`: the test accuracy at `opts.test_points` evenly
    spaced steps of the epoch (the last at its end), each point {"epoch": fractional epoch,
    "cpu_s": training CPU seconds since the start, "test_acc"}. These are for time-to-accuracy
    curves only (nothing is chosen by them), and their evaluations are left out of the seconds
    and cpu_seconds. Returns the per-epoch history; with select_best the model ends with the
    weights of the best validation epoch.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.as_tensor(train[0]), torch.as_tensor(train[1])
    to_channels_last(model, x.dim())
    n = len(x)
    bounds = list(range(0, n, opts.batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]  # no batch of one image: BatchNorm cannot normalise it on 1x1 maps
    steps_per_epoch = len(bounds) - 1
    total_steps = steps_per_epoch * opts.epochs
    optimizer = make_optimizer(model, opts)
    history, best, best_acc, step, train_cpu = [], None, -1.0, 0, 0.0
    points = {round(k * steps_per_epoch / opts.test_points) for k in range(1, opts.test_points + 1)} - {0}
    start = time.perf_counter()
    for epoch in range(1, opts.epochs + 1):
        model.train()
        t0, cpu0 = time.perf_counter(), time.process_time()
        curve, eval_s, eval_cpu = [], 0.0, 0.0  # the curve's evaluations, left out of the timings
        order = torch.randperm(n, generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        for b in range(steps_per_epoch):
            idx = order[bounds[b]:bounds[b + 1]]
            xb, yb = to_float(x[idx]), y[idx]
            for group in optimizer.param_groups:
                group["lr"] = opts.lr * lr_factor(opts.schedule, step, total_steps)
            optimizer.zero_grad(set_to_none=True)
            out = model(xb)
            loss = nn.functional.cross_entropy(out, yb)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            correct += (out.argmax(1) == yb).sum().item()
            seen += len(idx)
            if test is not None and b + 1 in points:
                w, c = time.perf_counter(), time.process_time()
                point = {"epoch": epoch - 1 + (b + 1) / steps_per_epoch, "cpu_s": train_cpu + c - cpu0 - eval_cpu}
                point["test_loss"], point["test_acc"] = evaluate(model, *test)
                curve.append(point)
                model.train()
                eval_s, eval_cpu = eval_s + time.perf_counter() - w, eval_cpu + time.process_time() - c
            if log and opts.log_interval and (b + 1) % opts.log_interval == 0 and b + 1 < steps_per_epoch:
                rate = seen / (time.perf_counter() - t0 - eval_s)
                remaining = (total_steps - step) * opts.batch_size / rate
                log({"epoch": epoch, "batch": b + 1, "batches": steps_per_epoch,
                     "loss": loss_sum / seen, "acc": correct / seen,
                     "images_per_s": rate, "eta_s": remaining})
        seconds, cpu_seconds = time.perf_counter() - t0 - eval_s, time.process_time() - cpu0 - eval_cpu
        train_cpu += cpu_seconds
        val_loss, val_acc = evaluate(model, *val) if val is not None else (float("nan"), float("nan"))
        elapsed = time.perf_counter() - start
        record = {"epoch": epoch, "loss": loss_sum / seen, "acc": correct / seen,
                  "val_loss": val_loss, "val_acc": val_acc,
                  "lr": optimizer.param_groups[0]["lr"], "images_per_s": seen / seconds,
                  "seconds": seconds, "cpu_seconds": cpu_seconds,
                  "eta_s": elapsed / epoch * (opts.epochs - epoch)}
        if test is not None:  # the epoch's last point was taken after its last step
            record["curve"], record["curve_seconds"], record["curve_cpu_seconds"] = curve, eval_s, eval_cpu
            record["test_loss"], record["test_acc"] = curve[-1]["test_loss"], curve[-1]["test_acc"]
        history.append(record)
        if opts.select_best and val_acc > best_acc:
            best_acc, best = val_acc, copy.deepcopy(model.state_dict())
            record["best"] = True
        if log:
            log(record)
    if opts.select_best and best is not None:
        model.load_state_dict(best)
    return history, optimizer
