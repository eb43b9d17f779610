"""PNG figures of finished runs for `python -m mpidd.report --out` (matplotlib, Agg: no display).
No MPI.

Each function reads what a run directory holds (results.json, metrics.csv, the data file for
the sample image), draws one figure, writes it and returns its path, or None when the run has
nothing to draw for it.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# the phases of results.json's per-rank timings, in the order they run (subdomain_i are inside local)
PHASES = ("load", "local", "wait", "gather", "coarse", "coherent_random", "coherent_pretrained",
          "global_load", "global_train", "global_eval", "subnets", "recompose", "recomposed", "random_init")


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sample_image(results: dict, path: str):
    """Test image 0 (a volume's middle slice) with every subdomain's box drawn on it."""
    import h5py
    data, dec = results.get("data"), results.get("decomposition")
    if not data or not dec or not os.path.exists(data):
        return None
    with h5py.File(data, "r") as f:
        image = f["test"]["images"][0].astype(np.float64)
    if image.ndim == 4:  # (C, D, H, W): the middle slice along D
        image = image[:, image.shape[1] // 2]
    lo, hi = image.min(), image.max()
    image = (image - lo) / (hi - lo) if hi > lo else image * 0
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if image.shape[0] == 3:
        ax.imshow(image.transpose(1, 2, 0))
    else:
        ax.imshow(image[0], cmap="gray")
    colours = plt.cm.tab10(np.linspace(0, 1, 10))
    for i, box in enumerate(dec["boxes"]):
        (y0, y1), (x0, x1) = box[-2], box[-1]  # volumes: the slice's (H, W) extent
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.5,
                                   ec=colours[i % 10], ls="-" if i % 2 == 0 else "--"))
    title = f"grid {dec['grid']}, overlap {dec['overlap']}, subimages {dec['subimage_shape']}"
    ax.set_title(title + (" (middle slice)" if len(dec["boxes"][0]) == 3 else ""), fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    return _save(fig, path)


def read_metrics(run_dir: str) -> dict:
    """{model: [epoch rows]} from metrics.csv (the epoch records, not the mid-epoch ones)."""
    rows = defaultdict(list)
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get("epoch"):
                rows[row["model"]].append(row)
    return dict(rows)


def training_curves(run_dir: str, path: str):
    """Training loss and validation accuracy per epoch of every model the run trained (beyond 8
    local CNNs, they are thin grey lines with one legend entry)."""
    metrics = read_metrics(run_dir)
    if not metrics:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    locals_ = sorted((m for m in metrics if m.startswith("local_")), key=lambda m: int(m.split("_")[1]))
    many = len(locals_) > 8
    for model in locals_ + sorted(set(metrics) - set(locals_)):
        rows = metrics[model]
        style = {"color": "grey", "lw": 0.6, "alpha": 0.6, "label": None} if many and model in locals_ else \
            {"marker": ".", "label": model}
        if many and model == locals_[0]:
            style["label"] = f"local CNNs ({len(locals_)})"
        epochs = [float(r["epoch"]) for r in rows]
        left.plot(epochs, [float(r["loss"]) for r in rows], **style)
        val = [float(r["val_acc"]) * 100 for r in rows if r.get("val_acc")]
        if val:
            right.plot(epochs[:len(val)], val, **style)
    left.set(xlabel="epoch", ylabel="training loss", yscale="log")
    right.set(xlabel="epoch", ylabel="validation accuracy (%)")
    right.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def accuracies(results: dict, path: str):
    """Validation and test accuracy of every model and combiner, side by side."""
    models = [m for m in results.get("models", []) if m.get("test_acc") is not None]
    if not models:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(models) + 1.6))
    y = np.arange(len(models))
    ax.barh(y - 0.2, [100 * (m.get("val_acc") or 0) for m in models], 0.4, label="val")
    ax.barh(y + 0.2, [100 * m["test_acc"] for m in models], 0.4, label="test")
    ax.set_yticks(y, [m["name"] for m in models], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (%)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def phase_times(results: dict, path: str):
    """Per rank, the wall seconds of each phase stacked in order (`wait`: idle at the gather)."""
    ranks = results.get("per_rank", [])
    if not ranks:
        return None
    phases = [p for p in PHASES if any(p in r.get("phases", {}) for r in ranks)]
    phases += sorted({p for r in ranks for p in r.get("phases", {})} - set(phases) -
                     {p for r in ranks for p in r.get("phases", {}) if p.startswith("subdomain_")})
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(ranks) + 2.2))
    left = np.zeros(len(ranks))
    for phase in phases:
        seconds = np.array([r.get("phases", {}).get(phase, {}).get("wall_s", 0.0) for r in ranks])
        if seconds.any():
            ax.barh([f"rank {r['rank']}" for r in ranks], seconds, left=left, label=phase,
                    hatch="//" if phase == "wait" else None)
            left += seconds
    ax.invert_yaxis()
    ax.set_xlabel("wall seconds")
    ax.legend(fontsize=7, ncol=6, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)  # off the bars
    return _save(fig, path)


def confusion(results: dict, path: str):
    """The CNN-DNN's test confusion matrix (counts; rows: true class) with the class names."""
    c = results.get("confusion")
    if not c:
        return None
    counts = np.array(c["counts"])
    names = results.get("classes") or [str(k) for k in range(len(counts))]
    K = len(counts)
    fig, ax = plt.subplots(figsize=(0.45 * K + 3, 0.45 * K + 2.5))
    ax.imshow(counts, cmap="Blues")
    for (t, p), n in np.ndenumerate(counts):  # counts on the cells (skipped when K makes them unreadable)
        if K <= 20 and n:
            ax.text(p, t, str(n), ha="center", va="center", fontsize=7,
                    color="white" if n > counts.max() / 2 else "black")
    ax.set_xticks(range(K), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(K), names, fontsize=7)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"{c['model']}, {c['split']}: {100 * np.trace(counts) / counts.sum():.2f}% correct")
    return _save(fig, path)


def time_to_accuracy(results: dict, path: str):
    """Width mode: test accuracy against critical-path CPU seconds of the recomposed network
    (from the start of the run: sub-networks, gather, recompose, then its training) and of the
    global CNN from random weights, with the target accuracy."""
    t = results.get("time_to_target")
    if not t or not t.get("curves"):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    start = t.get("recomposed_start_cpu_s", 0.0)
    before = next((m["test_acc"] for m in results.get("models", []) if m.get("kind") == "recomposed_initial"), None)
    recomposed = ([(start, before)] if before is not None else []) + \
        [(start + p["cpu_s"], p["test_acc"]) for p in t["curves"]["recomposed"]]
    for label, points in (("recomposed (sub-networks first)", recomposed),
                          ("global CNN, random init", [(p["cpu_s"], p["test_acc"]) for p in t["curves"]["global"]])):
        if points:
            ax.plot(*zip(*[(s, 100 * a) for s, a in points]), marker=".", label=label)
    ax.axhline(100 * t["target_test_acc"], color="grey", ls=":", label=f"target {100 * t['target_test_acc']:.1f}%")
    ax.set(xlabel="critical-path CPU seconds (training steps)", ylabel="test accuracy (%)")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)
