"""partial_fit of TwoLevelClassifier (online training, mpidd.methods.online) and its state in
the model file: OnlineSubdomainEstimator, the base that TwoLevelClassifier adds it with."""

from __future__ import annotations

import os

import numpy as np
import torch

from . import combine, parallel, saved
from .engine import make_optimizer
from .estimator import SubdomainEstimator
from .inputs import dtype_name, encode_labels, from_torch, label_classes
from .methods import online, twolevel
from .models import local_width_factor
from .stream import is_stream


class OnlineSubdomainEstimator(SubdomainEstimator):
    """SubdomainEstimator with partial_fit: the replay buffer and optimizers kept between calls
    (self._online, a methods.online.OnlineState), saved with the model and restored by load."""

    def partial_fit(self, x, y, classes=None, *, image_shape=None):
        """Online training (scikit-learn's partial_fit; not fit with warm_start, which would
        train again on the same samples: a solver hands over new samples call after call and
        never again). Each call trains every local CNN `partial_epochs` passes (default 1) over the
        new samples and the replay buffer, then the coarse DNN `coarse_epochs` passes over their
        gathered probabilities (it is small: each call fits it to the local CNNs as they are), with
        optimizers kept between calls and the learning-rate schedule over each call's steps; then the new
        samples enter the buffer, which stays a uniform sample of every sample seen (reservoir
        sampling), at most `buffer_size`. Collective over comm. Returns self.

        x: whole images on every rank, or this rank's subimages {subdomain: array} with
        `image_shape` (arrays, not a data file); y: (n,) labels on every rank. The first call
        needs `classes` (every label value that will come), unless fit or load came first (it
        then continues from their models). save writes the online state too (buffer and
        optimizers), so that load and partial_fit continue exactly where the run was.
        P <= N ranks (no data-parallel groups). After each call: n_samples_seen_,
        history_["online"] (one record per call: samples trained on, coarse loss and accuracy
        of the pass, each local CNN's accuracy)."""
        x, y = from_torch(x), from_torch(y)
        if isinstance(x, (str, os.PathLike)) or is_stream(x) or (isinstance(x, dict) and any(
                is_stream(v) for v in x.values())):
            raise ValueError("partial_fit takes the new samples as arrays (whole images or this rank's subimages)")
        if getattr(self, "_online", None) is None:
            self._start_online(x, classes, image_shape)
        ctx, dec, N, K = self._ctx, self._dec, self.n_subdomains_, len(self.classes_)
        y = self._agreed(lambda: encode_labels(np.asarray(y), self.classes_))
        n = self._check_shape(x, image_shape)
        if len(y) != n:
            raise ValueError(f"labels for x have shape {y.shape}, expected ({n},)")
        new = {i: s.x for i, s in self._shards(ctx, dec, x, y).items()}
        two = self._models["twolevel"]
        record = online.partial_fit(ctx, self._online, new, y, two["local"], two["dnn"], N, K, self.config(),
                                    self.buffer_size, self.partial_epochs)
        record = self._from_root(record)
        history = getattr(self, "history_", {})
        self.history_ = {**history, "online": history.get("online", []) + [record]}
        self.n_samples_seen_ = self._online.seen
        return self

    def _start_online(self, x, classes, image_shape):
        """partial_fit's first call: the fitted or loaded models, or new ones for `classes`."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if self._models:
            if "twolevel" not in self._models:
                raise ValueError("partial_fit continues a two-level model: this one has none")
        else:
            if classes is None:
                raise ValueError("the first partial_fit needs classes=, every label value that will come "
                                 "(as in scikit-learn)")
            self.classes_ = self._agreed(lambda: label_classes([np.asarray(classes)], self.num_classes))
            self.class_names_ = self._agreed(self._class_names)
            shape, _ = self._check(x, None, image_shape, "x")
            self.image_shape_, self.input_dtype_ = tuple(int(s) for s in shape), dtype_name(x)
            dec = self.decomposition(self.image_shape_)
            self._refuse_groups(dec)
            ctx = self._context(dec)
            N, K, C, cnn = dec.num_subdomains, len(self.classes_), self.image_shape_[0], self.config().cnn
            wf = self.width_factor or local_width_factor(C, K, self.image_shape_[1:], dec.subimage_shape, N, cnn)
            local = {i: twolevel.initial_local_model(ctx, i, C, K, dec, cnn, wf, self.seed) for i in ctx.mine}
            dnn = combine.initial_coarse_dnn(N * K, K, tuple(self.coarse_hidden), self.coarse_dropout,
                                             self.seed) if ctx.master_process else None
            self._models = {"twolevel": saved.combined_part(local, dnn, "probabilities")}
            self._ctx, self._dec, self.n_subdomains_, self.width_factor_ = ctx, dec, N, wf
        self._refuse_groups(self._dec)
        self._online = online.OnlineState()

    def _refuse_groups(self, dec):
        if self._layout(dec)[1] > 1:
            raise ValueError(f"partial_fit runs on at most as many ranks as subdomains ({dec.num_subdomains}), "
                             f"not {self._comm.Get_size()}")

    def _online_on_root(self) -> dict:
        """partial_fit's state for the model file, {"online": ...} on rank 0 ({} elsewhere, or
        before any partial_fit): counters, the buffer's labels, and per subdomain the buffer's
        subimages and the optimizer (gathered from every rank), the coarse DNN's optimizer. Collective."""
        st = getattr(self, "_online", None)
        if st is None:
            return {}
        mine = {i: {"buffer": torch.from_numpy(np.ascontiguousarray(st.buffers[i])) if i in st.buffers else None,
                    "optimizer": st.optimizers[i].state_dict() if i in st.optimizers else None}
                for i in self._ctx.mine}
        parts = parallel.gather_to_root(self._comm, mine)
        if not self._ctx.master_process:
            return {}
        local = {i: part for p in parts for i, part in p.items()}
        return {"online": {"calls": st.calls, "seen": st.seen, "labels": torch.from_numpy(st.labels),
                           "local": dict(sorted(local.items())), "coarse_optimizer":
                           st.coarse_optimizer.state_dict() if st.coarse_optimizer is not None else None}}

    def _restore_online(self, saved_state):
        """partial_fit's state of this rank from a model file's "online" entry."""
        two, cfg = self._models["twolevel"], self.config()
        st = online.OnlineState(calls=int(saved_state["calls"]), seen=int(saved_state["seen"]),
                                labels=saved_state["labels"].numpy().astype(np.int64))
        for i in self._ctx.mine:
            part = saved_state["local"][i]
            if part["buffer"] is not None:
                st.buffers[i] = part["buffer"].numpy()
            if part["optimizer"] is not None:
                st.optimizers[i] = make_optimizer(two["local"][i], online.one_call(cfg.local))
                st.optimizers[i].load_state_dict(part["optimizer"])
        if self._ctx.master_process and saved_state["coarse_optimizer"] is not None:
            st.coarse_optimizer = make_optimizer(two["dnn"], online.one_call(cfg.coarse, cfg.coarse.epochs))
            st.coarse_optimizer.load_state_dict(saved_state["coarse_optimizer"])
        self._online, self.n_samples_seen_ = st, st.seen

    def _restore(self, state, path):
        super()._restore(state, path)
        if "online" in state:
            self._restore_online(state["online"])
