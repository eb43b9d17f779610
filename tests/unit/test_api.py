"""The Python API on one process (COMM_SELF-sized worlds): fit/predict/save/load, input forms,
defaults shared with the command line, refusals. MPI behaviour is in test_mpi.py and test_e2e.py."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

SMALL = dict(epochs=2, batch_size=32, width=8, hidden=16, coarse_epochs=3, coarse_batch_size=32, threads=1)


def problem(n=160, size=16, K=3, seed=0, noise=0.6):
    """Class k = template k + noise; hard enough that no model is perfect after 2 epochs."""
    rng = np.random.default_rng(seed)
    templates = rng.random((K, 1, size, size))
    y = rng.integers(0, K, n)
    x = ((1 - noise) * templates[y] + noise * rng.random((n, 1, size, size))) * 255
    return x.astype(np.uint8), y


@pytest.fixture(scope="module")
def data():
    x, y = problem(224)
    return {"train": (x[:160], y[:160]), "val": (x[160:192], y[160:192]), "test": (x[192:], y[192:])}


@pytest.fixture(scope="module")
def fitted(data):
    import mpidd
    from mpi4py import MPI
    clf = mpidd.TwoLevelClassifier("2x2", comm=MPI.COMM_SELF, **SMALL)
    return clf.fit(*data["train"], *data["val"])


def test_import_mpidd_loads_no_torch_mpi_or_handlers():
    code = ("import signal, sys\n"
            "before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}\n"
            "import mpidd\n"
            "assert 'torch' not in sys.modules and 'mpi4py' not in sys.modules, sorted(sys.modules)\n"
            "assert mpidd.TwoLevelClassifier.__name__ == 'TwoLevelClassifier'\n"
            "assert 'mpidd.train' not in sys.modules and 'mpidd.cli' not in sys.modules\n"
            "assert sys.excepthook is sys.__excepthook__\n"
            "assert before == {s: signal.getsignal(s) for s in before}\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_every_keyword_has_the_command_lines_default():
    import inspect

    import mpidd
    from mpidd.cli.arguments import get_args_parser, hidden_sizes
    from mpidd.options import COARSE_WEIGHT_DECAY, TRANSFER_LR
    from mpidd.sklearn_conventions import RUNTIME
    cli = vars(get_args_parser().parse_args([]))
    for estimator, least in ((mpidd.TwoLevelClassifier, 30), (mpidd.WidthClassifier, 20)):
        params = inspect.signature(estimator).parameters
        shared = [k for k in params if k in cli and k not in ("device", "threads")]  # API: None leaves them alone
        assert len(shared) >= least
        for k in shared:
            expected = hidden_sizes(cli[k]) if k in ("coarse_hidden", "dense_layers") else cli[k]
            if k in ("coarse_weight_decay", "transfer_lr"):  # the command line's is the task's (classify here)
                expected = {"coarse_weight_decay": COARSE_WEIGHT_DECAY, "transfer_lr": TRANSFER_LR}[k]["classify"]
            assert params[k].default == expected, (estimator, k)
        # the hyperparameters are the signature's keywords (in order: get_params, the model file) but RUNTIME's
        assert estimator.HYPERPARAMETERS == tuple(k for k in params if k not in RUNTIME)
        assert set(RUNTIME) <= set(params)
    params = inspect.signature(mpidd.TwoLevelClassifier).parameters
    # every option that shapes the two-level model or its training is a keyword
    for k in ("grid", "overlap", "arch", "width", "depth", "width_factor", "epochs", "lr", "coarse_epochs",
              "coarse_lr", "coarse_hidden", "eval_batch_size", "seed", "batch_size", "schedule"):
        assert k in params


def test_fit_predict_score_and_attributes(fitted, data):
    x, y = data["test"]
    before = fitted.bytes_sent_["probabilities"]
    p = fitted.predict_proba(x)
    assert fitted.bytes_sent_["probabilities"] == before == 0  # one rank: its probabilities never leave it
    assert p.shape == (32, 3) and p.dtype == np.float32 and np.allclose(p.sum(1), 1, atol=1e-5)
    assert np.array_equal(fitted.predict(x), p.argmax(1))
    assert fitted.score(x, y) == pytest.approx(float((p.argmax(1) == y).mean()))
    avg = fitted.predict_proba(x, "average")
    assert np.allclose(avg.sum(1), 1, atol=1e-5) and not np.array_equal(avg, p)
    votes = fitted.predict_proba(x, "vote")
    assert set(np.unique(votes * 4).round(4)) <= {0, 1, 2, 3, 4}  # fractions of the 4 local votes
    assert list(fitted.classes_) == [0, 1, 2] and fitted.n_subdomains_ == 4
    assert sorted(fitted.history_) == ["coarse", "local_0", "local_1", "local_2", "local_3"]
    # coarse: 160 samples at batch 32 are 5 steps an epoch, so the 2,000-step budget gives 400 epochs
    assert len(fitted.history_["local_2"]) == 2 and len(fitted.history_["coarse"]) == 400
    assert set(fitted.local_scores_) == {0, 1, 2, 3}
    assert fitted.available_models() == ["cnn-dnn", "average", "vote"]
    sent = fitted.bytes_sent_
    assert sent["parameters"] == sent["gradients"] == sent["results"] == 0  # one rank: nothing else crosses
    every = fitted.score_all(x, y)
    assert every["cnn-dnn"] == fitted.score(x, y) and every["vote"] == fitted.score(x, y, "vote")
    assert sorted(every["local"]) == [0, 1, 2, 3] and every["average"] == fitted.score(x, y, "average")
    with pytest.raises(ValueError, match="no 'global' part"):
        fitted.predict(x, "global")


def test_whole_images_and_local_subimages_give_the_same_model(fitted, data):
    """Form (b): this rank's subimages keyed by subdomain (here every subdomain, one rank)."""
    import mpidd
    from mpi4py import MPI
    boxes_clf = mpidd.TwoLevelClassifier("2x2", comm=MPI.COMM_SELF, **SMALL)
    shape = data["train"][0].shape[1:]
    boxes = boxes_clf.local_boxes(shape)
    assert sorted(boxes) == [0, 1, 2, 3] and boxes[3] == (slice(8, 16), slice(8, 16))

    def parts(x):
        return {i: x[(slice(None), slice(None)) + b] for i, b in boxes.items()}
    boxes_clf.fit(parts(data["train"][0]), data["train"][1], parts(data["val"][0]), data["val"][1], image_shape=shape)
    x = data["test"][0]
    assert np.array_equal(boxes_clf.predict_proba(parts(x), image_shape=shape), fitted.predict_proba(x))
    scores = ("epoch", "loss", "acc", "val_loss", "val_acc")
    for name, history in fitted.history_.items():
        assert [[r[k] for k in scores] for r in boxes_clf.history_[name]] == [[r[k] for k in scores] for r in history]


def test_save_and_load_round_trip(fitted, data, tmp_path):
    import torch

    import mpidd
    from mpi4py import MPI
    path = fitted.save(str(tmp_path / "m.pt"))
    assert os.path.exists(path) and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    state = torch.load(path, weights_only=True)
    assert state["format"] == "mpidd-model" and state["grid"] == [2, 2] and state["image_shape"] == [1, 16, 16]
    assert state["mpidd_version"] == mpidd.__version__ and state["input_dtype"] == "uint8"
    assert sorted(state["models"]["twolevel"]["local"]) == [0, 1, 2, 3] and state["cnn"]["width"] == 8
    loaded = mpidd.TwoLevelClassifier.load(path, comm=MPI.COMM_SELF)
    x = data["test"][0]
    for model in ("cnn-dnn", "average", "vote"):
        assert np.array_equal(loaded.predict_proba(x, model), fitted.predict_proba(x, model))
    assert loaded.get_params()["epochs"] == 2 and loaded.class_names_ == ["0", "1", "2"]


def test_load_refuses_missing_corrupt_and_foreign_files(fitted, tmp_path):
    import torch

    import mpidd
    from mpi4py import MPI
    path = fitted.save(str(tmp_path / "m.pt"))
    cases = {"missing": str(tmp_path / "nothing.pt"), "dir": str(tmp_path / "run")}
    os.makedirs(cases["dir"])
    with open(path, "rb") as f:
        blob = f.read()
    cases["truncated"] = str(tmp_path / "t.pt")
    with open(cases["truncated"], "wb") as f:
        f.write(blob[: len(blob) // 2])
    cases["foreign"] = str(tmp_path / "f.pt")
    torch.save({"model": {}}, cases["foreign"])
    state = torch.load(path, weights_only=True)
    del state["models"]["twolevel"]["local"][3]  # a model of another grid than it says
    cases["grid"] = str(tmp_path / "g.pt")
    torch.save(state, cases["grid"])
    state = torch.load(path, weights_only=True)
    state["cnn"]["width"] = 12  # weights that do not fit the recorded configuration
    cases["config"] = str(tmp_path / "c.pt")
    torch.save(state, cases["config"])
    messages = {"missing": "no saved model at", "dir": "is the run complete", "truncated": "cannot read",
                "foreign": "is not an mpidd model file", "grid": "lacks the local CNNs of subdomains \\[3\\]",
                "config": "does not fit its recorded configuration"}
    for case, p in cases.items():
        with pytest.raises(mpidd.ModelFileError, match=messages[case]):
            mpidd.TwoLevelClassifier.load(p, comm=MPI.COMM_SELF)


def test_validation_is_held_out_when_not_given(data):
    import mpidd
    from mpi4py import MPI
    clf = mpidd.TwoLevelClassifier("1x2", comm=MPI.COMM_SELF, validation_fraction=0.25, **SMALL)
    clf.fit(*data["train"])
    assert clf.scores_["cnn-dnn"]["val"] * 40 == pytest.approx(round(clf.scores_["cnn-dnn"]["val"] * 40))  # 40 held out
    assert clf.bytes_sent_["probabilities"] == 0  # one rank: nothing crosses
    with pytest.raises(ValueError, match="validation_fraction"):
        mpidd.TwoLevelClassifier(comm=MPI.COMM_SELF, validation_fraction=0, **SMALL).fit(*data["train"])


@pytest.mark.parametrize("case,message", [
    ("ndim", "expected \\(n, C, H, W\\)"),
    ("labels", "labels for x have shape"),
    ("nan", "NaN or inf"),
    ("keys", "holds subdomains \\[0, 1\\], but this rank owns \\[0, 1, 2, 3\\]"),
    ("box", "box needs"),
    ("noshape", "pass image_shape"),
    ("grid", "does not fit images"),
])
def test_bad_input_is_refused_with_one_line(data, case, message):
    import mpidd
    from mpi4py import MPI
    x, y = data["train"]
    clf = mpidd.TwoLevelClassifier("2x2", comm=MPI.COMM_SELF, **SMALL)
    kwargs = {}
    if case == "ndim":
        x = x[:, 0]
    elif case == "labels":
        y = y[:-1]
    elif case == "nan":
        x = x.astype(np.float32)
        x[3, 0, 2, 2] = np.nan
    elif case in ("keys", "box", "noshape"):
        x = {i: x[:, :, :8, :8] for i in ((0, 1) if case == "keys" else range(4))}
        if case == "box":
            x[2] = x[2][:, :, :4]
        kwargs = {} if case == "noshape" else {"image_shape": (1, 16, 16)}
    elif case == "grid":
        clf = mpidd.TwoLevelClassifier("32x1", comm=MPI.COMM_SELF, **SMALL)
    with pytest.raises(ValueError, match=message):
        clf.fit(x, y, **kwargs)


def test_predict_refuses_other_image_shapes(fitted):
    with pytest.raises(ValueError, match="trained on \\(1, 16, 16\\)"):
        fitted.predict(np.zeros((4, 1, 20, 16), np.uint8))


def test_width_classifier_fit_predict_save(data, tmp_path):
    import mpidd
    from mpi4py import MPI
    clf = mpidd.WidthClassifier(2, width=8, hidden=16, subnet_epochs=1, epochs=1, batch_size=32, threads=1,
                                comm=MPI.COMM_SELF)
    clf.fit(*data["train"], *data["val"])
    x, y = data["test"]
    p = clf.predict_proba(x)
    assert p.shape == (32, 3) and np.array_equal(clf.predict(x), p.argmax(1))
    assert sorted(clf.history_) == ["recomposed", "subnet_0", "subnet_1"] and sorted(clf.subnet_scores_) == [0, 1]
    assert 0 <= clf.initial_score_ <= 1
    loaded = mpidd.TwoLevelClassifier.load(clf.save(str(tmp_path / "w.pt")), comm=MPI.COMM_SELF)
    assert loaded.available_models() == ["recomposed"] and np.array_equal(loaded.predict_proba(x, "recomposed"), p)
    with pytest.raises(ValueError, match="not divisible by --subnets 3"):
        mpidd.WidthClassifier(3, width=8, comm=MPI.COMM_SELF).fit(*data["train"])


def test_bf16_mixed_from_python(data, tmp_path, monkeypatch):
    import mpidd
    from mpi4py import MPI
    from mpidd import engine
    if engine.precision_error("bf16-mixed", "cpu") is not None:
        pytest.skip("this CPU has no bfloat16")
    x = data["test"][0]
    clf = mpidd.TwoLevelClassifier("2x2", comm=MPI.COMM_SELF, precision="bf16-mixed", **SMALL)
    clf.fit(*data["train"], *data["val"])
    assert clf.get_params()["precision"] == "bf16-mixed"
    path = clf.save(str(tmp_path / "m.pt"))
    loaded = mpidd.TwoLevelClassifier.load(path, comm=MPI.COMM_SELF)  # in the precision it was trained in
    assert loaded.precision == "bf16-mixed" and np.array_equal(loaded.predict_proba(x), clf.predict_proba(x))
    as32 = mpidd.TwoLevelClassifier.load(path, comm=MPI.COMM_SELF, precision="32").predict_proba(x)
    assert not np.array_equal(as32, clf.predict_proba(x)) and np.abs(as32 - clf.predict_proba(x)).max() < 0.1
    width = mpidd.WidthClassifier(2, width=8, hidden=16, subnet_epochs=1, epochs=1, batch_size=32, threads=1,
                                  precision="bf16-mixed", comm=MPI.COMM_SELF).fit(*data["train"], *data["val"])
    assert width.predict_proba(x).dtype == np.float32 and width.get_params()["precision"] == "bf16-mixed"

    monkeypatch.setattr(engine, "_cpu_has_bf16", lambda: False)  # a CPU without bfloat16:
    assert mpidd.TwoLevelClassifier.load(path, comm=MPI.COMM_SELF).precision == "32"  # predicts in float32
    with pytest.raises(ValueError, match="precision bf16-mixed: this CPU has no bfloat16 support"):
        mpidd.TwoLevelClassifier("2x2", comm=MPI.COMM_SELF, precision="bf16-mixed", **SMALL).fit(*data["train"])


def test_images_in_a_data_file_equal_the_arrays_read_from_it(data, fitted, tmp_path):
    """Input form (c): an h5py.Dataset (a seeded hold-out when no x_val) and a file's path (its
    splits; FILE:SPLIT) give, bit for bit, what the arrays give, with the same hold-out; the
    width classifier too; NaN in a float file and missing labels are refused with one line."""
    import h5py

    import mpidd
    from mpi4py import MPI
    from mpidd.writer import write_dataset
    path = write_dataset(str(tmp_path / "d.h5"), data, chunk_samples=16)
    x_test = data["test"][0]
    by_path = mpidd.TwoLevelClassifier("2x2", comm=MPI.COMM_SELF, **SMALL).fit(path)
    assert np.array_equal(by_path.predict_proba(path), fitted.predict_proba(x_test))
    assert by_path.score(path) == fitted.score(*data["test"]) == by_path.score(f"{path}:test")
    assert by_path.score(f"{path}:val") == fitted.score(*data["val"])
    assert by_path.bytes_read_ > 0 and fitted.bytes_read_ == 0
    held_out = mpidd.TwoLevelClassifier("1x2", comm=MPI.COMM_SELF, validation_fraction=0.25, **SMALL)
    held_out.fit(*data["train"])
    with h5py.File(path, "r") as f:
        dataset = mpidd.TwoLevelClassifier("1x2", comm=MPI.COMM_SELF, validation_fraction=0.25, **SMALL)
        dataset.fit(f["train"]["images"], data["train"][1])
        assert np.array_equal(dataset.predict_proba(f["test"]["images"]), held_out.predict_proba(x_test))
        assert dataset.scores_ == held_out.scores_
    width = dict(width=8, hidden=16, subnet_epochs=1, epochs=1, batch_size=32, threads=1, comm=MPI.COMM_SELF)
    w_file = mpidd.WidthClassifier(2, **width).fit(path)
    w_arrays = mpidd.WidthClassifier(2, **width).fit(*data["train"], *data["val"])
    assert np.array_equal(w_file.predict_proba(path), w_arrays.predict_proba(x_test))

    bad_path = write_dataset(str(tmp_path / "bad.h5"), {s: (x.astype(np.float32), y) for s, (x, y) in data.items()})
    with h5py.File(bad_path, "r+") as f:
        f["train"]["images"][7, 0, 12, 3] = np.inf
    with pytest.raises(ValueError, match=r"bad.h5:/train/images: image 7 holds NaN or inf values"):
        mpidd.TwoLevelClassifier("2x2", comm=MPI.COMM_SELF, **SMALL).fit(bad_path)
    with h5py.File(tmp_path / "bare.h5", "w") as f:
        f["x"] = data["train"][0]
    with h5py.File(tmp_path / "bare.h5", "r") as f, pytest.raises(ValueError, match="/x has no labels beside it"):
        by_path.score(f["x"])
    with pytest.raises(ValueError, match="does not exist"):
        by_path.predict(str(tmp_path / "missing.h5"))
    with pytest.raises(ValueError, match="fit needs the labels y"):
        mpidd.TwoLevelClassifier("2x2", comm=MPI.COMM_SELF, **SMALL).fit(data["train"][0])


def test_scikit_learn_conventions_get_set_params_repr_and_clone():
    """get_params(deep=True) holds every keyword, comm included; set_params returns self and
    refuses unknown names; repr shows what differs from the defaults; sklearn.base.clone gives
    an unfitted estimator with equal hyperparameters on the same communicator."""
    import inspect

    from sklearn.base import clone

    import mpidd
    from mpi4py import MPI
    for cls in (mpidd.TwoLevelClassifier, mpidd.WidthClassifier):
        clf = cls(comm=MPI.COMM_SELF, epochs=5, dense_layers=[4, 4, 4, 4])  # a list is kept as given
        params = clf.get_params(deep=True)
        assert list(params) == [k for k in inspect.signature(cls).parameters]
        assert params["comm"] is MPI.COMM_SELF and params["epochs"] == 5
        assert clf.set_params(epochs=7, lr=1e-3) is clf and clf.epochs == 7
        with pytest.raises(ValueError, match="invalid parameter 'epoch'"):
            clf.set_params(epoch=1)
        assert repr(clf).startswith(f"{cls.__name__}(") and "epochs=7" in repr(clf) and "lr=0.001" in repr(clf)
        assert "batch_size" not in repr(clf) and "comm=" in repr(clf)
        twin = clone(clf)
        assert type(twin) is cls and twin is not clf and twin.comm is MPI.COMM_SELF
        assert twin.get_params() == params | {"epochs": 7, "lr": 1e-3}
        assert twin.dense_layers == [4, 4, 4, 4] and twin.dense_layers is not clf.dense_layers
        assert repr(cls()) == f"{cls.__name__}()"


def test_the_constructor_makes_no_communicator():
    """comm=None: nothing collective in __init__ (a subprocess without mpirun: singleton MPI);
    3,000 estimators, the first and the last fitted, share the one duplicate of COMM_WORLD."""
    code = ("import numpy as np, mpidd\n"
            "from mpidd import parallel\n"
            "x = np.random.default_rng(0).integers(0, 255, (24, 1, 8, 8)).astype(np.uint8)\n"
            "y = np.arange(24) % 2\n"
            "made = [mpidd.TwoLevelClassifier('2x2', epochs=1, width=4, hidden=8, coarse_steps=1, threads=1)"
            " for _ in range(3000)]\n"
            "assert not parallel._SHARED\n"
            "for clf in (made[0], made[-1]):\n"
            "    clf.fit(x, y)\n"
            "assert made[0]._comm is made[-1]._comm is parallel.shared_world()\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("labels", [np.array(["cat", "dog", "eel"]), np.array([3, 7, 9]), np.array([-1.5, 0.0, 2.5])])
def test_labels_of_any_kind_are_mapped_to_classes(data, labels, tmp_path):
    """Labels of any sortable kind: classes_ are the distinct values, sorted; predict returns
    them; the model is the one trained on 0..K-1; score and save/load keep them."""
    import mpidd
    from mpi4py import MPI
    (x, y), (xv, yv), (xt, yt) = data["train"], data["val"], data["test"]
    clf = mpidd.TwoLevelClassifier("2x2", comm=MPI.COMM_SELF, **SMALL).fit(x, labels[y], xv, labels[yv])
    reference = mpidd.TwoLevelClassifier("2x2", comm=MPI.COMM_SELF, **SMALL).fit(x, y, xv, yv)
    assert np.array_equal(clf.classes_, labels) and clf.class_names_ == [str(v) for v in labels]
    assert np.array_equal(clf.predict(xt), labels[reference.predict(xt)])
    assert np.array_equal(clf.predict_proba(xt), reference.predict_proba(xt))
    assert clf.score(xt, labels[yt]) == reference.score(xt, yt)
    assert clf.score_all(xt, labels[yt]) == reference.score_all(xt, yt)
    loaded = mpidd.TwoLevelClassifier.load(clf.save(str(tmp_path / "m.pt")), comm=MPI.COMM_SELF)
    assert np.array_equal(loaded.predict(xt), clf.predict(xt)) and loaded.classes_.tolist() == labels.tolist()
    with pytest.raises(ValueError, match="num_classes is 2"):
        mpidd.TwoLevelClassifier("2x2", comm=MPI.COMM_SELF, num_classes=2, **SMALL).fit(x, y, xv, yv)
    with pytest.raises(ValueError, match="at least 2"):
        mpidd.TwoLevelClassifier("2x2", comm=MPI.COMM_SELF, **SMALL).fit(x, np.zeros(len(x), int), xv, yv * 0)


def test_partial_fit_continues_exactly_after_save_and_load(data, tmp_path):
    """Online training, call after call (string labels, a replay buffer of 40): 4 calls in a row
    and 2 calls, save, load, 2 more calls give the same probabilities, bit for bit; the buffer
    never holds more than buffer_size samples; the first call needs classes."""
    import mpidd
    from mpi4py import MPI
    (x, y), (xt, _) = data["train"], data["test"]
    names = np.array(["a", "b", "c"])
    opts = dict(SMALL, buffer_size=40, comm=MPI.COMM_SELF)
    with pytest.raises(ValueError, match="needs classes="):
        mpidd.TwoLevelClassifier("2x2", **opts).partial_fit(x[:40], names[y[:40]])
    steps = [slice(k * 40, (k + 1) * 40) for k in range(4)]
    straight = mpidd.TwoLevelClassifier("2x2", **opts)
    for k, rows in enumerate(steps):
        straight.partial_fit(x[rows], names[y[rows]], classes=names if k == 0 else None)
        assert len(straight._online.labels) == 40 and straight.n_samples_seen_ == 40 * (k + 1)
    assert [r["samples"] for r in straight.history_["online"]] == [40, 80, 80, 80]
    halted = mpidd.TwoLevelClassifier("2x2", **opts)
    for rows in steps[:2]:
        halted.partial_fit(x[rows], names[y[rows]], classes=names)
    resumed = mpidd.TwoLevelClassifier.load(halted.save(str(tmp_path / "online.pt")), comm=MPI.COMM_SELF)
    assert resumed.n_samples_seen_ == 80
    for rows in steps[2:]:
        resumed.partial_fit(x[rows], names[y[rows]])
    assert np.array_equal(resumed.predict_proba(xt), straight.predict_proba(xt))
    assert resumed.predict(xt).dtype.kind == "U"
    for model in ("average", "vote"):
        assert np.array_equal(resumed.predict_proba(xt, model), straight.predict_proba(xt, model))


def test_the_replay_buffer_is_a_uniform_sample_of_everything_seen():
    """Reservoir sampling: after 100 samples through a buffer of 10, each sample was kept with
    probability 1/10 (counted over 4,000 seeded runs)."""
    from mpidd.methods.online import OnlineState, remember
    kept = np.zeros(100)
    for seed in range(4000):
        state = OnlineState()
        for k in range(10):  # ten calls of ten samples
            remember(state, {0: np.arange(10 * k, 10 * (k + 1))[:, None]}, np.zeros(10, np.int64), 10, seed)
        assert len(state.labels) == 10 and state.seen == 100
        kept[state.buffers[0][:, 0]] += 1
    assert np.all(np.abs(kept / 4000 - 0.1) < 0.025), kept / 4000


def test_torch_tensors_are_taken_through_dlpack(data, fitted):
    """Images and labels as torch tensors (a solver's fields): a CPU tensor is used in place
    (DLPack, the numpy view shares its memory), and fit and predict give what the arrays give."""
    import torch

    import mpidd
    from mpi4py import MPI
    from mpidd.inputs import from_torch
    (x, y), (xv, yv), (xt, _) = data["train"], data["val"], data["test"]
    tensor = torch.from_numpy(xt.astype(np.float32) / 255)
    assert np.shares_memory(from_torch(tensor), tensor.numpy()) and from_torch(xt) is xt
    assert np.array_equal(from_torch({0: tensor})[0], tensor.numpy())
    clf = mpidd.TwoLevelClassifier("2x2", comm=MPI.COMM_SELF, **SMALL)
    clf.fit(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(xv), torch.from_numpy(yv))
    assert np.array_equal(clf.predict_proba(torch.from_numpy(xt)), fitted.predict_proba(xt))
    assert np.array_equal(clf.predict(tensor.requires_grad_()), fitted.predict(xt.astype(np.float32) / 255))
