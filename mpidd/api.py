"""The Python API: the two-level CNN-DNN as an estimator on a communicator.

    mpirun -n 4 python my_script.py

    import mpidd
    clf = mpidd.TwoLevelClassifier(grid="2x2", epochs=3, comm=comm)   # comm=None: a shared Dup of COMM_WORLD;
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
Labels y are (n,) values of any kind numpy sorts (integers, strings), the same on every rank:
classes_ holds the distinct values of y and y_val, sorted (or 0..num_classes-1 if num_classes
is given), and predict returns values of classes_. uint8 images are divided by 255,
float images are used as they are (as float32). normalization=(mean, std), one number per
channel in those units (e.g. mpidd.read_info(FILE).mean and .std, the statistics data_prep
writes into a data file), makes every model normalise its input, (x - mean) / std, as the
command line does; the default None leaves the input as it is.

Ranks: P <= N subdomains (rank r trains r, r+P, ...) or P a multiple of N (P/N ranks train
each local CNN data parallel, each on its share of the samples). Nothing here touches
COMM_WORLD unless comm=None asks for the process's one duplicate of it (made at the first
collective call, shared by every estimator), installs a signal handler or excepthook, or
sets torch's threads unless `threads` is given. The constructor is not collective.

scikit-learn's conventions hold: get_params, set_params, a repr, sklearn.base.clone (the clone
runs on the same comm), so GridSearchCV and Pipeline take these estimators; under mpirun every
rank runs the same search (the same splits and fits, collective). close(), or a `with` block,
frees the communicators an estimator split off a given comm (P > N).
"""

from __future__ import annotations


import numpy as np
import torch

from . import __version__, options, parallel, saved
from .decomposition import Decomposition, DecompositionError, choose_grid, layout, parse_grid
from .engine import Shard, evaluate, precision_error
from .estimator import CollectiveEstimator, agree_on_file
from .inputs import dtype_name, encode_labels, from_file, from_torch, label_classes, normalization_pair, pixels  # noqa: F401 (from_file, normalization_pair: names of api)
from .methods import coherent, twolevel, width
from .models import COARSE_INPUTS
from .online_estimator import OnlineSubdomainEstimator
from .recomposition import WidthError, subnet_config as width_subnet_config
from .saved import COMBINERS, MODELS, WHOLE_IMAGE  # noqa: F401 (WHOLE_IMAGE: a name of api)
from .sklearn_conventions import hyperparameters
from .stream import check_finite, is_stream


class TwoLevelClassifier(OnlineSubdomainEstimator):
    """The two-level CNN-DNN of Klawonn, Lanser & Weber: one local CNN per subimage, trained
    without communication, and a coarse DNN on rank 0 of `comm` that combines their class
    probabilities (gathered with MPI_Gatherv).

    Every keyword is the command line's option of the same name (mpidd.train --help), with the
    same default; `coarse_hidden` is a tuple. API-only: `validation_fraction` (the share of the
    training set held out for validation when fit gets no x_val), `buffer_size` (partial_fit's
    replay buffer: at most this many samples kept), `partial_epochs` (partial_fit's passes over
    the new samples and the buffer in each call), `num_classes` (labels
    0..num_classes-1; default: the distinct labels of y and y_val), `class_names`, `comm` (None:
    the process's shared duplicate of MPI_COMM_WORLD), `device` (None: this rank's GPU, node-local rank
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
                 buffer_size=2048, partial_epochs=1, num_classes=None, class_names=None, normalization=None,
                 precision="32", comm=None, device=None, threads=None, verbose=False):
        for k, v in locals().items():  # as given (scikit-learn's rule): options makes the typed configs
            if k in self.HYPERPARAMETERS:
                setattr(self, k, v)
        self._setup(comm, device, threads, verbose)  # self._models: kind -> {"local": {i: module}, "dnn": ...}

    HYPERPARAMETERS = hyperparameters(__init__)  # every keyword above but comm, device, threads, verbose

    # --- configuration ------------------------------------------------------------------------

    def config(self) -> twolevel.TwoLevelConfig:
        """The typed configuration the method runs with (mpidd.options, as the command line's)."""
        return options.twolevel_config(self)

    def decomposition(self, image_shape) -> Decomposition:
        """The subdomain boxes over images of shape (C, H, W) or (C, D, H, W); grid "auto" is
        decomposition.choose_grid of comm's size, as on the command line."""
        try:
            if self.grid == "auto":
                grid = choose_grid(self._comm.Get_size(), tuple(image_shape)[1:])[0]
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
        gathered = twolevel.gather_to_coarse(ctx, probs, subsets, N, K, {s: len(labels[s]) for s in ("train", "val")})
        if not ctx.master_process:  # rank 0's own part never leaves it
            self._bytes.count("probabilities", sum(p.nbytes for per in probs.values() for p in per.values()))
        dnn = scores = coarse_history = None
        if ctx.master_process:
            dnn, coarse_history = twolevel.fit_coarse(ctx, gathered, labels, N, K, cfg)
            scores = twolevel.accuracies(dnn, gathered, labels, N, K, splits=("val",))
        scores, coarse_history = self._from_root((scores, coarse_history))
        all_histories = self._allgathered(dict(histories) if ctx.leader else {})
        self._models = {"twolevel": saved.combined_part(models, dnn, "probabilities")}
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
        cfg = options.coherent_config(self, init)
        start = None
        if init == "pretrained":
            two = self._models["twolevel"]
            start = {"local": two["local"], "dnn": two["dnn"] if self.dnn_init == "coarse" else None}
        local, dnn = coherent.initial_models(ctx, dec, C, K, self.width_factor_, self.config().cnn, cfg, start)
        comm = self._comm
        exchange = parallel.ModelParallelExchange(
            comm, ctx.mine, N, K, poll_interval=1e-4 if parallel.oversubscribed(comm, torch.get_num_threads())
            else None, member=(ctx.group.rank, ctx.group.size) if ctx.group is not None else None)
        name = f"coherent_{init}"
        history, _, timing = coherent.fit_coherent(ctx, name, local, dnn, subsets, labels, cfg, exchange)
        self._bytes.count("exchange", exchange.bytes)
        self._models[name] = saved.combined_part(local, dnn, self.exchange)
        history = self._from_root(history)
        self.history_ = {**getattr(self, "history_", {}), name: history}
        self.scores_ = {**getattr(self, "scores_", {}), name: {"val": history[-1]["val_acc"]}}
        self.coherent_timing_ = {**getattr(self, "coherent_timing_", {}), name: timing}
        return self

    # --- inference -----------------------------------------------------------------------------

    def predict_proba(self, x, model="cnn-dnn", *, image_shape=None) -> np.ndarray:
        """Class probabilities (n, K) float32, the same array on every rank. Collective over comm.

        model: cnn-dnn (the coarse DNN), average (mean of the local probabilities), vote
        (fractions of the N local votes), coherent, global or recomposed (where a loaded run
        or file has them)."""
        return self._predict(x, model, image_shape)[0]

    def predict(self, x, model="cnn-dnn", *, image_shape=None) -> np.ndarray:
        """Predicted labels (n,), values of classes_, the same on every rank. Collective over comm."""
        return self.classes_[self._predict(x, model, image_shape)[1]]

    def predict_proba_and_classes(self, x, model="cnn-dnn", *, image_shape=None) -> tuple:
        """(predict_proba, predict) in one pass. Collective over comm."""
        probs, classes = self._predict(x, model, image_shape)
        return probs, self.classes_[classes]

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
        y = encode_labels(np.asarray(y), self.classes_, strict=False)  # a label not in classes_: -1, never right
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

    def available_models(self) -> list:
        """The `model` values predict accepts for this classifier."""
        return [m for m in MODELS if self._part(m) in self._models]

    # --- save and load (the model file: mpidd.saved) --------------------------------------------

    def manifest(self) -> dict:
        """What the model file says of this classifier's models (saved.manifest)."""
        return saved.manifest(image_shape=self.image_shape_, input_dtype=self.input_dtype_, grid=self._dec.grid,
                              overlap=self._dec.overlap, num_classes=len(self.classes_), classes=self.class_names_,
                              cnn=self.config().cnn, width_factor=self.width_factor_, coarse_hidden=self.coarse_hidden,
                              coarse_dropout=self.coarse_dropout, labels=self.classes_,
                              hyperparameters=saved.recorded(self.hyperparameters()))

    def save(self, path) -> str:
        """Write the whole model (every local CNN, the coarse DNN, the decomposition and what is
        needed to rebuild them) to one file, atomically, from rank 0. Collective over comm.
        Returns the file's path on every rank."""
        self._fitted()
        models = self._weights_on_root()
        state = self._online_on_root()
        return self._write_on_root(path, lambda: ({**self.manifest(), **state}, models))

    @classmethod
    def load(cls, path, comm=None, device=None, threads=None, verbose=False, precision=None) -> "TwoLevelClassifier":
        """A saved model (save's file, or a finished mpidd.train run directory) on `comm`, any
        rank count that training allows (1..N, or a multiple of N). Collective over comm; every
        rank reads the file. Raises saved.ModelFileError (one line) for a missing, corrupt,
        foreign or incompatible file. precision None: the one it was trained in where this
        rank's device supports it, else "32" (the saved weights are float32 either way)."""
        error, state = None, None
        try:
            state = saved.load_model(path)
        except saved.ModelFileError as e:
            error = str(e)
        agree_on_file(comm if comm is not None else parallel.shared_world(), error)
        clf = cls(**saved.estimator_keywords(state, cls.HYPERPARAMETERS), comm=comm, device=device, threads=threads,
                  verbose=verbose)
        if precision is not None:
            clf.precision = precision
        elif precision_error(clf.precision, clf._torch_device()) is not None:
            clf.precision = "32"
        clf._restore(state, str(path))
        return clf


class WidthClassifier(CollectiveEstimator):
    """Width decomposition (Gu, Zhang, Liu & Cai, ETNA 56, 2022): the global CNN split along its
    channels into `subnets` thin sub-networks (width / subnets channels, the same depth), each
    trained on whole images by its rank (rank r: r, r+P, ...; no communication), gathered to
    rank 0 of comm, recomposed (block-diagonal weights) and trained further there for `epochs`
    at `transfer_lr`. The command line's --mode width, from Python; keywords as there.

    x: whole images (n, C, H, W) or (n, C, D, H, W) on every rank, y: (n,) labels. After fit,
    on every rank: classes_, image_shape_, subnet_scores_ ({m: {"val": acc}}),
    initial_score_ (the recomposed network's val accuracy before further training), scores_,
    history_ ({"subnet_m": [...], "recomposed": [...]})."""

    def __init__(self, subnets=4, *, arch="vgg", width=48, depth=2, convs_per_block=2, blocks_per_stage=2,
                 dense_layers=(6, 12, 24, 16), hidden=128, head_pool=3, dropout=0.0, batchnorm=True, epochs=3,
                 batch_size=128, lr=2e-3, optimizer="adam", momentum=0.9, weight_decay=0.0, schedule="cosine",
                 eval_batch_size=256, subnet_epochs=6, shard=False, offdiag_noise=0.0, transfer_lr=5e-4, seed=0,
                 validation_fraction=0.1, num_classes=None, class_names=None, normalization=None, precision="32",
                 comm=None, device=None, threads=None, verbose=False):
        for k, v in locals().items():  # as given (scikit-learn's rule)
            if k in self.HYPERPARAMETERS:
                setattr(self, k, v)
        self._setup(comm, device, threads, verbose)

    HYPERPARAMETERS = hyperparameters(__init__)  # every keyword above but comm, device, threads, verbose

    def config(self) -> width.WidthConfig:
        """The typed configuration the method runs with (mpidd.options, as the command line's)."""
        return options.width_config(self)

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
            mine = layout(self._comm.Get_rank(), self._comm.Get_size(), self.subnets)[0]
        except (WidthError, DecompositionError) as e:
            raise ValueError(str(e).replace("subdomains", "sub-networks")) from None
        if self._comm.Get_size() > self.subnets:
            raise ValueError(f"{self._comm.Get_size()} ranks but only {self.subnets} sub-networks: use at most "
                             f"{self.subnets} ranks or more sub-networks")
        ctx = self._context_of(mine)
        C, shape = image_shape[0], image_shape[1:]
        if is_stream(x) or is_stream(x_val):  # every rank trains on whole images: each checks them
            self._agreed(lambda: [check_finite(a) for a in (x, x_val) if is_stream(a)])
        whole = {"train": Shard(pixels(x), y.astype(np.int64)), "val": Shard(pixels(x_val), y_val.astype(np.int64))}
        states, scores, histories = width.fit_subnets(ctx, whole, C, K, shape, cfg, score_splits=("val",))
        if not ctx.master_process:
            self._bytes.count("parameters", sum(t.nbytes for st in states.values() for t in st.values()))
        states, scores = width.gather_subnets(ctx, states, scores)
        result = model = None
        if ctx.master_process:
            model = width.recompose(ctx, states, C, K, shape, cfg)
            initial = evaluate(model, whole["val"].x, whole["val"].y, self.eval_batch_size, precision=ctx.precision)[1]
            history = width.fit_recomposed(ctx, model, whole, cfg)
            result = ({m: {"val": scores[m]["val"][1]} for m in sorted(scores)}, initial, history)
        subnet_scores, initial, history = self._from_root(result)
        all_histories = self._allgathered(dict(histories))
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
        """Predicted labels (n,), values of classes_, on every rank. Collective."""
        return self.classes_[self._predict(x)[1]]

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
        return self._whole_image_predictions(self._models["recomposed"], x)

    def save(self, path) -> str:
        """The recomposed network as an mpidd model file (its "recomposed" part: python -m
        mpidd.predict FILE --model recomposed classifies with it), written by rank 0. Collective;
        the path on every rank."""
        self._fitted()
        manifest = saved.width_manifest(image_shape=self.image_shape_, input_dtype=self.input_dtype_,
                                        num_classes=len(self.classes_), classes=self.class_names_,
                                        cnn=self.config().cnn, hyperparameters=self.hyperparameters(),
                                        labels=self.classes_)
        return self._write_on_root(path, lambda: (
            manifest, {"recomposed": saved.whole_part(saved.cpu_state(self._models["recomposed"]))}))


__all__ = ["TwoLevelClassifier", "WidthClassifier", "COMBINERS", "MODELS", "__version__"]
