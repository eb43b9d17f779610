"""The coherent CNN-DNN as one model: N local CNNs and the coarse DNN trained with one loss
(Klawonn, Lanser & Weber, arXiv 2408.14442): its step, evaluation and training loop. No MPI
here: the exchange is passed in; mpidd.methods.coherent runs it on a Context.

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

import contextlib
import math

import torch
from torch import nn

from .engine import (Control, Preempted, TrainOptions, autocast, never, make_optimizer, module_device, run_epochs,
                     to_channels_last, to_float)
from .feed import as_feed, batch_bounds
from .seeds import derive_seed

OUTPUTS = ("probabilities", "logits")  # what the local CNNs send to the DNN
NAMES = {"random": "coherent (random init)", "pretrained": "coherent (transfer learning)"}  # by init


class SerialExchange:
    """Every subdomain in this process: the gathered tensor is the local one."""
    is_root, rank = True, 0
    seconds = cpu_seconds = bytes = 0

    def __call__(self, local: torch.Tensor, idx=None, n=None) -> torch.Tensor:
        return local


class DropoutStreams:
    """A random stream of its own for each model of the coherent CNN-DNN (key: subdomain i, or
    "dnn"), so that dropout draws the same masks whichever rank runs a model and whatever else
    that rank runs: the same numbers at every rank count. use(key, device) runs a forward pass on
    the model's stream and leaves the process's generator as it was. `states` is what a
    checkpoint keeps."""

    def __init__(self, keys, seed: int, num_subdomains: int, device=None):
        device = torch.device(device or "cpu")
        self.states = {k: torch.Generator(device=device).manual_seed(
            derive_seed(seed, num_subdomains if k == "dnn" else int(k))).get_state() for k in keys}

    @contextlib.contextmanager
    def use(self, key, device):
        cuda = torch.device(device).type == "cuda"
        get = (lambda: torch.cuda.get_rng_state(device)) if cuda else torch.get_rng_state
        put = (lambda state: torch.cuda.set_rng_state(state, device)) if cuda else torch.set_rng_state
        process = get()
        put(self.states[key])
        try:
            yield
        finally:
            self.states[key] = get()
            put(process)


def on_stream(streams, key, device):
    return streams.use(key, device) if streams is not None else contextlib.nullcontext()


def local_outputs(models: dict, xs: dict, idx, output: str, start: int = 0, precision: str = "32",
                  streams: DropoutStreams | None = None) -> torch.Tensor:
    """(b, m*K) float32: this rank's local CNN outputs, its subdomains in ascending order, on the
    samples of `idx` (global indices) that it holds: xs[i] (an array, or a feed.Feed) holds
    samples start, start + 1, ... The CNNs' forward passes run in `precision`
    (engine.PRECISIONS); what is sent is float32. `streams`: each CNN's dropout stream."""
    mine = held(idx, xs, start)
    outs = []
    for i in sorted(models):
        x = to_float(as_feed(xs[i]).take(mine).to(module_device(models[i])))
        with autocast(x.device, precision), on_stream(streams, i, x.device):
            outs.append(models[i](x).float())
    if output == "probabilities":
        outs = [torch.softmax(o, dim=1) for o in outs]
    return torch.cat(outs, dim=1)


def held(idx, xs: dict, start: int) -> torch.Tensor:
    """The samples of global indices `idx` that xs (samples start, start + 1, ...) hold, as
    indices into xs."""
    idx = torch.as_tensor(idx)
    n_held = len(next(iter(xs.values()))) if xs else 0
    return idx[(idx >= start) & (idx < start + n_held)] - start


def plan_feeds(feeds: dict, batches, start: int):
    """Announce the batches (global indices) to come to every subdomain's feed."""
    mine = [held(b, feeds, start) for b in batches]
    for feed in feeds.values():
        feed.plan(mine)


def close_feeds(feeds: dict):
    for feed in feeds.values():
        feed.close()


def coherent_step(models, dnn, xs, y, idx, *, exchange, output="probabilities", start=0, group=None,
                  precision="32", streams: DropoutStreams | None = None):
    """Forward, exchange and backward of one mini-batch (the caller steps the optimizer);
    returns (loss summed over the batch, correct) on the root, None elsewhere. y: the labels of
    every sample of the split. In a data-parallel group (P = G*N) the rank holds the samples
    from `start` on (xs), and its local CNNs' gradients are summed over the group. `precision`:
    the local CNNs' forward passes (the DNN and the loss are float32). `streams`: every model's
    own dropout stream (DropoutStreams; None: the process's generator)."""
    z = exchange(local_outputs(models, xs, idx, output, start, precision, streams), idx, len(y))
    if exchange.is_root:
        with on_stream(streams, "dnn", z.device):
            logits = dnn(z)
        target = y[idx].to(z.device)
        loss = nn.functional.cross_entropy(logits, target)
        loss.backward()
        result = loss.item() * len(idx), (logits.argmax(1) == target).sum().item()
    else:
        # root owns the loss: this only receives dL/d(local outputs) and back-propagates it
        torch.autograd.backward(z, torch.zeros_like(z))
        result = None
    if group is not None:
        for model in models.values():
            group.sum_gradients(model)
    return result


@torch.no_grad()
def evaluate_coherent(models, dnn, xs: dict, y, *, exchange, output="probabilities", batch_size=256, stop=never,
                      start=0, precision="32"):
    """(loss, accuracy) of the coherent model on the root; None elsewhere. Collective (and so
    must `stop` be: it is polled before every batch). y: every sample's label; xs: this rank's
    samples from `start` on (all of them unless data parallel)."""
    for m in [*models.values(), dnn]:
        if m is not None:
            m.eval()
    xs = {i: as_feed(x) for i, x in xs.items()}
    for i in models:
        to_channels_last(models[i], xs[i].dim())
    n = len(y)
    batches = [torch.arange(first, min(first + batch_size, n)) for first in range(0, n, batch_size)]
    plan_feeds(xs, batches, start)
    logits = None
    try:
        for idx in batches:
            if stop():
                raise Preempted
            z = exchange(local_outputs(models, xs, idx, output, start, precision), idx, n)
            if exchange.is_root:
                out = dnn(z).cpu()
                if logits is None:  # one array, not a list of small tensors (see engine.predict_logits)
                    logits = torch.empty((n,) + tuple(out.shape[1:]), dtype=out.dtype)
                logits[idx] = out
    finally:
        close_feeds(xs)
    if not exchange.is_root:
        return None
    y = torch.as_tensor(y)
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train_coherent(models: dict, dnn, train_xs: dict, train_y, val_xs: dict, val_y, opts: TrainOptions,
                   seed: int, *, exchange, output="probabilities", eval_batch_size=256, log=None,
                   control: Control | None = None, train_start=0, val_start=0, group=None, precision="32"):
    """Train the coherent model for opts.epochs; returns (history, optimizer, timing).

    `models` are this rank's local CNNs {subdomain: module}; `dnn` is the coarse DNN on the
    root (None elsewhere); `*_xs` map subdomain -> its subimages. Every rank must call this
    with the same sample counts, options and seed: the batch order is drawn from `seed` alone,
    so every rank takes the same samples at every step. `timing` holds the training steps'
    wall and CPU seconds and the parts of them spent in the exchange. `control` (stop,
    checkpoint, resume) as in mpidd.engine; its stop must be collective over the ranks.
    Data parallel inside each subdomain (P = G*N, `group`): `*_xs` hold this rank's share, the
    samples from `train_start` / `val_start` on; `*_y` are every sample's labels. `precision`:
    the local CNNs' forward passes (engine.PRECISIONS).
    """
    xs = {i: as_feed(x) for i, x in train_xs.items()}
    y = torch.as_tensor(train_y)
    for i in models:
        to_channels_last(models[i], xs[i].dim())
    owned = nn.ModuleList([*models.values(), *([dnn] if exchange.is_root else [])])
    optimizer = make_optimizer(owned, opts)
    control = control or Control()
    spent = {"exchange_s": 0.0, "exchange_cpu_s": 0.0, "exchange_bytes": 0}  # in training steps
    devices = [module_device(m) for m in owned]
    streams = DropoutStreams([*sorted(models), *(["dnn"] if exchange.is_root else [])], seed,
                             getattr(exchange, "N", len(models)), devices[0] if devices else None)
    if control.resume is not None:
        spent = dict(control.resume["exchange"])
        streams.states.update(control.resume.get("dropout", {}))

    def step(idx):
        seconds, cpu, nbytes = exchange.seconds, exchange.cpu_seconds, exchange.bytes
        result = coherent_step(models, dnn, xs, y, idx, exchange=exchange, output=output, start=train_start,
                               group=group, precision=precision, streams=streams)
        spent["exchange_s"] += exchange.seconds - seconds
        spent["exchange_cpu_s"] += exchange.cpu_seconds - cpu
        spent["exchange_bytes"] += exchange.bytes - nbytes
        return result

    def validate(stop):
        return evaluate_coherent(models, dnn, val_xs, val_y, exchange=exchange, output=output,
                                 batch_size=eval_batch_size, stop=stop, start=val_start,
                                 precision=precision) or (math.nan, math.nan)

    save = None
    if control.save is not None:
        def save(state):
            control.save(dict(state, exchange=dict(spent), dropout=dict(streams.states)))
    try:
        history = run_epochs(owned, optimizer, opts, seed, len(y), step, validate=validate, log=log,
                             control=Control(stop=control.stop, save=save, resume=control.resume),
                             root=exchange.is_root, plan=lambda batches: plan_feeds(xs, batches, train_start))
    finally:
        close_feeds(xs)
    steps_per_epoch = len(batch_bounds(len(y), opts.batch_size)) - 1
    timing = {"steps": steps_per_epoch * len(history), "step_s": sum(r["seconds"] for r in history),
              "step_cpu_s": sum(r["cpu_seconds"] for r in history), **spent}
    timing["exchange_fraction"] = timing["exchange_s"] / timing["step_s"] if timing["step_s"] else 0.0
    timing["exchange_cpu_fraction"] = timing["exchange_cpu_s"] / timing["step_cpu_s"] if timing["step_cpu_s"] else 0.0
    return history, optimizer, timing
