"""The run directory: its file and checkpoint names (produced here only: local_checkpoint(i),
COARSE_CHECKPOINT, ...; every writer and reader asks for them here), atomic writes of JSON,
checkpoints and metrics. No MPI.

    config.json      resolved configuration (reusable with --config)
    results.json     accuracies, parameter counts, timings, decomposition, versions
    metrics.csv      one row per epoch of every model
    model.pt         the trained model, self-describing (mpidd.saved; predict and TwoLevelClassifier.load)
    checkpoints/     local_<i>.pt (one per subdomain), coarse_dnn.pt, global.pt,
                     coherent_<init>_local_<i>.pt, coherent_<init>_dnn.pt,
                     coherent_<init>_rank<r>_optimizer.pt (init: random or pretrained),
                     subnet_<m>.pt, recomposed_initial.pt, recomposed.pt (--mode width)
    logs/rank<r>.log per-rank log
    checkpoints/progress.json   the restart marker (rank 0 writes it last, see below)

Every checkpoint holds what its training loop needs to continue exactly (mpidd.engine), and
is written each epoch and at a stop. The marker says which collective steps are complete
(gather, coarse, coherent positions, ...), for which world size and data file; rank 0
rewrites it after the other ranks have written their part, so it never promises more
than the checkpoints hold.
"""

from __future__ import annotations

import csv
import json
import os

import torch

from .writer import atomic_path

METRIC_FIELDS = ("model", "epoch", "loss", "acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr",
                 "images_per_s", "seconds", "cpu_seconds")


def atomic_write(path: str, write):
    """Call write(file_object) on a temporary file beside `path`, then rename it into place."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


# The names of the files under RUN/checkpoints/, spelled here only.
CHECKPOINTS = "checkpoints"
COARSE_CHECKPOINT = "coarse_dnn.pt"                  # the coarse DNN
GLOBAL_CHECKPOINT = "global.pt"                      # the global CNN
RECOMPOSED_INITIAL_CHECKPOINT = "recomposed_initial.pt"  # --mode width: before further training
RECOMPOSED_CHECKPOINT = "recomposed.pt"              # --mode width: after it
PROBABILITIES = "probabilities.npz"                  # the gathered (n, N*K) probabilities (rank 0)
PROGRESS_FILE = "progress.json"                      # the restart marker
PROGRESS = os.path.join(CHECKPOINTS, PROGRESS_FILE)  # ... relative to RUN


def local_checkpoint(i) -> str:
    """The local CNN of subdomain i."""
    return f"local_{i}.pt"


def subnet_checkpoint(m) -> str:
    """--mode width: sub-network m."""
    return f"subnet_{m}.pt"


def coherent_local_checkpoint(name: str, i) -> str:
    """Local CNN i of coherent phase `name` (coherent_random or coherent_pretrained), at its end."""
    return f"{name}_local_{i}.pt"


def coherent_dnn_checkpoint(name: str) -> str:
    """The DNN of coherent phase `name`, at its end (rank 0)."""
    return f"{name}_dnn.pt"


def coherent_optimizer_checkpoint(name: str, rank) -> str:
    """The optimizer of rank `rank`'s part of coherent phase `name`, at its end."""
    return f"{name}_rank{rank}_optimizer.pt"


def coherent_state_checkpoints(name: str, rank) -> tuple[str, str]:
    """(the newest, the one before) of rank `rank`'s loop states of coherent phase `name` while
    it runs (see cli.run.RunDirectory.coherent_control)."""
    return f"{name}_rank{rank}.state.pt", f"{name}_rank{rank}.state.prev.pt"


def phases_file(rank) -> str:
    """Rank `rank`'s seconds per phase so far, written at a stop."""
    return f"phases_rank{rank}.json"


def checkpoint_path(out: str, name: str) -> str:
    """RUN/checkpoints/name."""
    return os.path.join(out, CHECKPOINTS, name)


MODEL_FILE = "model.pt"  # the trained model, self-describing (written and read by mpidd.saved)
RUN_FILES = ("config.json", "results.json", "metrics.csv", MODEL_FILE)
RUN_GLOBS = tuple(f"{CHECKPOINTS}/{pattern}" for pattern in (
    local_checkpoint("*"), COARSE_CHECKPOINT, GLOBAL_CHECKPOINT, "coherent_*.pt", subnet_checkpoint("*"),
    "recomposed*.pt", PROGRESS_FILE, PROBABILITIES, phases_file("*"))) + ("logs/rank*.log",)


def read_progress(out: str) -> dict | None:
    path = os.path.join(out, PROGRESS)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_progress(out: str, progress: dict):
    write_json(os.path.join(out, PROGRESS), progress)


def read_json(path: str, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


def prepare(out: str):
    """Create the run directory; in a reused one (--overwrite) remove what an earlier run wrote,
    and only that, so no stale checkpoint or result can be mistaken for this run's."""
    import glob
    os.makedirs(out, exist_ok=True)
    stale = [os.path.join(out, name) for name in RUN_FILES]
    stale += [path for pattern in RUN_GLOBS for path in glob.glob(os.path.join(out, pattern))]
    for path in stale:
        if os.path.isfile(path):
            os.remove(path)


def write_json(path: str, data):
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2, default=_jsonable) + "\n").encode()))


def save_checkpoint(path: str, **state):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str) -> dict | None:
    """A checkpoint this run wrote (weights_only: no pickled code runs), or None if there is none."""
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def save_arrays(path: str, **arrays):
    import numpy as np
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_arrays(path: str) -> dict:
    import numpy as np
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def write_metrics(path: str, rows):
    def write(f):
        import io
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        f.write(text.getvalue().encode())
    atomic_write(path, write)


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)
