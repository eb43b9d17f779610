"""Fit a TwoLevelClassifier from Python under mpirun (test helper for tests/e2e/test_e2e_api.py).

    mpirun -n 4 python tests/helpers/api_fit.py split OUT DATA_A DATA_B  # COMM_WORLD split in two: A and B at once
    mpirun -n 2 python tests/helpers/api_fit.py alone OUT DATA           # one fit on COMM_WORLD
    mpirun -n 2 python tests/helpers/api_fit.py cli OUT DATA [options]   # the command line's options, for comparison
    mpirun -n 2 python tests/helpers/api_fit.py width OUT DATA           # WidthClassifier with test_e2e.WIDTH's options

Writes OUT/<name>.npz (test probabilities of cnn-dnn, average, vote; val scores) and, for
`cli`, OUT/api_model.pt (clf.save) and OUT/api_scores.json (test accuracies).
"""

import json
import os
import sys

import h5py
import numpy as np
from mpi4py import MPI

import mpidd

# coarse_steps=200: a smaller step budget than the default 2,000, to keep the suite short
OPTIONS = dict(grid="2x2", epochs=2, batch_size=32, width=8, hidden=16, coarse_epochs=4, coarse_steps=200,
               coarse_batch_size=32, coherent_epochs=1, threads=1, seed=2)


def splits(path):
    with h5py.File(path, "r") as f:
        return {s: (f[s]["images"][...], f[s]["labels"][...]) for s in ("train", "val", "test")}


def normalization(path):
    """The data file's per-channel statistics, which the command line normalises with."""
    info = mpidd.read_info(path)
    return (info.mean, info.std) if info.mean is not None else None


def fit_and_write(comm, path, out, name, **options):
    d = splits(path)
    clf = mpidd.TwoLevelClassifier(**{**OPTIONS, **options}, normalization=normalization(path),
                                   comm=comm).fit(*d["train"], *d["val"])
    probs = {m: clf.predict_proba(d["test"][0], m) for m in ("cnn-dnn", "average", "vote")}
    if comm.rank == 0:
        np.savez(os.path.join(out, f"{name}.npz"), **probs)
    return clf, d


mode, out = sys.argv[1], sys.argv[2]
world = MPI.COMM_WORLD
if mode == "split":
    color = world.rank % 2  # ranks 0, 2 fit A; ranks 1, 3 fit B, at the same time
    sub = world.Split(color, key=world.rank)
    fit_and_write(sub, sys.argv[3 + color], out, "AB"[color])
elif mode == "alone":
    fit_and_write(world, sys.argv[3], out, "alone")
elif mode == "width":
    d = splits(sys.argv[3])
    clf = mpidd.WidthClassifier(4, width=16, hidden=32, subnet_epochs=3, epochs=2, batch_size=32, threads=1,
                                normalization=normalization(sys.argv[3]))
    clf.fit(*d["train"], *d["val"])
    result = {"test": clf.score(*d["test"]), "initial_val": clf.initial_score_, "subnets": clf.subnet_scores_,
              "val": clf.scores_["recomposed"]["val"], "sent": clf.bytes_sent_}
    clf.save(os.path.join(out, "width_model.pt"))
    if world.rank == 0:
        with open(os.path.join(out, "width.json"), "w") as f:
            json.dump(result, f)
else:  # cli: the same options the command line was given
    extra = dict(a.split("=", 1) for a in sys.argv[4:])
    options = {k: (type(OPTIONS[k])(v) if k in OPTIONS else v) for k, v in extra.items()}
    clf, d = fit_and_write(world, sys.argv[3], out, "api", overlap=int(options.pop("overlap", 0)), **options)
    scores = {m: clf.score(*d["test"], m) for m in ("cnn-dnn", "average", "vote")}
    for init in ("random", "pretrained"):  # predict(model="coherent") takes the pretrained one once it exists
        clf.fit_coherent(*d["train"], *d["val"], init=init)
        scores[f"coherent_{init}"] = clf.score(*d["test"], "coherent")
    clf.save(os.path.join(out, "api_model.pt"))
    if world.rank == 0:
        with open(os.path.join(out, "api_scores.json"), "w") as f:
            json.dump({"test": scores, "val": clf.scores_, "local_val": clf.local_scores_}, f)
