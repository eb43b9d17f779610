"""The plumbing under the estimators of mpidd.api. CollectiveEstimator: what TwoLevelClassifier
and WidthClassifier share (the communicator and device, input checks agreed by every rank, the
seeded validation hold-out, rank 0's results on every rank, the bytes sent and read, the model
file written by rank 0). SubdomainEstimator: TwoLevelClassifier's subdomains, shards, predict
routing and loading. partial_fit is in online_estimator.py, scikit-learn's conventions in
sklearn_conventions.py."""

from __future__ import annotations

import os

import numpy as np
import torch

from . import parallel, saved
from .decomposition import DecompositionError, layout
from .engine import Shard, precision_error, predict_logits, predict_proba
from .inputs import (check_images, check_values, count_samples, dtype_name, encode_labels, from_file, from_torch,
                     hold_out, label_classes, pixels, subimages)
from .methods import twolevel
from .methods.context import Context, Progress, print_flushed
from .models import local_width_factor
from .saved import MODELS, WHOLE_IMAGE
from .sklearn_conventions import SklearnConventions
from .stream import check_finite, is_stream
from .traffic import ByteCounter


class CollectiveEstimator(SklearnConventions):
    """The base of TwoLevelClassifier and WidthClassifier: every method that takes `comm` is
    collective over it, and an error found on one rank is raised on every rank. A subclass
    sets HYPERPARAMETERS = hyperparameters(__init__), stores every keyword of its __init__ as
    given (scikit-learn's rule: get_params, set_params, clone) and builds its typed config with
    mpidd.options from its attributes (the command line's names).

    The constructor is not collective and makes no communicator: comm=None means the one
    duplicate of MPI_COMM_WORLD that every such estimator of the process shares
    (parallel.shared_world, made at the first collective call). What an estimator makes for
    itself (the data-parallel groups split off a given comm) close() frees."""

    HYPERPARAMETERS: tuple = ()
    # whether every rank uses the whole of an image array (and so checks all of it for NaN and
    # inf): WidthClassifier's do; TwoLevelClassifier's ranks check their own subimages only
    USES_WHOLE_ARRAYS = True

    def _setup(self, comm, device, threads, verbose):
        self.comm, self.device, self.threads, self.verbose = comm, device, threads, verbose
        self._models = {}
        self._groups = {}  # (subdomains, ranks) -> the data-parallel group's communicator (comm given)
        # payload this rank contributed to the estimator's collectives, by kind (see bytes_sent_),
        # and what this rank's reads of data files (input form c) did
        self._bytes = ByteCounter()

    @property
    def _comm(self):
        """The communicator the estimator runs on: comm, or the process's shared duplicate of
        MPI_COMM_WORLD (collective the first time any estimator asks for it)."""
        return self.comm if self.comm is not None else parallel.shared_world()

    def close(self):
        """Free the communicators this estimator split off its comm (the data-parallel groups,
        P > N) and its fitted models. Collective over comm. The estimator can be fitted again."""
        parallel.free_groups(self._groups)
        self._models = {}
        self._ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @property
    def bytes_sent_(self) -> dict:
        """Bytes this rank has sent to other ranks so far (its payload in each collective,
        counted once; rank 0's part of a gather to itself is not counted): probabilities
        (gather of the local CNNs' class probabilities), results (rank 0's
        broadcast of predictions and scores), exchange (the coherent model's local outputs and,
        back, their gradients: this rank's part), parameters (save: local CNN weights to rank 0),
        gradients (data-parallel gradient sums, P > N only), metadata (histories, error
        agreements, pickled). Images never leave their rank."""
        group = getattr(getattr(self, "_ctx", None), "group", None)
        return self._bytes.totals(gradients=group.bytes if group is not None else 0)

    @property
    def bytes_read_(self) -> int:
        """Bytes of images this rank has read from data files (input form c): its boxes only."""
        return self._bytes.bytes_read

    # --- every rank agrees -------------------------------------------------------------------

    def _raise_agreed(self, error):
        """ValueError on every rank if any rank's `error` (a message, or None) is set. Collective."""
        failed = parallel.agree(self._comm, error)
        if failed:
            raise ValueError(failed[1] if self._comm.Get_size() == 1 else f"rank {failed[0]}: {failed[1]}")

    def _agreed(self, step):
        """step() on every rank; a ValueError on any rank is raised on every rank."""
        error, result = None, None
        try:
            result = step()
        except ValueError as e:
            error = str(e)
        self._raise_agreed(error)
        return result

    def _check(self, x, y, image_shape, what) -> tuple:
        """(image_shape, n) of `x`, checked on this rank; every rank raises if any rank's is bad."""
        error = None
        try:
            image_shape, n = check_images(x, y, image_shape, what, self.num_classes, self._owned,
                                          values=self.USES_WHOLE_ARRAYS)
        except ValueError as e:
            error = str(e)
        self._bytes.count("metadata", error)
        self._raise_agreed(error)
        return image_shape, n

    def _owned(self, image_shape):
        """(Decomposition, this rank's subdomains) for input form (b): TwoLevelClassifier's."""
        raise NotImplementedError

    def _from_root(self, obj):
        """Rank 0's `obj` on every rank (counted as results sent by rank 0)."""
        if self._comm.Get_rank() == 0 and self._comm.Get_size() > 1:
            self._bytes.count("results", obj)
        return parallel.broadcast_from_root(self._comm, obj)

    def _allgathered(self, mine: dict) -> dict:
        """Every rank's dict `mine` merged, on every rank (counted as metadata). Collective."""
        self._bytes.count("metadata", mine)
        merged = {}
        for part in parallel.allgather(self._comm, mine):
            merged.update(part)
        return merged

    # --- device and data ---------------------------------------------------------------------

    def _torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if not hasattr(self, "_device"):
            self._device = parallel.select_device("auto", self._comm, set_current=False)[0]
        return self._device

    def _context_of(self, mine, group=None) -> Context:
        """This rank's Context; ValueError on every rank if `precision` cannot run on a rank's device."""
        device = self._torch_device()
        self._raise_agreed(precision_error(self.precision, device))
        verbose = self.verbose and self._comm.Get_rank() == 0  # rank 0 prints progress
        return Context(comm=self._comm, device=device, precision=self.precision, mine=mine, group=group,
                       progress=Progress(sinks=(print_flushed,) if verbose else ()))

    def _from_file(self, x, y, split, what, labels=True):
        """x and y as arrays (torch tensors through DLPack) or, for images in a data file, a stream."""
        return from_file(from_torch(x), from_torch(y), split, what, labels, stats=self._bytes.io)

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
        if x_val is None:  # the same seeded split on every rank
            x, y, x_val, y_val = hold_out(x, y, n, self.validation_fraction, self.seed)
        else:
            y_val = np.asarray(y_val)
            self._check(x_val, y_val, image_shape, "x_val")
        self.classes_ = self._agreed(lambda: label_classes((y, y_val), self.num_classes))
        self.image_shape_, self.input_dtype_ = tuple(int(s) for s in image_shape), dtype_name(x)
        self.class_names_ = self._class_names()
        return x, encode_labels(y, self.classes_), x_val, encode_labels(y_val, self.classes_)

    def _class_names(self) -> list:
        if self.class_names is None:
            return [str(c) for c in self.classes_]
        if len(self.class_names) != len(self.classes_):
            raise ValueError(f"{len(self.class_names)} class_names for {len(self.classes_)} classes "
                             f"({', '.join(map(str, self.classes_))})")
        return list(self.class_names)

    def _fitted(self):
        if not self._models:
            raise RuntimeError(f"this {type(self).__name__} is not fitted: call fit (or load) first")

    # --- results -----------------------------------------------------------------------------

    def _whole_image_predictions(self, model, x) -> tuple:
        """(probabilities, classes) of a CNN of the whole image (rank 0's `model`) on whole
        images x, computed on rank 0, on every rank. Collective."""
        if is_stream(x) or not self.USES_WHOLE_ARRAYS:  # rank 0 uses them all: it checks them first
            self._agreed(lambda: (check_finite(x) if is_stream(x) else check_values(x, "x"))
                         if self._comm.Get_rank() == 0 else None)
        result = None
        if self._comm.Get_rank() == 0:
            probs = predict_proba(model, pixels(x), self.eval_batch_size, precision=self._ctx.precision)
            result = (probs, probs.argmax(1))
        return self._from_root(result)

    def _write_on_root(self, path, contents, write=saved.save_model) -> str:
        """Rank 0 writes the model file of contents() = (manifest, models), atomically (with
        write(path, *contents), which returns the path written); every rank returns its path or
        raises the same OSError. Collective."""
        error, written = None, None
        if self._comm.Get_rank() == 0:
            try:
                written = write(path, *contents())
            except OSError as e:
                error = f"cannot write {path}: {e}"
        error, written = parallel.broadcast_from_root(self._comm, (error, written))
        if error:
            raise OSError(error)
        return written


class SubdomainEstimator(CollectiveEstimator):
    """The plumbing of TwoLevelClassifier, whose models see subdomains: the subdomains this
    rank owns (the subclass gives decomposition(image_shape) and config()), its shards of the
    inputs, predict routed over the fitted parts (self._models: part -> {"local": {i: module},
    "dnn": ..., "exchange": ...} or {"model": ...}, see saved.part_of), the local CNNs' outputs
    gathered to rank 0, and a loaded model file's models."""

    USES_WHOLE_ARRAYS = False

    def _layout(self, dec):
        size, rank = self._comm.Get_size(), self._comm.Get_rank()
        try:
            return layout(rank, size, dec.num_subdomains)
        except DecompositionError as e:
            raise ValueError(str(e)) from None

    def _owned(self, image_shape):
        """(Decomposition, this rank's subdomains) for input form (b)."""
        dec = self.decomposition(image_shape)
        return dec, self._layout(dec)[0]

    def _context(self, dec):
        """Collective (the data-parallel groups are split off comm when P > N)."""
        mine, replicas, member = self._layout(dec)
        group = None
        if replicas > 1:  # one Split per layout, kept: shared by every comm=None estimator, else freed by close
            group = parallel.cached_group(parallel.SHARED_GROUPS if self.comm is None else self._groups,
                                          (dec.num_subdomains, self._comm.Get_size()), self._comm, mine[0], member)
        return self._context_of(mine, group)

    def _shards(self, ctx, dec, x, y) -> dict:
        """{subdomain: Shard} of this rank (its share of the samples in a data-parallel group)."""
        n = len(y) if y is not None else count_samples(x)
        rows = ctx.group.share(n) if ctx.group is not None else (0, n)
        out = {}
        for i in ctx.mine:
            labels = np.zeros(rows[1] - rows[0], np.int64) if y is None else np.asarray(y[rows[0]:rows[1]], np.int64)
            out[i] = Shard(pixels(subimages(x, i, dec.slices(i), rows)), labels, rows[0], n)
        if is_stream(x):  # NaN and inf, in this rank's boxes only: read once, in blocks
            self._agreed(lambda: [check_finite(s.x) for s in out.values()])
        elif not isinstance(x, dict):  # whole images: only the boxes this rank uses (form b: checked already)
            self._agreed(lambda: [check_values(s.x, f"x, in subdomain {i}'s box,") for i, s in out.items()])
        return out

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

    # --- predict: routed over the fitted parts ---------------------------------------------------

    def _predict(self, x, model, image_shape):
        """(probabilities, classes) of `model` on x, on every rank: a CNN of the whole image on
        rank 0, or the local CNNs' outputs gathered to rank 0 and combined there. Collective."""
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}: one of {', '.join(MODELS)}")
        x = self._agreed(lambda: self._from_file(x, None, "test", "x", labels=False)[0])
        kind = self._kind(model)
        if kind in WHOLE_IMAGE:
            if isinstance(x, dict):
                raise ValueError(f"model={model!r} classifies whole images: pass them as one array")
            self._check_shape(x, None)
            return self._whole_image_predictions(self._models[kind]["model"], x)
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
        gathered = twolevel.gather_to_coarse(ctx, local, subsets, N, K, {"test": n})
        if not ctx.master_process:  # rank 0's own part never leaves it
            self._bytes.count("probabilities", sum(p["test"].nbytes for p in local.values()))
        return gathered["test"] if ctx.master_process else None

    def _kind(self, model):
        kind = self._part(model)
        if kind not in self._models:
            raise ValueError(f"this model has no {model!r} part (it has: {', '.join(self.available_models())})")
        return kind

    def _part(self, model):
        """The fitted part that `model` runs on (twolevel for the combiners)."""
        return saved.part_of(model, self._models)

    # --- save and load -----------------------------------------------------------------------

    def _weights_on_root(self) -> dict:
        """The fitted parts' weights as the model file's "models", on rank 0: the local CNNs'
        gathered from every rank (counted as parameters sent), the rest rank 0's. Collective."""
        models = {}
        for kind, bundle in self._models.items():
            if kind in WHOLE_IMAGE:
                models[kind] = saved.whole_part(saved.cpu_state(bundle["model"]))
                continue
            mine = {i: saved.cpu_state(m) for i, m in bundle["local"].items()} if self._ctx.leader else {}
            if not self._ctx.master_process:
                self._bytes.count("parameters", sum(t.nbytes for st in mine.values() for t in st.values()))
            parts = parallel.gather_to_root(self._comm, mine)
            if self._ctx.master_process:
                models[kind] = saved.combined_part({i: s for part in parts for i, s in sorted(part.items())},
                                                   saved.cpu_state(bundle["dnn"]),
                                                   bundle.get("exchange", "probabilities"))
        return models

    def _restore(self, state, path):
        """This rank's models of a loaded model file (`state`, read from `path`) and the fitted
        attributes. Collective; ModelFileError on every rank if a rank's part does not fit."""
        image_shape = tuple(int(s) for s in state["image_shape"])
        dec = self.decomposition(image_shape)
        ctx = self._context(dec)
        cnn, models, error = self.config().cnn, {}, None
        try:
            models = saved.build_models(state, path, dec, cnn, ctx.mine, ctx.master_process, ctx.device)
        except saved.ModelFileError as e:
            error = str(e)
        agree_on_file(self._comm, error)
        self._ctx, self._dec, self._models = ctx, dec, models
        self.image_shape_, self.input_dtype_ = image_shape, state["input_dtype"]
        K, self.n_subdomains_, self.width_factor_ = int(state["num_classes"]), dec.num_subdomains, state["width_factor"]
        self.classes_ = np.asarray(state["labels"]) if "labels" in state else np.arange(K)
        self.class_names_ = list(state["classes"])


def agree_on_file(comm, error):
    """saved.ModelFileError on every rank if any rank's `error` (a message, or None) is set. Collective."""
    failed = parallel.agree(comm, error)
    if failed:
        raise saved.ModelFileError(failed[1])
