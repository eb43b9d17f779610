"""The Python API: the two-level CNN-DNN as an estimator on a communicator.

    mpirun -n 4 python my_script.py

    import mpidd
    clf = mpidd.TwoLevelClassifier(grid="2x2", epochs=3, comm=comm)   # comm=None: a Dup of COMM_WORLD;
                                                                      # grid="auto": from comm's size
    clf.fit(x_train, y_train, x_val, y_val)       # collective; x: (n, C, H, W) numpy, the same on every rank
    p = clf.predict_proba(x_test)                  # collective; (n, K) on every rank
    clf.save("model.pt"); clf = mpidd.TwoLevelClassifier.load("model.pt", comm=comm)

Images come in one of two forms, in fit, predict_proba, predict and score alike:
  (a) whole images, a numpy array (n, C, H, W) or (n, C, D, H, W), given on every rank; each
      rank uses only the boxes of its own subdomains;
  (b) only this rank's subimages, {subdomain: (n, C, *subimage_shape)}, for the subdomains that
      `local_boxes(image_shape)` names (pass `image_shape=`): no whole image ever exists
      anywhere, as in a solver that holds its field domain-decomposed.
  (c) images in an HDF5 file: an h5py.Dataset (n, C, ...), or the path of an mpidd data file
      (fit: its train split, and its val split unless x_val is given; predict and score: its test
      split; "FILE.h5:val" names another), with its labels unless y is given. Each rank then
      reads only its own boxes, batch by batch (streamed, as --data-access stream), never the
      whole set.
Labels y are (n,) integers 0..K-1, the same on every rank. uint8 images are divided by 255,
float images are used as they are (as float32). normalization=(mean, std), one number per
channel in those units (e.g. mpidd.read_info(FILE).mean and .std, the statistics data_prep
writes into a data file), makes every model normalise its input, (x - mean) / std, as the
command line does; the default None leaves the input as it is.

Ranks: P <= N subdomains (rank r trains r, r+P, ...) or P a multiple of N (P/N ranks train
each local CNN data parallel, each on its share of the samples). Nothing here touches
COMM_WORLD unless comm=None asks for a Dup of it, installs a signal handler or excepthook, or
sets torch's threads unless `threads` is given.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from . import __version__, parallel, saved
from .decomposition import Decomposition, DecompositionError, choose_grid, layout, parse_grid
from .engine import Shard, TrainOptions, evaluate, precision_error, predict_logits, predict_proba, seed_for
from .methods import coherent, twolevel, width
from .methods.context import Context
from .models import COARSE_INPUTS, CNNConfig, CoarseDNN, build_cnn, local_width_factor
from .stream import StreamStats, check_finite, file_images, is_stream
from .width import WidthError, subnet_config as width_subnet_config

COMBINERS = ("cnn-dnn", "average", "vote")
WHOLE_IMAGE = ("global", "recomposed")  # CNNs of the whole image: the global CNN, width's recomposed network
MODELS = COMBINERS + ("coherent",) + WHOLE_IMAGE


class _CollectiveEstimator:
    """What the estimators share: the communicator and device, data checks agreed by every
    rank, a seeded validation hold-out, rank 0's results on every rank, and the count of bytes
    sent."""

    HYPERPARAMETERS: tuple = ()

    def _setup(self, comm, device, threads, verbose):
        self.comm = comm if comm is not None else parallel.world_dup()
        self.device, self.threads, self.verbose = device, threads, verbose
        self._models = {}
        # payload this rank contributed to the estimator's collectives, by kind (see bytes_sent_)
        self._sent = {"probabilities": 0, "exchange": 0, "parameters": 0, "gradients": 0, "results": 0, "metadata": 0}
        self._io = StreamStats()  # what this rank's reads of data files (input form c) did

    @property
    def bytes_sent_(self) -> dict:
        """Bytes this rank has sent to other ranks so far (its payload in each collective,
        counted once; rank 0's part of a gather to itself is not counted): probabilities
        (gather of the local CNNs' class probabilities), results (rank 0's
        broadcast of predictions and scores), exchange (the coherent model's local outputs and,
        back, their gradients: this rank's part), parameters (save: local CNN weights to rank 0),
        gradients (data-parallel gradient sums, P > N only), metadata (histories, error
        agreements, pickled). Images never leave their rank."""
        sent = dict(self._sent)
        group = getattr(getattr(self, "_ctx", None), "group", None)
        sent["gradients"] += group.bytes if group is not None else 0
        sent["total"] = sum(sent.values())
        return sent

    @property
    def bytes_read_(self) -> int:
        """Bytes of images this rank has read from data files (input form c): its boxes only."""
        return self._io.bytes_read

    def _count(self, kind, payload):
        """Count `payload` (a byte count, an array, or any object as pickled) as sent by this rank."""
        import pickle
        if isinstance(payload, (int, np.integer)):
            self._sent[kind] += int(payload)
        else:
            self._sent[kind] += payload.nbytes if hasattr(payload, "nbytes") else len(pickle.dumps(payload))

    def get_params(self) -> dict:
        """The hyperparameters, as scikit-learn estimators report them."""
        return {k: getattr(self, k) for k in self.HYPERPARAMETERS}

    def _torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if not hasattr(self, "_device"):
            self._device = parallel.select_device("auto", self.comm, set_current=False)[0]
        return self._device

    def _context_of(self, mine, group=None) -> Context:
        """This rank's Context; ValueError on every rank if `precision` cannot run on a rank's device."""
        device = self._torch_device()
        error = precision_error(self.precision, device)
        failed = parallel.agree(self.comm, error)
        if failed:
            raise ValueError(failed[1] if self.comm.Get_size() == 1 else f"rank {failed[0]}: {failed[1]}")
        return Context(comm=self.comm, device=device, precision=self.precision, mine=mine, group=group,
                       verbose=self.verbose)

    def _from_file(self, x, y, split, what, labels=True):
        return from_file(x, y, split, what, labels, stats=self._io)

    def _agreed(self, step):
        """step() on every rank; a ValueError on any rank is raised on every rank."""
        error, result = None, None
        try:
            result = step()
        except ValueError as e:
            error = str(e)
        failed = parallel.agree(self.comm, error)
        if failed:
            raise ValueError(failed[1] if self.comm.Get_size() == 1 else f"rank {failed[0]}: {failed[1]}")
        return result

    def _check(self, x, y, image_shape, what) -> tuple:
        """(image_shape, n) of `x`, checked on this rank; every rank raises if any rank's is bad."""
        error = None
        try:
            image_shape, n = _check_images(self, x, y, image_shape, what)
        except ValueError as e:
            error = str(e)
        self._count("metadata", error)
        failed = parallel.agree(self.comm, error)
        if failed:
            raise ValueError(failed[1] if self.comm.Get_size() == 1 else f"rank {failed[0]}: {failed[1]}")
        return image_shape, n

    def _from_root(self, obj):
        """Rank 0's `obj` on every rank (counted as results sent by rank 0)."""
        if self.comm.Get_rank() == 0 and self.comm.Get_size() > 1:
            self._count("results", obj)
        return parallel.broadcast_from_root(self.comm, obj)

    def _hold_out(self, x, y, n):
        """(train part, its labels, validation part, its labels): a seeded split, the same on every rank."""
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1) when fit gets no x_val, got "
                             f"{self.validation_fraction}")
        order = np.random.default_rng(seed_for(self.seed, "validation")).permutation(n)
        n_val = max(1, int(round(self.validation_fraction * n)))
        val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
        pick = (lambda a, idx: {i: np.asarray(v)[idx] for i, v in a.items()}) if isinstance(x, dict) else \
            (lambda a, idx: a.take(idx)) if is_stream(x) else (lambda a, idx: a[idx])
        return pick(x, train), y[train], pick(x, val), y[val]

    def _training_data(self, x, y, x_val, y_val, image_shape):
        """(x, y, x_val, y_val) checked on every rank (x_val held out of x if not given); sets
        torch's threads if asked, image_shape_, input_dtype_, classes_ and class_names_."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        named_file = isinstance(x, (str, os.PathLike))
        x, y = self._agreed(lambda: self._from_file(x, y, "train", "x"))
        if x_val is None and named_file:  # the data file's validation split
            x_val, y_val = self._agreed(lambda: self._from_file(x.path, None, "val", "x"))
        elif x_val is not None:
            x_val, y_val = self._agreed(lambda: self._from_file(x_val, y_val, "val", "x_val"))
        if y is None:
            raise ValueError("fit needs the labels y of x (or x naming a data file, whose labels it reads)")
        y = np.asarray(y)
        image_shape, n = self._check(x, y, image_shape, "x")
        if x_val is None:
            x, y, x_val, y_val = self._hold_out(x, y, n)
        else:
            y_val = np.asarray(y_val)
            self._check(x_val, y_val, image_shape, "x_val")
        K = self.num_classes or int(max(y.max(), y_val.max())) + 1
        self.image_shape_, self.input_dtype_ = tuple(int(s) for s in image_shape), _dtype_name(x)
        self.classes_ = np.arange(K)
        self.class_names_ = list(self.class_names) if self.class_names is not None else [str(k) for k in range(K)]
        return x, y, x_val, y_val

    def _write_on_root(self, path, contents) -> str:
        """Rank 0 writes the model file of contents() = (manifest, models), atomically; every
        rank returns its path or raises the same OSError. Collective."""
        error, written = None, None
        if self.comm.Get_rank() == 0:
            try:
                written = saved.save_model(path, *contents())
            except OSError as e:
                error = f"cannot write {path}: {e}"
        error, written = parallel.broadcast_from_root(self.comm, (error, written))
        if error:
            raise OSError(error)
        return written

    def _cnn_config(self) -> CNNConfig:
        mean, std = normalization_pair(self.normalization)
        return CNNConfig(arch=self.arch, width=self.width, depth=self.depth, convs_per_block=self.convs_per_block,
                         hidden=self.hidden, head_pool=self.head_pool, dropout=self.dropout,
                         batchnorm=self.batchnorm, blocks_per_stage=self.blocks_per_stage,
                         dense_layers=tuple(self.dense_layers), input_mean=mean, input_std=std)

    def _fitted(self):
        if not self._models:
            raise RuntimeError(f"this {type(self).__name__} is not fitted: call fit (or load) first")


class TwoLevelClassifier(_CollectiveEstimator):
    """The two-level CNN-DNN of Klawonn, Lanser & Weber: one local CNN per subimage, trained
    without communication, and a coarse DNN on rank 0 of `comm` that combines their class
    probabilities (gathered with MPI_Gatherv).

    Every keyword is the command line's option of the same name (mpidd.train --help), with the
    same default; `coarse_hidden` is a tuple. API-only: `validation_fraction` (the share of the
    training set held out for validation when fit gets no x_val), `num_classes` (default:
    max label + 1), `class_names`, `comm`, `device` (None: this rank's GPU, node-local rank
    modulo the visible GPUs, when torch sees one, else the CPU), `threads` (None: torch's
    setting is left alone) and `verbose` (rank 0 prints progress).

    After fit, on every rank: classes_, class_names_, n_subdomains_, image_shape_,
    width_factor_, local_scores_ ({subdomain: {"val": accuracy}}), scores_ (val accuracy of
    "cnn-dnn", "average", "vote"), history_ ({"local_i": [epoch records], "coarse": [...]}).
    """

    def __init__(self, grid="auto", overlap=0, *, arch="vgg", width=48, depth=2, convs_per_block=2,
                 blocks_per_stage=2, dense_layers=(6, 12, 24, 16), hidden=128, head_pool=3, dropout=0.0, batchnorm=True,
                 width_factor=None, epochs=3, batch_size=128, lr=2e-3, optimizer="adam", momentum=0.9, weight_decay=0.0,
                 schedule="cosine", eval_batch_size=256, coarse_hidden=(64, 64), coarse_dropout=0.0,
                 coarse_input="logprob", coarse_epochs=5, coarse_steps=2000, coarse_lr=3e-3, coarse_weight_decay=1e-4,
                 coarse_batch_size=128, coherent_epochs=2, coherent_lr=2e-3,
                 transfer_lr=5e-4, dnn_init="coarse", exchange="probabilities", seed=0, validation_fraction=0.1,
                 num_classes=None, class_names=None, normalization=None, precision="32", comm=None, device=None,
                 threads=None, verbose=False):
        self.grid, self.overlap = grid, overlap
        self.arch, self.width, self.depth, self.convs_per_block = arch, width, depth, convs_per_block
        self.blocks_per_stage, self.hidden, self.head_pool = blocks_per_stage, hidden, head_pool
        self.dense_layers = tuple(dense_layers)
        self.dropout, self.batchnorm, self.width_factor = dropout, batchnorm, width_factor
        self.epochs, self.batch_size, self.lr, self.optimizer = epochs, batch_size, lr, optimizer
        self.momentum, self.weight_decay, self.schedule = momentum, weight_decay, schedule
        self.eval_batch_size = eval_batch_size
        self.coarse_hidden, self.coarse_dropout = tuple(coarse_hidden), coarse_dropout
        self.coarse_input, self.coarse_epochs, self.coarse_steps = coarse_input, coarse_epochs, coarse_steps
        self.coarse_lr, self.coarse_weight_decay = coarse_lr, coarse_weight_decay
        self.coarse_batch_size = coarse_batch_size
        self.coherent_epochs, self.coherent_lr, self.transfer_lr = coherent_epochs, coherent_lr, transfer_lr
        self.dnn_init, self.exchange = dnn_init, exchange
        self.seed, self.validation_fraction = seed, validation_fraction
        self.num_classes, self.class_names, self.normalization = num_classes, class_names, normalization
        self.precision = precision
        self._setup(comm, device, threads, verbose)  # self._models: kind -> {"local": {i: module}, "dnn": ...}

    # --- configuration ------------------------------------------------------------------------

    HYPERPARAMETERS = ("grid", "overlap", "arch", "width", "depth", "convs_per_block", "blocks_per_stage",
                       "dense_layers", "hidden", "head_pool", "dropout", "batchnorm", "width_factor", "epochs",
                       "batch_size", "lr", "optimizer", "momentum", "weight_decay", "schedule", "eval_batch_size",
                       "coarse_hidden", "coarse_dropout", "coarse_input", "coarse_epochs", "coarse_steps", "coarse_lr",
                       "coarse_weight_decay", "coarse_batch_size", "coherent_epochs", "coherent_lr", "transfer_lr",
                       "dnn_init", "exchange", "seed", "validation_fraction", "num_classes", "class_names",
                       "normalization", "precision")

    def config(self) -> twolevel.TwoLevelConfig:
        """The typed configuration the method runs with."""
        cnn = self._cnn_config()
        local = TrainOptions(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer,
                             momentum=self.momentum, weight_decay=self.weight_decay, schedule=self.schedule)
        coarse = TrainOptions(epochs=self.coarse_epochs, batch_size=self.coarse_batch_size, lr=self.coarse_lr,
                              optimizer="adam", weight_decay=self.coarse_weight_decay, schedule="cosine",
                              select_best=True)
        return twolevel.TwoLevelConfig(cnn=cnn, local=local, coarse=coarse, coarse_hidden=tuple(self.coarse_hidden),
                                       coarse_dropout=self.coarse_dropout, coarse_input=self.coarse_input,
                                       coarse_min_steps=self.coarse_steps, seed=self.seed,
                                       eval_batch_size=self.eval_batch_size)

    def decomposition(self, image_shape) -> Decomposition:
        """The subdomain boxes over images of shape (C, H, W) or (C, D, H, W); grid "auto" is
        decomposition.choose_grid of comm's size, as on the command line."""
        try:
            if self.grid == "auto":
                grid = choose_grid(self.comm.Get_size(), tuple(image_shape)[1:])[0]
            else:
                grid = parse_grid(self.grid)
            return Decomposition(tuple(image_shape)[1:], grid, self.overlap)
        except DecompositionError as e:
            raise ValueError(str(e)) from None

    def local_boxes(self, image_shape) -> dict:
        """{subdomain: tuple of slices} of this rank: the subimages x[:, :, *slices] it must
        supply in form (b). Not collective."""
        dec = self.decomposition(image_shape)
        return {i: dec.slices(i) for i in self._layout(dec)[0]}

    def _layout(self, dec):
        size, rank = self.comm.Get_size(), self.comm.Get_rank()
        try:
            return layout(rank, size, dec.num_subdomains)
        except DecompositionError as e:
            raise ValueError(str(e)) from None

    def _context(self, dec) -> Context:
        """Collective (the data-parallel groups are split off comm when P > N)."""
        mine, replicas, member = self._layout(dec)
        group = None
        if replicas > 1:
            group = parallel.DataParallelGroup(self.comm, color=mine[0], key=member)
        return self._context_of(mine, group)

    # --- data ----------------------------------------------------------------------------------

    def _shards(self, ctx, dec, x, y) -> dict:
        """{subdomain: Shard} of this rank (its share of the samples in a data-parallel group)."""
        n = len(y) if y is not None else _count(x)
        rows = ctx.group.share(n) if ctx.group is not None else (0, n)
        out = {}
        for i in ctx.mine:
            if isinstance(x, dict):
                part = np.asarray(x[i])[rows[0]:rows[1]]
            elif is_stream(x):  # its box of the file, read batch by batch
                part = x.share(*rows).in_box(dec.slices(i))
            else:
                part = x[(slice(rows[0], rows[1]), slice(None)) + dec.slices(i)]
            labels = np.zeros(rows[1] - rows[0], np.int64) if y is None else np.asarray(y[rows[0]:rows[1]], np.int64)
            out[i] = Shard(_pixels(part), labels, rows[0], n)
        if is_stream(x):  # NaN and inf, in this rank's boxes only: read once, in blocks
            self._agreed(lambda: [check_finite(s.x) for s in out.values()])
        return out

    # --- fit -----------------------------------------------------------------------------------

    def fit(self, x, y=None, x_val=None, y_val=None, *, image_shape=None):
        """Train the local CNNs and the coarse DNN. Collective over comm. Returns self.

        x: whole images (n, C, H, W) / (n, C, D, H, W) on every rank, or this rank's subimages
        {subdomain: array} with `image_shape`; y: (n,) labels on every rank. Without x_val, a
        seeded `validation_fraction` of the training samples is held out for validation (the
        local CNNs' per-epoch scores and the coarse DNN's model selection)."""
        if self.coarse_input not in COARSE_INPUTS:  # before any training, on every rank alike
            raise ValueError(f"coarse_input must be one of {', '.join(COARSE_INPUTS)}, not {self.coarse_input!r}")
        ctx, dec, subsets, labels = self._prepare(x, y, x_val, y_val, image_shape)
        N, K, C, cfg = dec.num_subdomains, len(self.classes_), self.image_shape_[0], self.config()
        probs, models, histories = twolevel.fit_local_models(ctx, subsets, dec, C, K, self.width_factor_, cfg,
                                                             ("train", "val"))
        gathered = twolevel.gather(ctx, probs, subsets, N, K, {s: len(labels[s]) for s in ("train", "val")})
        if not ctx.master_process:  # rank 0's own part never leaves it
            self._count("probabilities", sum(p.nbytes for per in probs.values() for p in per.values()))
        dnn = scores = coarse_history = None
        if ctx.master_process:
            dnn, coarse_history = twolevel.fit_coarse(ctx, gathered, labels, N, K, cfg)
            scores = twolevel.accuracies(dnn, gathered, labels, N, K, splits=("val",))
        scores, coarse_history = self._from_root((scores, coarse_history))
        mine = {i: h for i, h in histories.items()} if ctx.leader else {}
        self._count("metadata", mine)
        all_histories = {}
        for part in parallel.allgather(self.comm, mine):
            all_histories.update(part)
        self._models = {"twolevel": {"local": models, "dnn": dnn, "exchange": "probabilities"}}
        self.local_scores_ = {i: {"val": scores["local"][i]["val"]} for i in range(N)}
        self.scores_ = {name: {"val": scores[key]["val"]} for name, key in
                        (("cnn-dnn", "cnn_dnn"), ("average", "average"), ("vote", "vote"))}
        self.history_ = {**{f"local_{i}": all_histories[i] for i in sorted(all_histories)}, "coarse": coarse_history}
        return self

    def fit_coherent(self, x, y=None, x_val=None, y_val=None, *, init="pretrained", image_shape=None):
        """Train the CNN-DNN as one coherent model, model parallel (Klawonn, Lanser & Weber,
        arXiv 2408.14442): from the fitted local CNNs and coarse DNN (init="pretrained", transfer
        learning; call fit first; dnn_init="random" starts a fresh DNN) or from random weights
        (init="random"). coherent_epochs, coherent_lr (random) or transfer_lr (pretrained) and
        `exchange` ("probabilities" or "logits") set it up. Collective over comm, every step; with
        P = G*N ranks each subdomain's G ranks share its samples (data parallel inside the model-
        parallel step). Afterwards predict(model="coherent") uses it. Returns self."""
        if init not in ("random", "pretrained"):
            raise ValueError(f"init must be 'random' or 'pretrained', not {init!r}")
        if init == "pretrained" and "twolevel" not in self._models:
            raise RuntimeError("init='pretrained' starts from the fitted local CNNs: call fit first (or init='random')")
        if init == "pretrained" and self.dnn_init == "coarse" and self.exchange != "probabilities":
            raise ValueError("dnn_init='coarse' starts from the coarse DNN, which was trained on probabilities: "
                             "use exchange='probabilities', or dnn_init='random'")
        fitted = (self.image_shape_, len(self.classes_)) if self._models else None
        ctx, dec, subsets, labels = self._prepare(x, y, x_val, y_val, image_shape)
        N, K, C = dec.num_subdomains, len(self.classes_), self.image_shape_[0]
        if fitted is not None and fitted != (self.image_shape_, K):
            raise ValueError(f"the classifier was fitted on images {fitted[0]} with {fitted[1]} classes, these are "
                             f"{self.image_shape_} with {K}")
        opts = TrainOptions(epochs=self.coherent_epochs, batch_size=self.batch_size,
                            lr=self.coherent_lr if init == "random" else self.transfer_lr, optimizer=self.optimizer,
                            momentum=self.momentum, weight_decay=self.weight_decay, schedule=self.schedule)
        cfg = coherent.CoherentConfig(opts=opts, output=self.exchange, coarse_hidden=tuple(self.coarse_hidden),
                                      coarse_dropout=self.coarse_dropout, seed=self.seed,
                                      eval_batch_size=self.eval_batch_size)
        start = None
        if init == "pretrained":
            two = self._models["twolevel"]
            start = {"local": two["local"], "dnn": two["dnn"] if self.dnn_init == "coarse" else None}
        local, dnn = coherent.initial_models(ctx, dec, C, K, self.width_factor_, self.config().cnn, cfg, start)
        exchange = parallel.ModelParallelExchange(
            self.comm, ctx.mine, N, K, poll_interval=1e-4 if parallel.oversubscribed(self.comm, torch.get_num_threads())
            else None, member=(ctx.group.rank, ctx.group.size) if ctx.group is not None else None)
        name = f"coherent_{init}"
        history, _, timing = coherent.fit(ctx, name, local, dnn, subsets, labels, cfg, exchange)
        self._sent["exchange"] += exchange.bytes
        self._models[name] = {"local": local, "dnn": dnn, "exchange": self.exchange}
        history = self._from_root(history)
        self.history_ = {**getattr(self, "history_", {}), name: history}
        self.scores_ = {**getattr(self, "scores_", {}), name: {"val": history[-1]["val_acc"]}}
        self.coherent_timing_ = {**getattr(self, "coherent_timing_", {}), name: timing}
        return self

    def _prepare(self, x, y, x_val, y_val, image_shape):
        """Check the data, set the decomposition, this rank's context and the fitted attributes;
        returns (ctx, dec, {subdomain: {split: Shard}}, {split: labels}). Collective."""
        x, y, x_val, y_val = self._training_data(x, y, x_val, y_val, image_shape)
        image_shape, K = self.image_shape_, len(self.classes_)
        dec = self.decomposition(image_shape)
        ctx = self._context(dec)
        C, N = image_shape[0], dec.num_subdomains
        cnn = self.config().cnn
        wf = self.width_factor or local_width_factor(C, K, image_shape[1:], dec.subimage_shape, N, cnn)
        subsets = {i: {"train": s} for i, s in self._shards(ctx, dec, x, y).items()}
        for i, s in self._shards(ctx, dec, x_val, y_val).items():
            subsets[i]["val"] = s
        self._ctx, self._dec, self.n_subdomains_, self.width_factor_ = ctx, dec, N, wf
        return ctx, dec, subsets, {"train": y, "val": y_val}

    # --- inference -----------------------------------------------------------------------------

    def predict_proba(self, x, model="cnn-dnn", *, image_shape=None) -> np.ndarray:
        """Class probabilities (n, K) float32, the same array on every rank. Collective over comm.

        model: cnn-dnn (the coarse DNN), average (mean of the local probabilities), vote
        (fractions of the N local votes), coherent, global or recomposed (where a loaded run
        or file has them)."""
        return self._predict(x, model, image_shape)[0]

    def predict(self, x, model="cnn-dnn", *, image_shape=None) -> np.ndarray:
        """Predicted classes (n,), the same on every rank. Collective over comm."""
        return self._predict(x, model, image_shape)[1]

    def predict_proba_and_classes(self, x, model="cnn-dnn", *, image_shape=None) -> tuple:
        """(predict_proba, predict) in one pass. Collective over comm."""
        return self._predict(x, model, image_shape)

    def score(self, x, y=None, model="cnn-dnn", *, image_shape=None) -> float:
        """Accuracy on (x, y), the same on every rank (y None: the labels of a data file x).
        Collective over comm."""
        x, y = self._agreed(lambda: self._from_file(x, y, "test", "x"))
        return float((self.predict(x, model, image_shape=image_shape) == np.asarray(y)).mean())

    def score_all(self, x, y=None, *, image_shape=None) -> dict:
        """Test accuracies of every two-level model in one pass (one inference, one gather):
        {"cnn-dnn": acc, "average": acc, "vote": acc, "local": {subdomain: acc}}, the same on
        every rank (y None: the labels of a data file x). Collective over comm."""
        x, y = self._agreed(lambda: self._from_file(x, y, "test", "x"))
        y = np.asarray(y)
        gathered = self._gather_outputs(x, "twolevel", image_shape)
        result = None
        if self._ctx.master_process:
            N, K = self.n_subdomains_, len(self.classes_)
            result = {m: float((twolevel.combined_predictions(self._models["twolevel"]["dnn"], gathered, N, K, m,
                                                               self.eval_batch_size)[1] == y).mean())
                      for m in COMBINERS}
            p = gathered.reshape(-1, N, K)
            result["local"] = {i: float((p[:, i].argmax(1) == y).mean()) for i in range(N)}
        return self._from_root(result)

    def _predict(self, x, model, image_shape):
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}: one of {', '.join(MODELS)}")
        x = self._agreed(lambda: self._from_file(x, None, "test", "x", labels=False)[0])
        kind = self._kind(model)
        if kind in WHOLE_IMAGE:
            if isinstance(x, dict):
                raise ValueError(f"model={model!r} classifies whole images: pass them as one array")
            self._check_shape(x, None)
            if is_stream(x):  # rank 0 reads them all: it checks them first
                self._agreed(lambda: check_finite(x) if self._ctx.master_process else None)
            result = None
            if self._ctx.master_process:
                probs = predict_proba(self._models[kind]["model"], _pixels(x), self.eval_batch_size,
                                      precision=self._ctx.precision)
                result = (probs, probs.argmax(1))
            return self._from_root(result)
        gathered = self._gather_outputs(x, kind, image_shape)
        result = None
        if self._ctx.master_process:
            result = twolevel.combined_predictions(self._models[kind]["dnn"], gathered, self.n_subdomains_,
                                                   len(self.classes_), "cnn-dnn" if kind != "twolevel" else model,
                                                   self.eval_batch_size)
        return self._from_root(result)

    def _check_shape(self, x, image_shape) -> int:
        """n, after checking that x fits the fitted model (every rank agrees)."""
        self._fitted()
        image_shape, n = self._check(x, None, (image_shape or self.image_shape_) if isinstance(x, dict) else None, "x")
        if tuple(image_shape) != self.image_shape_:
            raise ValueError(f"images of shape {tuple(image_shape)}, but the model was trained on "
                             f"{self.image_shape_} (C, *spatial)")
        return n

    def _gather_outputs(self, x, kind, image_shape):
        """The local CNNs' outputs of model part `kind` on x, gathered: (n, N*K) on rank 0, None
        elsewhere (softmax, or logits for a coherent model trained on them). Collective."""
        n = self._check_shape(x, image_shape)
        ctx, dec, N, K = self._ctx, self._dec, self.n_subdomains_, len(self.classes_)
        bundle = self._models[kind]
        subsets = {i: {"test": s} for i, s in self._shards(ctx, dec, x, None).items()}
        if bundle.get("exchange", "probabilities") == "logits":
            local = {i: {"test": predict_logits(bundle["local"][i], subsets[i]["test"].x, self.eval_batch_size,
                                                group=ctx.group, total=n, precision=ctx.precision).numpy()}
                     for i in ctx.mine}
        else:
            local = twolevel.local_probabilities(ctx, bundle["local"], subsets, ("test",), self.eval_batch_size)
        gathered = twolevel.gather(ctx, local, subsets, N, K, {"test": n})
        if not ctx.master_process:  # rank 0's own part never leaves it
            self._count("probabilities", sum(p["test"].nbytes for p in local.values()))
        return gathered["test"] if ctx.master_process else None

    def _kind(self, model):
        kind = self._part(model)
        if kind not in self._models:
            raise ValueError(f"this model has no {model!r} part (it has: {', '.join(self.available_models())})")
        return kind

    def _part(self, model):
        """The saved part that `model` runs on (twolevel for the combiners)."""
        if model in COMBINERS:
            return "twolevel"
        if model == "coherent":
            return next((k for k in ("coherent_pretrained", "coherent_random") if k in self._models), "coherent")
        return model

    def available_models(self) -> list:
        """The `model` values predict accepts for this classifier."""
        return [m for m in MODELS if self._part(m) in self._models]

    # --- save and load -------------------------------------------------------------------------

    def manifest(self) -> dict:
        cfg = self.config()
        return {"image_shape": list(self.image_shape_), "input_dtype": self.input_dtype_,
                "grid": list(self._dec.grid), "overlap": self._dec.overlap, "num_classes": len(self.classes_),
                "classes": self.class_names_, "cnn": dataclasses.asdict(cfg.cnn), "width_factor": self.width_factor_,
                "coarse_hidden": list(self.coarse_hidden), "coarse_dropout": self.coarse_dropout,
                "hyperparameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.get_params().items()}}

    def save(self, path) -> str:
        """Write the whole model (every local CNN, the coarse DNN, the decomposition and what is
        needed to rebuild them) to one file, atomically, from rank 0. Collective over comm.
        Returns the file's path on every rank."""
        self._fitted()
        models = {}
        for kind, bundle in self._models.items():
            if kind in WHOLE_IMAGE:
                models[kind] = {"model": _cpu_state(bundle["model"]) if bundle["model"] is not None else None}
                continue
            mine = {i: _cpu_state(m) for i, m in bundle["local"].items()} if self._ctx.leader else {}
            if not self._ctx.master_process:
                self._sent["parameters"] += sum(t.nbytes for st in mine.values() for t in st.values())
            parts = parallel.gather_to_root(self.comm, mine)
            if self._ctx.master_process:
                models[kind] = {"local": {i: s for part in parts for i, s in sorted(part.items())},
                                "dnn": _cpu_state(bundle["dnn"]), "exchange": bundle.get("exchange", "probabilities")}
        return self._write_on_root(path, lambda: (self.manifest(), models))

    @classmethod
    def load(cls, path, comm=None, device=None, threads=None, verbose=False, precision=None) -> "TwoLevelClassifier":
        """A saved model (save's file, or a finished mpidd.train run directory) on `comm`, any
        rank count that training allows (1..N, or a multiple of N). Collective over comm; every
        rank reads the file. Raises saved.ModelFileError (one line) for a missing, corrupt,
        foreign or incompatible file. precision None: the one it was trained in where this
        rank's device supports it, else "32" (the saved weights are float32 either way)."""
        comm = comm if comm is not None else parallel.world_dup()
        error, state = None, None
        try:
            state = saved.load_model(path)
        except saved.ModelFileError as e:
            error = str(e)
        failed = parallel.agree(comm, error)
        if failed:
            raise saved.ModelFileError(failed[1])
        known = set(cls.HYPERPARAMETERS)
        params = {k: v for k, v in state.get("hyperparameters", {}).items() if k in known}
        params.update({k: state["cnn"][k] for k in ("arch", "width", "depth", "convs_per_block", "blocks_per_stage",
                                                   "hidden", "head_pool", "dropout", "batchnorm")})
        params["dense_layers"] = tuple(state["cnn"].get("dense_layers", CNNConfig.dense_layers))
        params.update(grid="x".join(map(str, state["grid"])), overlap=state["overlap"],
                      coarse_hidden=tuple(state["coarse_hidden"]), coarse_dropout=state["coarse_dropout"],
                      width_factor=state["width_factor"], class_names=state["classes"],
                      num_classes=state["num_classes"],
                      normalization=(tuple(state["cnn"]["input_mean"]), tuple(state["cnn"]["input_std"]))
                      if state["cnn"].get("input_mean") else None)
        clf = cls(**params, comm=comm, device=device, threads=threads, verbose=verbose)
        if precision is not None:
            clf.precision = precision
        elif precision_error(clf.precision, clf._torch_device()) is not None:
            clf.precision = "32"
        clf._restore(state, str(path))
        return clf

    def _restore(self, state, path):
        image_shape = tuple(int(s) for s in state["image_shape"])
        dec = self.decomposition(image_shape)
        N, K, C = dec.num_subdomains, int(state["num_classes"]), image_shape[0]
        ctx = self._context(dec)
        cfg = self.config()
        models, error = {}, None
        try:
            for kind, bundle in state["models"].items():
                if kind in WHOLE_IMAGE:
                    if ctx.master_process and bundle.get("model") is not None:
                        models[kind] = {"model": _loaded(build_cnn(C, K, image_shape[1:], cfg.cnn), bundle["model"],
                                                         path, kind, ctx.device)}
                    elif bundle.get("model") is not None:
                        models[kind] = {"model": None}
                    continue
                missing = sorted(set(range(N)) - set(bundle["local"]))
                if missing:
                    raise saved.ModelFileError(f"{path}: the {kind} model lacks the local CNNs of subdomains "
                                               f"{missing} of its {state['grid']} grid")
                local = {i: _loaded(twolevel.build_local_model(C, K, dec, cfg.cnn, state["width_factor"]),
                                    bundle["local"][i], path, f"{kind} local CNN {i}", ctx.device) for i in ctx.mine}
                dnn = None
                if ctx.master_process:
                    dnn = _loaded(CoarseDNN(N * K, K, tuple(state["coarse_hidden"]), state["coarse_dropout"]),
                                  bundle["dnn"], path, f"{kind} DNN", ctx.device)
                models[kind] = {"local": local, "dnn": dnn, "exchange": bundle.get("exchange", "probabilities")}
        except saved.ModelFileError as e:
            error = str(e)
        failed = parallel.agree(self.comm, error)
        if failed:
            raise saved.ModelFileError(failed[1])
        self._ctx, self._dec, self._models = ctx, dec, models
        self.image_shape_, self.input_dtype_ = image_shape, state["input_dtype"]
        self.classes_, self.n_subdomains_, self.width_factor_ = np.arange(K), N, state["width_factor"]
        self.class_names_ = list(state["classes"])


class WidthClassifier(_CollectiveEstimator):
    """Width decomposition (Gu, Zhang, Liu & Cai, ETNA 56, 2022): the global CNN split along its
    channels into `subnets` thin sub-networks (width / subnets channels, the same depth), each
    trained on whole images by its rank (rank r: r, r+P, ...; no communication), gathered to
    rank 0 of comm, recomposed (block-diagonal weights) and trained further there for `epochs`
    at `transfer_lr`. The command line's --mode width, from Python; keywords as there.

    x: whole images (n, C, H, W) or (n, C, D, H, W) on every rank, y: (n,) labels. After fit,
    on every rank: classes_, image_shape_, subnet_scores_ ({m: {"val": acc}}),
    initial_score_ (the recomposed network's val accuracy before further training), scores_,
    history_ ({"subnet_m": [...], "recomposed": [...]})."""

    HYPERPARAMETERS = ("subnets", "arch", "width", "depth", "convs_per_block", "blocks_per_stage", "dense_layers",
                       "hidden", "head_pool", "dropout", "batchnorm", "epochs", "batch_size", "lr", "optimizer",
                       "momentum", "weight_decay", "schedule", "eval_batch_size", "subnet_epochs", "shard",
                       "offdiag_noise", "transfer_lr", "seed", "validation_fraction", "num_classes", "class_names",
                       "normalization", "precision")

    def __init__(self, subnets=4, *, arch="vgg", width=48, depth=2, convs_per_block=2, blocks_per_stage=2,
                 dense_layers=(6, 12, 24, 16), hidden=128, head_pool=3, dropout=0.0, batchnorm=True, epochs=3,
                 batch_size=128, lr=2e-3, optimizer="adam", momentum=0.9, weight_decay=0.0, schedule="cosine",
                 eval_batch_size=256, subnet_epochs=6, shard=False, offdiag_noise=0.0, transfer_lr=5e-4, seed=0,
                 validation_fraction=0.1, num_classes=None, class_names=None, normalization=None, precision="32",
                 comm=None, device=None, threads=None, verbose=False):
        for k, v in locals().items():
            if k in self.HYPERPARAMETERS:
                setattr(self, k, v)
        self._setup(comm, device, threads, verbose)

    def config(self) -> width.WidthConfig:
        cnn = self._cnn_config()
        common = dict(batch_size=self.batch_size, optimizer=self.optimizer, momentum=self.momentum,
                      weight_decay=self.weight_decay, schedule=self.schedule)
        return width.WidthConfig(cnn=cnn, subnets=self.subnets,
                                 subnet_opts=TrainOptions(epochs=self.subnet_epochs, lr=self.lr, **common),
                                 recomposed_opts=TrainOptions(epochs=self.epochs, lr=self.transfer_lr, **common),
                                 shard=self.shard, offdiag_noise=self.offdiag_noise, seed=self.seed,
                                 eval_batch_size=self.eval_batch_size)

    def fit(self, x, y=None, x_val=None, y_val=None):
        """Sub-networks in parallel, recomposition and further training on rank 0. Collective. Returns self.
        x, x_val: arrays or images in an HDF5 file, as TwoLevelClassifier.fit takes them."""
        if isinstance(x, dict):
            raise ValueError("the width decomposition trains on whole images: pass them as one array")
        x, y, x_val, y_val = self._training_data(x, y, x_val, y_val, None)
        image_shape, K = self.image_shape_, len(self.classes_)
        cfg = self.config()
        try:
            width_subnet_config(cfg.cnn, self.subnets)
            mine = layout(self.comm.Get_rank(), self.comm.Get_size(), self.subnets)[0]
        except (WidthError, DecompositionError) as e:
            raise ValueError(str(e).replace("subdomains", "sub-networks")) from None
        if self.comm.Get_size() > self.subnets:
            raise ValueError(f"{self.comm.Get_size()} ranks but only {self.subnets} sub-networks: use at most "
                             f"{self.subnets} ranks or more sub-networks")
        ctx = self._context_of(mine)
        C, shape = image_shape[0], image_shape[1:]
        if is_stream(x) or is_stream(x_val):  # every rank trains on whole images: each checks them
            self._agreed(lambda: [check_finite(a) for a in (x, x_val) if is_stream(a)])
        whole = {"train": Shard(_pixels(x), y.astype(np.int64)), "val": Shard(_pixels(x_val), y_val.astype(np.int64))}
        states, scores, histories = width.fit_subnets(ctx, whole, C, K, shape, cfg, score_splits=("val",))
        if not ctx.master_process:
            self._count("parameters", sum(t.nbytes for st in states.values() for t in st.values()))
        states, scores = width.gather(ctx, states, scores)
        result = model = None
        if ctx.master_process:
            model = width.recompose(ctx, states, C, K, shape, cfg)
            initial = evaluate(model, whole["val"].x, whole["val"].y, self.eval_batch_size, precision=ctx.precision)[1]
            history = width.fit_recomposed(ctx, model, whole, cfg)
            result = ({m: {"val": scores[m]["val"][1]} for m in sorted(scores)}, initial, history)
        subnet_scores, initial, history = self._from_root(result)
        mine_histories = {m: h for m, h in histories.items()}
        self._count("metadata", mine_histories)
        all_histories = {}
        for part in parallel.allgather(self.comm, mine_histories):
            all_histories.update(part)
        self._ctx = ctx
        self._models = {"recomposed": model}  # rank 0's; None elsewhere
        self.subnet_scores_, self.initial_score_ = subnet_scores, initial
        self.scores_ = {"recomposed": {"val": history[-1]["val_acc"]}}
        self.history_ = {**{f"subnet_{m}": all_histories[m] for m in sorted(all_histories)}, "recomposed": history}
        return self

    def predict_proba(self, x) -> np.ndarray:
        """Class probabilities (n, K) of the recomposed network (computed on rank 0), on every rank. Collective."""
        return self._predict(x)[0]

    def predict(self, x) -> np.ndarray:
        """Predicted classes (n,) on every rank. Collective."""
        return self._predict(x)[1]

    def score(self, x, y=None) -> float:
        """Accuracy on (x, y), the same on every rank (y None: the labels of a data file x). Collective."""
        x, y = self._agreed(lambda: self._from_file(x, y, "test", "x"))
        return float((self.predict(x) == np.asarray(y)).mean())

    def _predict(self, x):
        self._fitted()
        x = self._agreed(lambda: self._from_file(x, None, "test", "x", labels=False)[0])
        image_shape, _ = self._check(x, None, None, "x")
        if tuple(image_shape) != self.image_shape_:
            raise ValueError(f"images of shape {tuple(image_shape)}, but the model was trained on {self.image_shape_}")
        if is_stream(x):  # rank 0 reads them all: it checks them first
            self._agreed(lambda: check_finite(x) if self.comm.Get_rank() == 0 else None)
        result = None
        if self.comm.Get_rank() == 0:
            probs = predict_proba(self._models["recomposed"], _pixels(x), self.eval_batch_size,
                                  precision=self._ctx.precision)
            result = (probs, probs.argmax(1))
        return self._from_root(result)

    def save(self, path) -> str:
        """The recomposed network as an mpidd model file (its "recomposed" part: python -m
        mpidd.predict FILE --model recomposed classifies with it), written by rank 0. Collective;
        the path on every rank."""
        self._fitted()
        d = len(self.image_shape_) - 1
        manifest = {"method": "width", "image_shape": list(self.image_shape_), "input_dtype": self.input_dtype_,
                    "grid": [1] * d, "overlap": 0, "num_classes": len(self.classes_), "classes": self.class_names_,
                    "cnn": dataclasses.asdict(self.config().cnn), "width_factor": 1.0, "coarse_hidden": [],
                    "coarse_dropout": 0.0, "hyperparameters": self.get_params()}
        return self._write_on_root(path, lambda: (
            manifest, {"recomposed": {"model": _cpu_state(self._models["recomposed"])}}))


# --- helpers ---------------------------------------------------------------------------------------

def from_file(x, y, split: str, what: str, labels: bool = True, stats=None):
    """(x, y) with images in an HDF5 file (see the module docstring, form c) as a
    stream.BoxStream (counting its reads in `stats`) and, where y is None, the labels beside
    them; arrays pass as they are."""
    images, file_labels = file_images(x, split, stats)
    if images is None:
        return x, y
    if y is None and labels:
        if file_labels is None:
            raise ValueError(f"{what}: {images.name} has no labels beside it: pass them")
        y = file_labels
    return images, y


def _count(x) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) and x else (0 if isinstance(x, dict) else len(x))


def normalization_pair(value) -> tuple[tuple, tuple]:
    """normalization= None, (mean, std) or {"mean": ..., "std": ...} -> (mean tuple, std tuple)."""
    if value is None:
        return (), ()
    mean, std = (value["mean"], value["std"]) if isinstance(value, dict) else value
    mean, std = tuple(float(v) for v in np.ravel(mean)), tuple(float(v) for v in np.ravel(std))
    if len(mean) != len(std) or not mean or not all(np.isfinite(mean)) or not all(s > 0 for s in std):
        raise ValueError(f"normalization needs one finite mean and one std > 0 per channel, got {value!r}")
    return mean, std


def _dtype_name(x) -> str:
    first = next(iter(x.values())) if isinstance(x, dict) else x
    return "uint8" if (first.dtype if is_stream(first) else np.asarray(first).dtype) == np.uint8 else "float32"


def _pixels(a) -> np.ndarray:
    """uint8 stays uint8 (scaled batch by batch); anything else becomes float32. A stream stays
    as it is (its batches are read as they are needed)."""
    if is_stream(a):
        return a
    a = np.asarray(a)
    return np.ascontiguousarray(a) if a.dtype == np.uint8 else np.ascontiguousarray(a, dtype=np.float32)


def _check_images(clf, x, y, image_shape, what):
    """(image_shape, n) of images in form (a) or (b); ValueError with one line otherwise."""
    if isinstance(x, dict):
        if image_shape is None:
            raise ValueError(f"{what} holds subimages by subdomain: pass image_shape=(C, H, W) of the whole images")
        image_shape = tuple(int(s) for s in image_shape)
        dec = clf.decomposition(image_shape)
        mine = clf._layout(dec)[0]
        if sorted(x) != sorted(mine):
            raise ValueError(f"{what} holds subdomains {sorted(x)}, but this rank owns {mine} of the "
                             f"{dec.num_subdomains} (see local_boxes)")
        sizes = {len(v) for v in x.values()}
        if len(sizes) > 1:
            raise ValueError(f"{what}: the subdomains hold different numbers of samples {sorted(sizes)}")
        for i, part in x.items():
            part = np.asarray(part)
            want = (len(part), image_shape[0]) + dec.subimage_shape
            if part.shape != want:
                raise ValueError(f"{what}[{i}] has shape {part.shape}, subdomain {i}'s box needs {want}")
            _check_values(part, f"{what}[{i}]")
        n = sizes.pop() if sizes else 0
    else:
        x = np.asarray(x) if not hasattr(x, "shape") else x
        if x.ndim not in (4, 5):
            raise ValueError(f"{what} has shape {tuple(x.shape)}: expected (n, C, H, W) or (n, C, D, H, W)")
        if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
            raise ValueError(f"{what} has images of shape {tuple(x.shape[1:])}, expected {tuple(image_shape)}")
        image_shape, n = tuple(int(s) for s in x.shape[1:]), len(x)
        if is_stream(x):  # (its values: in each rank's boxes, when they are read: see _shards)
            if x.dtype != np.uint8 and x.dtype.kind != "f":
                raise ValueError(f"{what} ({x.name}) has dtype {x.dtype}: expected uint8 or float images")
        else:
            _check_values(x, what)
    if y is not None:
        if y.ndim != 1 or len(y) != n:
            raise ValueError(f"labels for {what} have shape {y.shape}, expected ({n},)")
        if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
            raise ValueError(f"labels for {what} must be integers 0..K-1")
        if clf.num_classes is not None and len(y) and y.max() >= clf.num_classes:
            raise ValueError(f"labels for {what} go up to {y.max()}, but num_classes is {clf.num_classes}")
    if n == 0:
        raise ValueError(f"{what} holds no images")
    return image_shape, n


def _check_values(a, what):
    a = np.asarray(a)
    if a.dtype != np.uint8 and not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{what} has dtype {a.dtype}: expected uint8 or float images")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{what} holds NaN or inf values")


def _cpu_state(module) -> dict | None:
    if module is None:
        return None
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _loaded(module, state, path, what, device):
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as e:
        raise saved.ModelFileError(f"{path}: the {what} does not fit its recorded configuration "
                                   f"({str(e).splitlines()[0]})") from None
    return module.to(device).eval()


__all__ = ["TwoLevelClassifier", "WidthClassifier", "COMBINERS", "MODELS", "__version__"]
