"""The Python API of dense prediction: TwoLevelUNet, local U-Nets with a coarse exchange over a
communicator, for fields (task="regress") and masks (task="segment").

    mpirun -n 4 python my_script.py

    import mpidd
    net = mpidd.TwoLevelUNet(task="regress", grid="2x2", epochs=10, comm=comm)
    net.fit(x_train, t_train, x_val, t_val)       # collective: local U-Nets, then the coarse exchange
    net.fit_coherent(x_train, t_train, x_val, t_val)   # collective: end to end (transfer learning)
    u = net.predict(x_test, model="coherent-pretrained")   # collective: whole fields on every rank
    net.scores(x_test, t_test)                     # {"mae": ..., "rel_l2": ..., "ssim": ...}
    net.save("heat.pt"); net = mpidd.TwoLevelUNet.load("heat.pt", comm=comm)   # any rank count 1..N

Inputs: x whole images (n, C, H, W) or (n, C, D, H, W), the same on every rank (each rank uses
only its subdomains' boxes), or the path of an mpidd data file with targets (fit: its train
split, and its val split unless x_val is given; predict and scores: its test split;
"FILE.h5:val" names another), of which each rank reads only its boxes. Targets t: regress,
float fields (n, C_out, *spatial); segment, integer masks (n, *spatial) of classes
0..num_classes-1 (default: the largest class in t and t_val, plus one). The grid divides the
image into equal tiles; with overlap each subdomain's U-Net sees its tile widened by `overlap`
pixels of its neighbours' (a halo) and predicts its tile. P <= N ranks, float32 on the CPU.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from . import data, options, parallel, rundir, saved
from .engine import to_channels_last
from .decomposition import Decomposition, DecompositionError, choose_grid, parse_grid, subdomains_of_rank
from .estimator import CollectiveEstimator, agree_on_file
from .inputs import hold_out
from .methods import dense
from .metrics import dense_loss, regression_scores, regression_sums, segmentation_scores, segmentation_sums, ssim
from .sklearn_conventions import hyperparameters
from .unet import build_unet, matching_width_factor

MODELS = ("local-only", "two-level", "coherent-random", "coherent-pretrained")
FORMAT, FORMAT_VERSION = "mpidd-dense-model", 1
MODEL_FILE = "model.pt"  # in a run directory


class TwoLevelUNet(CollectiveEstimator):
    """Dense prediction by domain decomposition (the command line's --task regress | segment):
    one local U-Net per subdomain, trained without communication (model "local-only"); rank 0's
    coarse network maps every subdomain's bottleneck to a correction of its decoder, trained with
    the local U-Nets frozen ("two-level"); fit_coherent trains the whole as one model parallel
    network ("coherent-random", "coherent-pretrained"). Every result is the same at any number
    of ranks P <= N.

    Every keyword is the command line's option of the same name (mpidd.train --help), with the
    same default for dense tasks; `loss` None is the task's default (mse, ce). API-only:
    `validation_fraction` (held out of the training samples when fit gets no x_val),
    `num_classes` (segment), `comm` (None: the process's shared duplicate of MPI_COMM_WORLD),
    `device` (None or "cpu": the networks run on the CPU), `threads` (None: torch's setting is
    left alone) and `verbose` (rank 0 prints progress).

    After fit, on every rank: n_subdomains_, image_shape_, out_channels_ (regress) or
    num_classes_ (segment), width_factor_, scores_ ({model: {"val": scores}}), history_."""

    USES_WHOLE_ARRAYS = False  # each rank checks its own boxes for NaN and inf
    precision = "32"

    def _torch_device(self) -> torch.device:
        return torch.device("cpu")

    def __init__(self, task="regress", grid="auto", *, overlap=0, loss=None, unet_width=16, unet_depth=2,
                 batchnorm=True, width_factor=None, epochs=3, batch_size=128, lr=2e-3, optimizer="adam", momentum=0.9,
                 weight_decay=0.0, schedule="cosine", eval_batch_size=256, coarse_channels=32, coarse_layers=3,
                 coarse_epochs=5, coarse_lr=3e-3, coarse_weight_decay=0.0, coarse_batch_size=128, coherent_epochs=2,
                 coherent_lr=2e-3, transfer_lr=2e-3, seed=0, validation_fraction=0.1, num_classes=None,
                 normalization=None, comm=None, device=None, threads=None, verbose=False):
        for k, v in locals().items():  # as given (scikit-learn's rule)
            if k in self.HYPERPARAMETERS:
                setattr(self, k, v)
        self._setup(comm, device, threads, verbose)

    HYPERPARAMETERS = hyperparameters(__init__)

    def config(self) -> dense.DenseConfig:
        """The typed configuration the method runs with (mpidd.options, as the command line's)."""
        return options.dense_config(self)

    def decomposition(self, image_shape) -> Decomposition:
        """Boxes (tiles widened by the overlap) of images of shape (C, H, W) or (C, D, H, W); grid
        "auto": from comm's size."""
        try:
            spatial = tuple(image_shape)[1:]
            grid = choose_grid(self._comm.Get_size(), spatial)[0] if self.grid == "auto" else parse_grid(self.grid)
            dec = Decomposition(spatial, grid, self.overlap)
            subdomains_of_rank(0, self._comm.Get_size(), dec.num_subdomains)
        except DecompositionError as e:
            raise ValueError(str(e)) from None
        if not dec.tiles_are_equal:
            raise ValueError(f"grid {self.grid} does not divide images of {spatial} into equal tiles")
        return dec

    # --- inputs ----------------------------------------------------------------------------------

    def _read(self, x, t, split, dec, mine) -> tuple:
        """({subdomain: (subimages, target tiles or None)}, n) of this rank, from arrays or a data file."""
        if isinstance(x, str):
            path, _, named = x.partition(":")
            split = named or split
            boxes = {i: data.load_dense_box(path, split, dec.slices(i), dec.tile_slices(i), targets=t is not False)[:2]
                     for i in mine}
            return boxes, len(next(iter(boxes.values()))[0])
        x = np.asarray(x)
        boxes = {}
        for i in mine:
            box = dec.slices(i)
            images = np.ascontiguousarray(x[(slice(None), slice(None)) + box])
            if images.dtype != np.uint8 and not np.isfinite(images).all():
                raise ValueError(f"images hold NaN or inf values in subdomain {i}")
            boxes[i] = (images, None if t is None or t is False else self._target_box(t, dec.tile_slices(i), i))
        return boxes, len(x)

    def _target_box(self, t, tile, i):
        t = np.asarray(t)
        if self.task == "regress":
            part = np.ascontiguousarray(t[(slice(None), slice(None)) + tile], dtype=np.float32)
            if not np.isfinite(part).all():
                raise ValueError(f"targets hold NaN or inf values in subdomain {i}")
            return part
        part = np.ascontiguousarray(t[(slice(None),) + tile])
        if not np.issubdtype(part.dtype, np.integer):
            raise ValueError(f"task segment needs integer masks (n, *spatial), got {part.dtype}")
        if part.size and (part.min() < 0 or part.max() >= self.num_classes_):
            raise ValueError(f"masks hold classes outside 0..{self.num_classes_ - 1} in subdomain {i}")
        return part.astype(np.int64)

    def _shapes(self, x, t, t_val):
        """(image shape (C, *spatial), output channels): checked against the targets, on every rank."""
        if isinstance(x, str):
            info = data.inspect(x.partition(":")[0], task=self.task)
            image_shape, targets = info.image_shape, info.targets
            return image_shape, targets.channels
        x = np.asarray(x)
        if x.ndim not in (4, 5) or t is None:
            raise ValueError(f"x must be images (n, C, H, W) or (n, C, D, H, W) with targets t, got shape {x.shape}")
        t = np.asarray(t)
        spatial = x.shape[2:]
        if self.task == "regress":
            if t.shape[0] != len(x) or t.ndim != x.ndim or t.shape[2:] != spatial:
                raise ValueError(f"task regress needs fields t (n, C_out, {', '.join(map(str, spatial))}) beside "
                                 f"x {x.shape}, got {t.shape}")
            return x.shape[1:], t.shape[1]
        if t.shape != (len(x),) + spatial:
            raise ValueError(f"task segment needs masks t {(len(x),) + spatial} beside x {x.shape}, got {t.shape}")
        if self.num_classes is None:
            top = max(int(np.max(a)) for a in (t, t_val) if a is not None and np.size(a))
            return x.shape[1:], max(2, top + 1)
        return x.shape[1:], int(self.num_classes)

    def _prepare(self, x, t, x_val, t_val):
        """Collective: the checked shapes and this rank's boxes of the training and validation sets."""
        def step():
            dense_loss(self.task, self.loss or options.DENSE_LOSSES.get(self.task, "mse"))  # ValueError if unfit
            image_shape, out = self._shapes(x, t, t_val)
            self.num_classes_ = out if self.task == "segment" else None
            dec = self.decomposition(image_shape)
            mine = subdomains_of_rank(self._comm.Get_rank(), self._comm.Get_size(), dec.num_subdomains)
            if isinstance(x, str) or x_val is not None:
                train = self._read(x, t, "train", dec, mine)[0]
                val = self._read(x if x_val is None else x_val, t_val, "val", dec, mine)[0]
            else:  # a seeded share of the training samples for validation
                xt, tt, xv, tv = hold_out(np.asarray(x), np.asarray(t), len(x), self.validation_fraction, self.seed)
                train = self._read(xt, tt, "train", dec, mine)[0]
                val = self._read(xv, tv, "val", dec, mine)[0]
            subsets = {i: {"train": train[i], "val": val[i]} for i in mine}
            return image_shape, out, dec, mine, subsets
        if self.task not in ("regress", "segment"):
            raise ValueError(f"task must be regress or segment, not {self.task!r}")
        if self.device not in (None, "cpu"):
            raise ValueError(f"TwoLevelUNet trains on the CPU: device must be None or 'cpu', not {self.device!r}")
        image_shape, out, dec, mine, subsets = self._agreed(step)
        self.image_shape_, self.n_subdomains_ = tuple(image_shape), dec.num_subdomains
        if self.task == "regress":
            self.out_channels_ = out
        cfg = self.config()
        self.width_factor_ = self.width_factor or matching_width_factor(
            image_shape[0], out, dec.shape, dec.subimage_shape, dec.num_subdomains, cfg.unet)
        self._dec, self._cfg, self._out = dec, cfg, out
        self._bottleneck = build_unet(image_shape[0], out, dec.subimage_shape, cfg.unet,
                                      self.width_factor_).bottleneck_shape
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self._ctx = self._context_of(mine)
        # ranks sharing cores sleep in the exchanges' waits instead of spinning
        self._ctx.stops.wait_interval = 1e-4 if parallel.oversubscribed(self._comm, torch.get_num_threads()) else None
        return self._ctx, dec, subsets

    # --- fit -------------------------------------------------------------------------------------

    def fit(self, x, t=None, x_val=None, t_val=None):
        """Train the local U-Nets, then rank 0's coarse network with them frozen. Collective. Returns self."""
        ctx, dec, subsets = self._prepare(x, t, x_val, t_val)
        cfg, C = self._cfg, self.image_shape_[0]
        models, histories = dense.fit_local_unets(ctx, subsets, dec, C, self._out, self.width_factor_, cfg)
        local_val = dense.dense_scores(ctx, dense.local_predictions(models, subsets, "val", cfg), subsets, "val", cfg)
        gathered = dense.gather_bottlenecks(ctx, models, subsets, dec.num_subdomains, splits=("train", "val"),
                                            batch_size=cfg.eval_batch_size)
        coarse, coarse_history = dense.fit_coarse_correction(ctx, models, subsets, gathered, dec, self._bottleneck,
                                                             cfg)
        step = dense.CoarseStep(ctx, models, coarse, dec.num_subdomains, self._bottleneck, gathered)
        two_val = dense.dense_scores(ctx, dense.exchanged_predictions(ctx, step, subsets, "val", cfg), subsets, "val",
                                     cfg)
        self._models = {"local-only": (models, None), "two-level": (models, coarse)}
        self.scores_ = self._from_root({"local-only": {"val": local_val}, "two-level": {"val": two_val}})
        all_histories = self._allgathered(histories)
        self.history_ = {**{f"local_{i}": all_histories[i] for i in sorted(all_histories)},
                         "coarse": self._from_root(coarse_history)}
        return self

    def fit_coherent(self, x, t=None, x_val=None, t_val=None, *, init="pretrained"):
        """Train local U-Nets and the coarse network as one model, end to end (both exchanges in
        autograd): from the fitted two-level model (init "pretrained", transfer learning at
        transfer_lr; call fit first) or from random weights (init "random", coherent_lr), for
        coherent_epochs. Collective. Returns self."""
        if init not in ("random", "pretrained"):
            raise ValueError(f"init must be random or pretrained, not {init!r}")
        if init == "pretrained" and "two-level" not in self._models:
            raise ValueError("fit_coherent(init='pretrained') starts from the two-level model: call fit first")
        ctx, dec, subsets = self._prepare(x, t, x_val, t_val)
        models, coarse = self._models.get("two-level", (None, None))
        local, net = dense.coherent_start(ctx, init, dec, self.image_shape_[0], self._out, self.width_factor_,
                                          self._cfg, self._bottleneck, models, coarse)
        name = f"coherent-{init}"
        history = dense.fit_coherent_dense(ctx, local, net, subsets, dec, self._bottleneck, self._cfg,
                                           options.dense_coherent_options(self, init), name)
        step = dense.CoarseStep(ctx, local, net, dec.num_subdomains, self._bottleneck, coherent=True)
        val = dense.dense_scores(ctx, dense.exchanged_predictions(ctx, step, subsets, "val", self._cfg), subsets,
                                 "val", self._cfg)
        self._models[name] = (local, net)
        self.scores_ = {**getattr(self, "scores_", {}), name: self._from_root({"val": val})}
        self.history_ = {**getattr(self, "history_", {}), name: self._from_root(history)}
        return self

    # --- predict ---------------------------------------------------------------------------------

    def _outputs(self, x, model) -> np.ndarray:
        """Collective: the stitched outputs (n, C_out, *spatial) float32 of `model` on every rank."""
        if model not in self._models:
            fitted = ", ".join(self._models) or "none (call fit first)"
            raise ValueError(f"model {model!r} is not fitted ({', '.join(MODELS)}): fitted are {fitted}")
        ctx, dec, cfg = self._ctx, self._dec, self.config()  # (eval_batch_size as set now)
        boxes, n = self._agreed(lambda: self._read(x, False, "test", dec, ctx.mine))
        subsets = {i: {"x": (images, None)} for i, (images, _) in boxes.items()}
        models, coarse = self._models[model]
        if model == "local-only":
            mine = dense.local_predictions(models, subsets, "x", cfg)
        else:
            coherent = model.startswith("coherent")
            gathered = None if coherent else dense.gather_bottlenecks(ctx, models, subsets, dec.num_subdomains,
                                                                      splits=("x",), batch_size=cfg.eval_batch_size)
            step = dense.CoarseStep(ctx, models, coarse, dec.num_subdomains, self._bottleneck, gathered,
                                    coherent=coherent)
            mine = dense.exchanged_predictions(ctx, step, subsets, "x", cfg)
        whole = np.zeros((n, self._out) + dec.shape, np.float32)
        for part in parallel.allgather(ctx.comm, {i: o.numpy() for i, o in mine.items()}):
            for i, o in part.items():
                whole[(slice(None), slice(None)) + dec.tile_slices(i)] = o
        return whole

    def predict(self, x, model="two-level") -> np.ndarray:
        """Collective: fields (n, C_out, *spatial) float32 (regress) or masks (n, *spatial) int64
        (segment) of whole images, on every rank. x: images as in fit, or a data file (its test split)."""
        out = self._outputs(x, model)
        return out if self.task == "regress" else out.argmax(1)

    def available_models(self) -> list:
        """The fitted models, in MODELS' order."""
        return [m for m in MODELS if m in self._models]

    def read_targets(self, x, t=None) -> np.ndarray:
        """t, or a data file's targets of the split x names (test by default)."""
        if not isinstance(x, str):
            return np.asarray(t)
        path, _, split = x.partition(":")
        return data.load_targets(path, split or "test", tuple(slice(0, n) for n in self._dec.shape))[0]

    def scores(self, x, t=None, model="two-level") -> dict:
        """Collective: regress: mae, mse, rel_l2, ssim (data range: the targets' max - min);
        segment: per-class iou and dice, miou, mean_dice, pixel_acc. t: the targets of x (a data
        file's are read when x is one)."""
        return self.score_predictions(self.predict(x, model), self.read_targets(x, t))

    def score_predictions(self, pred, t) -> dict:
        """The scores of predictions `pred` (predict's) against targets t (not collective)."""
        if self.task == "regress":
            out = regression_scores(regression_sums(pred, t))
            out["ssim"] = float(ssim(pred, t, float(t.max() - t.min())).mean())
            return out
        return segmentation_scores(segmentation_sums(pred, t, self.num_classes_))

    def score(self, x, t=None, model="two-level") -> float:
        """Collective; higher is better (scikit-learn's rule): regress: R^2 = 1 - MSE / the
        targets' variance; segment: mean IoU."""
        t = self.read_targets(x, t)
        s = self.score_predictions(self.predict(x, model), t)
        return s["miou"] if self.task == "segment" else 1.0 - s["mse"] / float(np.var(t))

    # --- save and load ---------------------------------------------------------------------------

    def save(self, path) -> str:
        """Write every fitted model (each subdomain's U-Net, rank 0's coarse networks) and what
        rebuilds them to one file, atomically, from rank 0. Collective. Returns the path."""
        if not self._models:
            raise ValueError("nothing to save: call fit first")
        state = gathered_state(self._comm, self._models, {
            "hyperparameters": self.hyperparameters(), "image_shape": list(self.image_shape_),
            "out_channels": self._out, "width_factor": self.width_factor_, "grid": list(self._dec.grid),
            "scores": self.scores_, "history": self.history_})
        return self._write_on_root(path, lambda: (state,), write_state)

    @classmethod
    def load(cls, path, comm=None, threads=None, verbose=False) -> "TwoLevelUNet":
        """A saved TwoLevelUNet on `comm`, any rank count up to its N subdomains. Collective;
        every rank reads the file. saved.ModelFileError (one line) for a missing, corrupt or
        foreign file."""
        error = state = None
        path = os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path  # a run directory
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                error = f"{path} is not a TwoLevelUNet model file"
            elif state.get("format_version") != FORMAT_VERSION:
                error = f"{path} has format version {state.get('format_version')}, this mpidd reads {FORMAT_VERSION}"
        except FileNotFoundError:
            error = f"no saved model at {path}"
        except Exception as e:  # truncated or foreign file: torch raises pickle, zip or EOF errors
            error = f"cannot read {path}: {type(e).__name__} (corrupt, or not a model file)"
        agree_on_file(comm if comm is not None else parallel.shared_world(), error)
        params = dict(state["hyperparameters"], grid="x".join(map(str, state["grid"])),
                      width_factor=state["width_factor"])
        net = cls(**params, comm=comm, threads=threads, verbose=verbose)
        image_shape, out = tuple(state["image_shape"]), state["out_channels"]
        net.image_shape_, net.width_factor_ = image_shape, state["width_factor"]
        net.num_classes_ = out if net.task == "segment" else None
        if net.task == "regress":
            net.out_channels_ = out
        net._dec = dec = net._agreed(lambda: net.decomposition(image_shape))
        net.n_subdomains_ = dec.num_subdomains
        net._cfg, net._out = net.config(), out
        net._bottleneck = build_unet(image_shape[0], out, dec.subimage_shape, net._cfg.unet,
                                     net.width_factor_).bottleneck_shape
        mine = subdomains_of_rank(net._comm.Get_rank(), net._comm.Get_size(), dec.num_subdomains)
        net._ctx = net._context_of(mine)
        net._ctx.stops.wait_interval = 1e-4 if parallel.oversubscribed(net._comm, torch.get_num_threads()) else None
        for name, part in state["models"].items():
            models = {}
            for i in mine:
                models[i] = dense.local_unet(image_shape[0], out, dec, i, net._cfg.unet, net.width_factor_)
                models[i].load_state_dict(part["local"][i])
                # the saved weights' memory layout (channels-last where they trained so) picks the
                # convolution kernels: the same layout computes the same numbers
                if any(w.dim() in (4, 5) and not w.is_contiguous() for w in part["local"][i].values()):
                    to_channels_last(models[i], len(image_shape) + 1)
            coarse = None
            if part["coarse"] is not None and net._ctx.master_process:
                coarse = dense.coarse_network(dec, net._bottleneck, net._cfg)
                coarse.load_state_dict(part["coarse"])
            net._models[name] = (models, coarse)
        net.scores_, net.history_ = state["scores"], state["history"]
        return net


def gathered_state(comm, fitted: dict, header: dict) -> dict | None:
    """Collective: on rank 0 a model file's contents, `header` (hyperparameters, image_shape,
    out_channels, width_factor, grid, scores, history) and every model of `fitted` ({name:
    ({subdomain: U-Net}, rank 0's coarse network or None)}) with every rank's U-Nets; None elsewhere."""
    mine = {name: {i: saved.cpu_state(m) for i, m in models.items()} for name, (models, _) in fitted.items()}
    parts = parallel.gather_to_root(comm, mine)
    if comm.Get_rank() != 0:
        return None
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **header,
            "models": {name: {"local": {i: w for part in parts for i, w in part[name].items()},
                              "coarse": saved.cpu_state(coarse)} for name, (_, coarse) in fitted.items()}}


def write_state(path, state) -> str:
    """Write a model file's contents atomically; returns its path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    rundir.atomic_write(str(path), lambda f: torch.save(state, f))
    return str(path)
