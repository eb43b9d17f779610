"""Training and inference loops on in-memory arrays. Pure torch, no MPI.

Images arrive as numpy uint8 (scaled to [0, 1] batch by batch, so only the batch is ever
float) or float32 arrays; the coarse DNN's inputs are float32 probabilities.

Every loop here can be stopped, checkpointed and resumed exactly (`Control`): it polls
`stop()` at every step boundary and every evaluation batch; on a stop it hands its whole
state (weights, optimizer, position in the epoch, random generators, running sums) to
`save` and raises `Preempted`; given that state back as `resume`, it continues with the
very next step, so the resumed run computes what the uninterrupted one would have.

Images may live in memory (numpy or torch) or in the file (mpidd.stream.BoxStream): a `Feed`
(mpidd.feed) hands a loop its batches either way, the same images for the same indices, in the
epoch's order (feed.epoch_order).

Data parallel (`group`, see mpidd.parallel.DataParallelGroup): the ranks of a group each hold
a contiguous share of the samples (`Shard`); every rank draws the same global mini-batch and
computes the samples of it that it holds; the loss is normalised by the global batch size and
the gradients are summed over the group, so the group computes the single-process step (with
BatchNorm statistics summed over the group too, see models.GroupBatchNorm).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from .feed import Feed, batch_bounds, epoch_order, eval_batches


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
    shuffle_block: int = 1       # batch order: 1, a permutation of the samples; B > 1, of blocks of B (epoch_order)
    shuffle_buffer: int = 8      # blocks (of shuffle_block samples) shuffled together


class Preempted(Exception):
    """A stop was agreed (SIGTERM/SIGUSR1): the loop has handed its state to `save` and unwinds."""


def never() -> bool:
    return False


@dataclass
class Control:
    """How a loop is stopped, checkpointed and resumed.

    stop:   polled at every step boundary and evaluation batch. Where several ranks train one
            model (coherent, data parallel) it must be collective and agree on every rank.
    save:   called with the loop's state at every epoch end and when it stops.
    resume: a state that `save` was given: the loop continues from it.
    """
    stop: Callable[[], bool] = never
    save: Callable[[dict], None] | None = None
    resume: dict | None = None


@dataclass
class Shard:
    """Samples [start, start + len(y)) of a split of `total` samples (data parallel: this rank's
    share; otherwise the whole split, start 0)."""
    x: object
    y: object
    start: int = 0
    total: int | None = None

    def __post_init__(self):
        if self.total is None:
            self.total = len(self.y)


def as_shard(split) -> Shard | None:
    if split is None or isinstance(split, Shard):
        return split
    return Shard(*split)


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


# How the CNNs' forward passes compute (the command line's --precision). The weights, their
# gradients, the optimizer state, the loss and everything that leaves a model (probabilities,
# logits, the coherent exchange) stay float32 in both; the coarse DNN always runs in float32.
PRECISIONS = ("32", "bf16-mixed")


def autocast(device, precision: str = "32"):
    """The context of a forward pass: nothing for "32"; for "bf16-mixed", torch.autocast to
    bfloat16 (convolutions and linear layers in bf16, reductions and the loss in float32)."""
    if precision == "32":
        return contextlib.nullcontext()
    if precision == "bf16-mixed":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r} ({' or '.join(PRECISIONS)})")


def _cpu_has_bf16() -> bool:
    """oneDNN's bf16 kernels need AVX512 (native bf16 with AVX512-BF16 or AMX); without them
    autocast would fall back to slow reference kernels."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def precision_error(precision: str, device, name: str = "precision") -> str | None:
    """Why `precision` cannot run on `device` (one line that calls the option `name`), or None."""
    if precision not in PRECISIONS:
        return f"unknown {name} {precision!r} ({' or '.join(PRECISIONS)})"
    if precision == "32":
        return None
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{name} {precision}: {torch.cuda.get_device_name(device)} has no bfloat16 support; use {name} 32"
    if device.type == "cpu" and not _cpu_has_bf16():
        return f"{name} {precision}: this CPU has no bfloat16 support in oneDNN (it needs AVX512 or AMX); use {name} 32"
    return None


def module_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.zeros(0)).device


def make_optimizer(model, opts: TrainOptions):
    # fused: one kernel for every parameter; on CPU Adam's step took 0.08 ms instead of foreach's
    # 0.22 ms for a 4x4 local CNN, whose whole training step is about 4 ms (benchmarks/overhead.py)
    if opts.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay, fused=True)
    if opts.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=opts.momentum,
                               weight_decay=opts.weight_decay, nesterov=opts.momentum > 0, fused=True)
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
def predict_logits(model: nn.Module, x, batch_size: int = 256, stop=never, group=None, total=None,
                   precision: str = "32", post=None) -> torch.Tensor:
    """Float32 logits of `model` on x (this rank's share in a data-parallel group), in batches,
    the forward passes in `precision` (see PRECISIONS); post(logits), where given, is applied to
    each batch's float32 logits and stored instead (one (n, ...) array for every use)."""
    model.eval()
    device = module_device(model)
    feed = Feed(x)
    to_channels_last(model, feed.dim())
    out = None
    batches = eval_batches(len(feed), total if total is not None else len(feed), batch_size, group)
    feed.plan([torch.arange(b.start, b.stop) for b in batches])
    try:
        for batch in batches:
            if stop():
                raise Preempted
            with autocast(device, precision):
                logits = model(to_float(feed.take(batch).to(device)))
            if out is None:  # one array for every batch: small tensors kept between the batches'
                # large transient ones would pin the heap (the process grew ~1.4 KB per sample)
                out = torch.empty((len(feed),) + tuple(logits.shape[1:]), dtype=torch.float32)
            logits = logits.float().cpu()
            out[batch] = post(logits) if post is not None else logits
    finally:
        feed.close()
    return out if out is not None else torch.zeros(0)


def predict_proba(model: nn.Module, x, batch_size: int = 256, stop=never, group=None, total=None,
                  precision: str = "32") -> np.ndarray:
    """Softmax class probabilities, float32 (n, K). The softmax of each batch (a row's softmax
    does not depend on the other rows): no second (n, K) array."""
    return predict_logits(model, x, batch_size, stop, group, total, precision,
                          post=lambda logits: torch.softmax(logits, dim=1)).numpy()


def evaluate(model: nn.Module, x, y, batch_size: int = 256, stop=never, group=None, total=None,
             precision: str = "32") -> tuple[float, float]:
    """(cross-entropy loss, accuracy) of `model` on (x, y); in a data-parallel group, over the
    group's samples (each rank passes its share and the split's `total`)."""
    logits = predict_logits(model, x, batch_size, stop, group, total, precision)
    y = torch.as_tensor(y)
    if group is None:
        loss = nn.functional.cross_entropy(logits, y).item()
        return loss, (logits.argmax(1) == y).float().mean().item()
    loss_sum, correct, n = group.sum([nn.functional.cross_entropy(logits, y, reduction="sum").item(),
                                      (logits.argmax(1) == y).sum().item(), len(y)])
    return loss_sum / n, correct / n


def train_classifier(model: nn.Module, train, val, opts: TrainOptions, seed: int, log=None, test=None,
                     control: Control | None = None, group=None, precision: str = "32", optimizer=None):
    """Train `model` on train=(x, y) (or a Shard), validating on val each epoch.

    `log(record)` is called after every epoch (record has epoch, loss, acc, val_loss, val_acc,
    lr, images_per_s, eta_s, seconds and cpu_seconds of the epoch's training steps) and every
    `opts.log_interval` batches (record has "batch"). With `test`=(x, y) every epoch's record
    also has test_loss, test_acc and `curve`: the test accuracy at `opts.test_points` evenly
    spaced steps of the epoch (the last at its end), each point {"epoch": fractional epoch,
    "cpu_s": training CPU seconds since the start, "test_acc"}. These are for time-to-accuracy
    curves only (nothing is chosen by them), and their evaluations are left out of the seconds
    and cpu_seconds. Returns (history, optimizer); with select_best the model ends with the
    weights of the best validation epoch. `control`: stop, checkpoint and resume (see Control);
    `group`: data parallel over a group of ranks (see the module docstring); `precision`: of the
    forward passes (see PRECISIONS; the loss is float32 in both); `optimizer`: one that already
    holds state (online training continues with it), else a new one (make_optimizer).
    """
    train, val, test = as_shard(train), as_shard(val), as_shard(test)
    device = module_device(model)
    x, y = Feed(train.x, device), torch.as_tensor(train.y).to(device)
    to_channels_last(model, x.dim())
    optimizer = optimizer if optimizer is not None else make_optimizer(model, opts)
    lo, hi = train.start, train.start + len(train.y)

    def mine_of(idx):  # this rank's samples of a global batch, as indices into its share
        return idx if group is None else idx[(idx >= lo) & (idx < hi)] - lo

    def step(idx):
        if group is None:
            xb, yb = to_float(x.take(idx.to(device)).to(device)), y[idx.to(device)]
            with autocast(device, precision):
                out = model(xb)
            loss = nn.functional.cross_entropy(out.float(), yb)
            loss.backward()
            return loss.item() * len(idx), (out.argmax(1) == yb).sum().item()
        mine = mine_of(idx).to(device)  # this rank's samples of the global batch
        xb, yb = to_float(x.take(mine).to(device)), y[mine]
        with autocast(device, precision):
            out = model(xb)  # GroupBatchNorm: batch statistics of the whole global batch
        loss = nn.functional.cross_entropy(out.float(), yb, reduction="sum") / len(idx)
        loss.backward()
        group.sum_gradients(model)
        return loss.item() * len(idx), (out.argmax(1) == yb).sum().item()

    def scores(data: Shard, stop):
        return evaluate(model, data.x, data.y, stop=stop, group=group, total=data.total, precision=precision)

    try:
        history = run_epochs(model, optimizer, opts, seed, train.total, step,
                             validate=(lambda stop: scores(val, stop)) if val is not None else None,
                             test=(lambda stop: scores(test, stop)) if test is not None else None,
                             log=log, control=control, group=group,
                             plan=lambda batches: x.plan([mine_of(b) for b in batches]))
    finally:
        x.close()
    return history, optimizer


def run_epochs(module: nn.Module, optimizer, opts: TrainOptions, seed: int, n: int, step, *, validate=None,
               test=None, log=None, control: Control | None = None, group=None, root: bool = True, plan=None):
    """The epoch loop shared by every model of mpidd: mini-batches of a permutation of the n
    samples drawn from `seed` (the same on every rank), the learning-rate schedule, validation,
    progress, the test-accuracy curve, and stop / checkpoint / resume (see Control).

    step(idx) runs forward, backward and whatever exchange the model needs on global sample
    indices idx, and returns (loss summed over the batch, correct predictions) of the samples this
    rank scores, or None where the rank does not see the loss (coherent model, ranks but root).
    validate(stop) and test(stop) return (loss, accuracy). The optimizer is stepped here.
    plan(batches), if given, is told the index tensors of the epoch's steps still to run before
    the first of them (streamed images are read ahead; see Feed).
    """
    control = control or Control()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    bounds = batch_bounds(n, opts.batch_size)
    steps_per_epoch = len(bounds) - 1
    total_steps = steps_per_epoch * opts.epochs
    points = {round(k * steps_per_epoch / opts.test_points) for k in range(1, opts.test_points + 1)} - {0}
    state = {"epoch": 1, "step": 0, "history": [], "train_cpu": 0.0, "best": None, "best_acc": -1.0,
             "partial": _fresh_partial()}
    if control.resume is not None:
        r = control.resume
        module.load_state_dict(r["model"])
        optimizer.load_state_dict(r["optimizer"])
        generator.set_state(r["generator"])
        torch.set_rng_state(r["torch_rng"])
        state = {k: r[k] for k in state}
        if group is not None and group.rank != 0:  # the leader's file holds the group's running sums
            state["partial"] = dict(state["partial"], loss_sum=0.0, correct=0)
        if r.get("done"):
            if opts.select_best and state["best"] is not None:
                module.load_state_dict(state["best"])
            return state["history"]
    history = state["history"]
    start = time.perf_counter()
    first_epoch = state["epoch"]
    for epoch in range(first_epoch, opts.epochs + 1):
        epoch_generator = generator.get_state()  # this epoch's permutation can be drawn again
        order = epoch_order(n, generator, opts.shuffle_block, opts.shuffle_buffer)
        partial = state["partial"] if epoch == first_epoch else _fresh_partial()
        begin = state["step"] if epoch == first_epoch else 0
        if plan is not None:
            plan([order[bounds[b]:bounds[b + 1]] for b in range(begin, steps_per_epoch)])

        def stopped(steps_done):
            """Hand the position after `steps_done` steps of this epoch to control.save. In a
            group (every member stops at the same step) the epoch's running loss and correct
            count are the group's sums, which its leader saves and alone resumes with."""
            saved = partial
            if group is not None:
                saved = dict(partial)
                saved["loss_sum"], saved["correct"] = group.sum([partial["loss_sum"], partial["correct"]])
            if control.save is not None:
                control.save(dict(_loop_state(module, optimizer, epoch, steps_done, epoch_generator, saved,
                                              history, state), stopped=True))
            return Preempted(f"stopped at epoch {epoch}, step {steps_done}")

        module.train()
        if test is not None and begin in points and begin not in [p["step"] for p in partial["curve"]]:
            _curve_point(module, test, partial, epoch, begin, steps_per_epoch, state, stopped, control)
        t0, cpu0 = time.perf_counter() - partial["seconds"], time.process_time() - partial["cpu_seconds"]
        for b in range(begin, steps_per_epoch):
            if control.stop():
                _clock(partial, t0, cpu0)
                raise stopped(b)
            idx = order[bounds[b]:bounds[b + 1]]
            for g in optimizer.param_groups:
                g["lr"] = opts.lr * lr_factor(opts.schedule, (epoch - 1) * steps_per_epoch + b, total_steps)
            optimizer.zero_grad(set_to_none=True)
            result = step(idx)
            optimizer.step()
            partial["seen"] += len(idx)
            if result is not None:
                partial["loss_sum"] += result[0]
                partial["correct"] += result[1]
            if test is not None and b + 1 in points:
                _clock(partial, t0, cpu0)
                _curve_point(module, test, partial, epoch, b + 1, steps_per_epoch, state, stopped, control)
                t0, cpu0 = time.perf_counter() - partial["seconds"], time.process_time() - partial["cpu_seconds"]
            if opts.log_interval and (b + 1) % opts.log_interval == 0 and b + 1 < steps_per_epoch:
                sums = [partial["loss_sum"], partial["correct"]]
                if group is not None:  # each rank scored its own samples (every member sums here, log or not)
                    sums = group.sum(sums)
                if log:
                    _clock(partial, t0, cpu0)
                    rate = partial["seen"] / max(partial["seconds"], 1e-9)
                    done = (epoch - 1) * steps_per_epoch + b + 1
                    log({"epoch": epoch, "batch": b + 1, "batches": steps_per_epoch,
                         **_running_scores(sums, partial["seen"], root),
                         "images_per_s": rate, "eta_s": (total_steps - done) * opts.batch_size / rate})
        _clock(partial, t0, cpu0)
        try:
            val_loss, val_acc = validate(control.stop) if validate is not None else (math.nan, math.nan)
        except Preempted:
            raise stopped(steps_per_epoch) from None
        loss_sum, correct = partial["loss_sum"], partial["correct"]
        if group is not None:  # this rank scored its own samples of every batch
            loss_sum, correct = group.sum([loss_sum, correct])
        state["train_cpu"] += partial["cpu_seconds"]
        elapsed = time.perf_counter() - start
        record = {"epoch": epoch, "loss": loss_sum / partial["seen"] if root else math.nan,
                  "acc": correct / partial["seen"] if root else math.nan,
                  "val_loss": val_loss, "val_acc": val_acc,
                  "lr": optimizer.param_groups[0]["lr"], "images_per_s": partial["seen"] / partial["seconds"],
                  "seconds": partial["seconds"], "cpu_seconds": partial["cpu_seconds"],
                  "eta_s": elapsed / (epoch - first_epoch + 1) * (opts.epochs - epoch)}
        if test is not None:  # the epoch's last point was taken after its last step
            curve = partial["curve"]
            record["curve"] = [{k: p[k] for k in ("epoch", "cpu_s", "test_loss", "test_acc")} for p in curve]
            record["curve_seconds"], record["curve_cpu_seconds"] = partial["eval_s"], partial["eval_cpu"]
            record["test_loss"], record["test_acc"] = curve[-1]["test_loss"], curve[-1]["test_acc"]
        history.append(record)
        if opts.select_best and val_acc > state["best_acc"]:
            state["best_acc"], state["best"] = val_acc, copy.deepcopy(module.state_dict())
            record["best"] = True
        if log:
            log(record)
        if control.save is not None:  # the start of the next epoch (or, after the last, the end)
            control.save(dict(_loop_state(module, optimizer, epoch + 1, 0, generator.get_state(),
                                          _fresh_partial(), history, state), done=epoch == opts.epochs))
    if opts.select_best and state["best"] is not None:
        module.load_state_dict(state["best"])
    return history


def _fresh_partial() -> dict:
    """Running sums of the epoch in progress."""
    return {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0, "cpu_seconds": 0.0,
            "curve": [], "eval_s": 0.0, "eval_cpu": 0.0}


def _clock(partial, t0, cpu0):
    """The epoch's training seconds so far (evaluations of the curve excluded)."""
    partial["seconds"], partial["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - cpu0


def _running_scores(sums, seen, root):
    if not root:
        return {"loss": math.nan, "acc": math.nan}
    return {"loss": sums[0] / seen, "acc": sums[1] / seen}


def _curve_point(module, test, partial, epoch, steps_done, steps_per_epoch, state, stopped, control):
    """The test accuracy after `steps_done` steps of `epoch`; its time is kept apart."""
    w, c = time.perf_counter(), time.process_time()
    try:
        loss, acc = test(control.stop)
    except Preempted:
        raise stopped(steps_done) from None
    finally:
        module.train()
    partial["curve"].append({"step": steps_done, "epoch": epoch - 1 + steps_done / steps_per_epoch,
                             "cpu_s": state["train_cpu"] + partial["cpu_seconds"],
                             "test_loss": loss, "test_acc": acc})
    partial["eval_s"] += time.perf_counter() - w
    partial["eval_cpu"] += time.process_time() - c


def _loop_state(module, optimizer, epoch, steps_done, generator_state, partial, history, state) -> dict:
    """Everything run_epochs needs to continue exactly after `steps_done` steps of `epoch`."""
    return {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "step": steps_done, "generator": generator_state, "torch_rng": torch.get_rng_state(),
            "partial": copy.deepcopy(partial), "history": copy.deepcopy(history),
            "train_cpu": state["train_cpu"], "best": state["best"], "best_acc": state["best_acc"], "done": False,
            "stopped": False}
