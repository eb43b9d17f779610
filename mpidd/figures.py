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
NESTED_PHASES = ("probabilities",)  # parts of "local", timed apart; like subdomain_<i>, not stacked again


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


# the validation score of metrics.csv's val_acc column by task: (scale, axis label, log axis)
SCORES = {"classify": (100, "validation accuracy (%)", False), "regress": (1, "validation MAE", True),
          "segment": (100, "validation pixel accuracy (%)", False)}


def training_curves(run_dir: str, path: str, task: str = "classify"):
    """Training loss (top) and validation score (bottom: accuracy; dense runs: MAE or pixel
    accuracy) against epochs, one column per phase (local CNNs or U-Nets, coarse network, each
    coherent model, global network; width: sub-networks, recomposed), each on its own epoch
    axis. Beyond 8 local networks (or sub-networks) they are thin grey lines."""
    scale, score_label, log_score = SCORES[task]
    metrics = read_metrics(run_dir)
    if not metrics:
        return None
    groups = defaultdict(list)
    for model in metrics:
        groups[model.split("_")[0] if model.startswith(("local_", "subnet_")) else model].append(model)
    order = ["local", "subnet", "coarse_dnn", "coherent_random", "coherent_pretrained", "recomposed", "global"]
    columns = [g for g in order if g in groups] + sorted(set(groups) - set(order))
    titles = {"local": "local CNNs", "subnet": "sub-networks", "coarse_dnn": "coarse DNN",
              "coherent_random": "coherent (random init)", "coherent_pretrained": "coherent (transfer learning)",
              "recomposed": "recomposed network", "global": "global CNN", "coarse": "coarse network"}
    if task != "classify":
        titles.update({"local": "local U-Nets", "global": "global U-Net"})
    fig, axes = plt.subplots(2, len(columns), figsize=(3.2 * len(columns) + 1, 5.5), squeeze=False)
    for col, group in enumerate(columns):
        models = sorted(groups[group], key=lambda m: int(m.split("_")[1]) if m.split("_")[-1].isdigit() else 0)
        many = len(models) > 8
        for k, model in enumerate(models):
            rows = metrics[model]
            style = {"color": "grey", "lw": 0.6, "alpha": 0.6} if many else {"marker": "."}
            style["label"] = (f"{len(models)} models" if k == 0 else None) if many else model
            epochs = [float(r["epoch"]) for r in rows]
            axes[0, col].plot(epochs, [float(r["loss"]) for r in rows], **style)
            val = [(e, float(r["val_acc"]) * scale) for e, r in zip(epochs, rows) if r.get("val_acc")]
            if val:
                axes[1, col].plot(*zip(*val), **style)
        axes[0, col].set(title=titles.get(group, group), yscale="log", ylabel="training loss" if col == 0 else None)
        axes[1, col].set(xlabel="epoch", ylabel=score_label if col == 0 else None,
                         yscale="log" if log_score else "linear")
        if len(models) > 1:
            axes[1, col].legend(fontsize=6, loc="upper right" if log_score else "lower right")
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
    phases += sorted({p for r in ranks for p in r.get("phases", {})} - set(phases) - set(NESTED_PHASES) -
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


def subdomain_accuracies(results: dict):
    """(test accuracy of each subdomain's local CNN as an array shaped like the grid, the rank
    that trained each, subdomain indices alike), or None without local CNNs. Volumes: (D, H, W)."""
    dec = results.get("decomposition") or {}
    locals_ = [m for m in results.get("models", []) if m.get("kind") == "local" and m.get("test_acc") is not None]
    if not dec.get("grid") or not locals_:
        return None
    grid = tuple(int(g) for g in dec["grid"].split("x"))
    acc = np.full(grid, np.nan)
    ranks, index = np.full(grid, -1), np.full(grid, -1)
    for m in locals_:
        where = np.unravel_index(m["subdomain"], grid)  # C order, as Decomposition.coords
        acc[where], ranks[where], index[where] = m["test_acc"], m["rank"], m["subdomain"]
    return acc, ranks, index


def subdomain_heat_map(results: dict, path: str):
    """Each local CNN's test accuracy over the grid (subdomain, rank and accuracy in every cell);
    volumes: one panel per slice of the grid along its first axis."""
    grids = subdomain_accuracies(results)
    if grids is None:
        return None
    acc, ranks, index = (g if g.ndim == 3 else g[None] for g in grids)
    D, H, W = acc.shape
    fig, axes = plt.subplots(1, D, figsize=(min(4 + 0.6 * W, 12) * D ** 0.5, 0.6 * H + 2), squeeze=False)
    lo, hi = 100 * np.nanmin(acc), 100 * np.nanmax(acc)
    for d, ax in enumerate(axes[0]):
        image = ax.imshow(100 * acc[d], cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-9))
        for (r, c), a in np.ndenumerate(acc[d]):
            if H * W <= 64:  # numbers only where they can be read
                ax.text(c, r, f"{index[d, r, c]}\nrank {ranks[d, r, c]}\n{100 * a:.1f}%", ha="center", va="center",
                        fontsize=7 if H * W <= 16 else 5, color="white" if 100 * a < (lo + hi) / 2 else "black")
        ax.set_xticks(range(W)), ax.set_yticks(range(H))
        ax.set(xlabel="grid column", ylabel="grid row", title=f"slice {d} of the grid" if D > 1 else None)
    fig.colorbar(image, ax=list(axes[0]), label="local CNN test accuracy (%)", shrink=0.8)
    fig.suptitle(f"grid {results['decomposition']['grid']}: each subdomain's local CNN on its subimages", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def across_runs(named: list) -> dict | None:
    """What the across-runs figures draw, from [(name, results)] of two-level runs sorted by
    the number of subdomains N: {"N": [...], "locals_min"/"locals_max"/"average"/"vote"/"cnn_dnn"/
    "coherent_random"/"coherent_pretrained"/"global": test accuracies (None where a run has
    none), "speedup": global training CPU s (one process's) / two-level critical path CPU s,
    "flop_limit": global / (local x subdomains per rank) forward FLOPs}, or None for fewer than
    two such runs."""
    runs = sorted(((r["decomposition"]["num_subdomains"], name, r) for name, r in named
                   if r.get("decomposition") and r.get("models")), key=lambda t: (t[0], t[1]))
    if len(runs) < 2:
        return None
    out = {k: [] for k in ("N", "names", "locals_min", "locals_max", "average", "vote", "cnn_dnn",
                           "coherent_random", "coherent_pretrained", "global", "speedup", "flop_limit")}
    for N, name, r in runs:
        acc = {m.get("kind"): m.get("test_acc") for m in r["models"]}
        locals_ = [m["test_acc"] for m in r["models"] if m.get("kind") == "local"]
        out["N"].append(N)
        out["names"].append(name)
        out["locals_min"].append(min(locals_) if locals_ else None)
        out["locals_max"].append(max(locals_) if locals_ else None)
        for kind in ("average", "vote", "cnn_dnn", "coherent_random", "coherent_pretrained", "global"):
            out[kind].append(acc.get(kind))
        t = r.get("timing", {})
        cp = t.get("critical_path")
        out["speedup"].append(t["global_train_cpu_s"] / cp["cpu_s"] if cp and t.get("global_train_cpu_s") else None)
        f = r.get("flops") or {}
        per_rank = max(r["decomposition"]["rank_of_subdomain"].count(k) for k in range(r.get("world_size", 1))) \
            if r["decomposition"].get("rank_of_subdomain") else 1
        out["flop_limit"].append(f["global_forward"] / (f["local_forward"] * per_rank)
                                 if f.get("global_forward") and f.get("local_forward") else None)
    return out


def accuracy_against_subdomains(named: list, path: str):
    """Test accuracy against the number of subdomains N: the local CNNs' min-max band, average,
    vote, CNN-DNN, the coherent models and the global CNN."""
    a = across_runs(named)
    if a is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    N = np.array(a["N"])

    def line(key):
        return np.array([np.nan if v is None else 100 * v for v in a[key]])
    if any(v is not None for v in a["locals_min"]):
        ax.fill_between(N, line("locals_min"), line("locals_max"), color="grey", alpha=0.3,
                        label="local CNNs (min-max)")
    for key, label, style in (("average", "average", "o-"), ("vote", "majority vote", "s-"),
                              ("cnn_dnn", "CNN-DNN", "D-"), ("coherent_random", "coherent (random init)", "v--"),
                              ("coherent_pretrained", "coherent (transfer learning)", "^--"),
                              ("global", "global CNN", "k:")):
        if any(v is not None for v in a[key]):
            ax.plot(N, line(key), style, label=label, ms=4)
    ax.set_xscale("log", base=2)
    ax.set_xticks(N, [str(n) for n in N])
    ax.set(xlabel="number of subdomains N", ylabel="test accuracy (%)")
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def speedup_against_subdomains(named: list, path: str):
    """The two-level critical path's speed-up over the global CNN (training CPU s, one
    process's) against N, beside the FLOP limit (global / local forward FLOPs per rank)."""
    a = across_runs(named)
    if a is None or all(s is None for s in a["speedup"]):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    N = np.array(a["N"])
    ax.plot(N, [np.nan if s is None else s for s in a["speedup"]], "D-", label="measured: global CNN / critical path")
    if any(f is not None for f in a["flop_limit"]):
        ax.plot(N, [np.nan if f is None else f for f in a["flop_limit"]], "k--", label="FLOP limit")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.set_xticks(N, [str(n) for n in N])
    ax.set(xlabel="number of subdomains N", ylabel="speed-up, global CNN CPU s / two-level critical path")
    ax.legend(fontsize=8)
    return _save(fig, path)


def dense_panels(run_dir: str, results: dict, dataset: str, samples: int = 3) -> list:
    """What dense_predictions draws, for the first `samples` test samples of a model's
    predictions, the `dataset` ("test/<model>") of RUN/predictions.h5: [(index, input, target,
    prediction, error)], 2D arrays (a volume's middle slice along D; the first input and output
    channel). Regress: error = |prediction - target|; segment: class masks, error = 1 where
    they differ. [] when a file is missing."""
    import h5py
    path, data = os.path.join(run_dir, "predictions.h5"), results.get("data")
    if not data or not os.path.exists(path) or not os.path.exists(data):
        return []
    with h5py.File(path, "r") as p, h5py.File(data, "r") as d:
        if dataset not in p:
            return []
        k = min(samples, len(p[dataset]))
        pred, target = p[dataset][:k], d["test"]["targets"][:k]
        images = d["test"]["images"][:k]
    if results["task"] == "regress":  # fields (n, C_out, [D,] H, W) -> channel 0
        pred, target = pred[:, 0], target[:, 0]
    images = images[:, 0]
    if images.ndim == 4:  # volumes (n, D, H, W): the middle slice
        images, target, pred = (a[:, a.shape[1] // 2] for a in (images, target, pred))
    error = np.abs(pred.astype(np.float64) - target) if results["task"] == "regress" else \
        (pred != target).astype(np.float64)
    return [(i, images[i], target[i], pred[i], error[i]) for i in range(k)]


def _grid_lines(ax, results: dict):
    """The subdomain boundaries (the last two axes of the grid) as white lines."""
    dec = results.get("decomposition") or {}
    if not dec.get("grid"):
        return
    # the tiles (a dense run's boxes without their overlap; runs before tiles were recorded had none)
    grid, sub = [int(g) for g in dec["grid"].split("x")][-2:], dec.get("tile_shape", dec["subimage_shape"])[-2:]
    for k in range(1, grid[0]):
        ax.axhline(k * sub[0] - 0.5, color="white", lw=0.8, ls="--")
    for k in range(1, grid[1]):
        ax.axvline(k * sub[1] - 0.5, color="white", lw=0.8, ls="--")


def dense_predictions(run_dir: str, results: dict, dataset: str, name: str, path: str, samples: int = 3):
    """Input, target, prediction and error of a few test samples of a dense run's model (its
    `dataset` in predictions.h5; `name` its title), with the subdomain grid drawn."""
    panels = dense_panels(run_dir, results, dataset, samples)
    if not panels:
        return None
    regress = results["task"] == "regress"
    classes = len((results.get("targets") or {}).get("classes") or [0, 1])  # masks: their class names
    fig, axes = plt.subplots(len(panels), 4, figsize=(11, 2.7 * len(panels) + 0.6), squeeze=False)
    for row, (i, image, target, pred, error) in zip(axes, panels):
        if regress:
            lo, hi = float(min(target.min(), pred.min())), float(max(target.max(), pred.max()))
            style = {"cmap": "inferno", "vmin": lo, "vmax": hi}
            score = f"MAE {error.mean():.4f}"
        else:
            style = {"cmap": "viridis", "vmin": 0, "vmax": classes - 1, "interpolation": "nearest"}
            score = f"{100 * (1 - error.mean()):.2f}% of pixels right"
        for ax, array, title, kw in ((row[0], image, f"test {i}: input", {"cmap": "gray"}),
                                     (row[1], target, "target", style), (row[2], pred, "prediction", style),
                                     (row[3], error, f"error: {score}", {"cmap": "magma" if regress else "Reds"})):
            shown = ax.imshow(array, **kw)
            if ax is not row[0]:
                fig.colorbar(shown, ax=ax, shrink=0.8)
            _grid_lines(ax, results)
            ax.set_title(title, fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{name}: grid {results['decomposition']['grid']}"
                 + (" (middle slice)" if len(results["decomposition"]["subimage_shape"]) == 3 else ""), fontsize=9)
    return _save(fig, path)
