"""Readable tables and figures from finished runs. No MPI.

    python -m mpidd.report runs/NAME                           # print the run's table again
    python -m mpidd.report runs/A runs/B --out reports/AB      # report.md + PNG figures

--out writes REPORT_DIR/report.md: for each run its table, a test image with the subdomain
boxes, training curves, the accuracies of every model and combiner, per-rank phase times, the
CNN-DNN's test confusion matrix and, for --mode width, time-to-accuracy curves;
given several runs, first the papers' table across them (one row per run: decomposition, local
CNNs min/max, average, vote, CNN-DNN, coherent from random weights, transfer learning, global).
Dense runs (--task regress or segment): each model's scores, and for each model the input,
target, prediction and error of a few test samples with the subdomain grid; given several, a
table of each model's test MAE or mean IoU across them.
"""

from __future__ import annotations

import json
import os
import sys

from ..coherent_model import NAMES as COHERENT_NAMES


def _pct(x):
    return "-" if x is None else f"{100 * x:6.2f}%"


def _int(x):
    return "-" if x is None else f"{x:,}"


def _sec(x):
    return "-" if x is None else f"{x:8.1f}"


def _precision(results: dict) -> str:
    p = results.get("precision", "32")
    return "" if p == "32" else f", precision {p}"


def format_table(results: dict) -> str:
    d = results["decomposition"]
    rule = "-" * 92
    lines = [f"mpidd: grid {d['grid']} overlap {d['overlap']} on {results['data']} "
             f"({d['image_shape']} -> subimages {d['subimage_shape']}), {results.get('arch', 'vgg')}, "
             f"{results['world_size']} ranks x {results['threads_per_rank']} threads{_precision(results)}",
             f"{'model':<30}{'params':>12}{'val acc':>10}{'test acc':>10}{'critical CPU s':>16}"
             f"{'total CPU s':>14}",
             rule]
    for row in results["models"]:
        lines.append(f"{row['name']:<30}{_int(row.get('params')):>12}{_pct(row.get('val_acc')):>10}"
                     f"{_pct(row.get('test_acc')):>10}{_sec(row.get('cpu_s')):>16}"
                     f"{_sec(row.get('total_cpu_s')):>14}")
    lines += [rule, "critical CPU s: max over ranks of the CPU seconds of the phases a model needs, in order "
                    "(a local CNN: its own; a coherent model: a lower bound, its ranks wait for each other "
                    "every step; the global CNN: what one process would spend, its ranks' CPU seconds summed)"]
    t = results.get("timing", {})
    cp = t.get("critical_path")
    if cp:
        lines.append(f"two-level critical path: {cp['cpu_s']:.1f} CPU s = slowest rank {cp['slowest_rank']} "
                     f"load+local {cp['local_cpu_s']:.1f} (probabilities {cp.get('probabilities_cpu_s', 0.0):.1f}) "
                     f"+ gather {cp['gather_cpu_s']:.2f} "
                     f"+ coarse {cp['coarse_cpu_s']:.1f}  (wall {cp['wall_s']:.1f} s)")
    g = t.get("global_train_cpu_s")
    if g is not None:
        line = f"global CNN training: {g:.1f} CPU s"
        if t.get("global_ranks", 1) > 1:
            line += (f" summed over {t['global_ranks']} ranks, data parallel (one process's equivalent; rank 0: "
                     f"{t.get('global_train_cpu_s_rank0', g):.1f} CPU s, {t['global_train_wall_s']:.1f} s wall)")
        else:
            n = t.get("global_threads", results["threads_per_rank"])
            line += (f" on rank 0 alone with {n} thread{'s' if n > 1 else ''}"
                     f"{' (its node’s cores: the other ranks waited)' if n > results['threads_per_rank'] else ''}"
                     f", {t['global_train_wall_s']:.1f} s wall")
        if cp:
            line += f"  =  {g / cp['cpu_s']:.1f}x the two-level critical path"
        lines.append(line)
    for init, name in COHERENT_NAMES.items():
        c = t.get(f"coherent_{init}")
        if c:
            lines.append(f"{name}: {c['steps']} steps of batch {c['batch_size']}, "
                         f"{max(c['step_ms_per_rank']):.1f} ms/step; exchange (gather + scatter) at most "
                         f"{max(c['exchange_ms_per_step_per_rank']):.2f} ms/step = "
                         f"{100 * c['exchange_fraction_max']:.1f}% of a step's wall time (waits for other "
                         f"ranks included), {100 * c.get('exchange_cpu_fraction_max', 0):.2f}% of its CPU time")
    return "\n".join(lines)


def format_width_table(results: dict) -> str:
    """The table of --mode width: each sub-network, the recomposed network before and after
    further training, the global CNN from random init; then time to the target accuracy."""
    w = results["width"]
    rule = "-" * 100
    lines = [f"mpidd width decomposition: {results['arch']} of width {w['global_width']} split into "
             f"{w['subnets']} sub-networks of width {w['subnet_width']} "
             f"({'disjoint shards' if w['shard'] else 'full training set each'}, off-diagonal "
             f"{'noise ' + str(w['offdiag_noise']) if w['offdiag_noise'] else 'zero'}) on {results['data']}, "
             f"{results['world_size']} ranks x {results['threads_per_rank']} threads{_precision(results)}",
             f"{'model':<34}{'params':>10}{'val acc':>10}{'test acc':>10}{'test loss':>11}"
             f"{'critical CPU s':>15}{'total CPU s':>12}",
             rule]
    for row in results["models"]:
        loss = row.get("test_loss")
        lines.append(f"{row['name']:<34}{_int(row.get('params')):>10}{_pct(row.get('val_acc')):>10}"
                     f"{_pct(row.get('test_acc')):>10}{'-' if loss is None else f'{loss:.4f}':>11}"
                     f"{_sec(row.get('cpu_s')):>15}{_sec(row.get('total_cpu_s')):>12}")
    lines += [rule, "critical CPU s: sub-network: its own training; recomposed: max over ranks (load + "
                    "sub-networks) + gather + recompose (+ training); random init: load + training"]
    b = results["loss_bound"]
    lines.append(f"loss bound: recomposed test loss {b['recomposed_test_loss']:.4f} "
                 f"{'<=' if b['holds'] else '>'} mean of the sub-networks' {b['mean_subnet_test_loss']:.4f}"
                 + ("" if b.get("applies", True) else "  (not guaranteed: --offdiag-noise > 0)"))
    t = results["time_to_target"]

    def reached(x):
        return "not reached" if x is None else f"{x['cpu_s']:.1f} CPU s (epoch {x['epoch']:.2f})"
    line = (f"time to {100 * t['target_test_acc']:.1f}% test accuracy: recomposed {reached(t['recomposed'])}, "
            f"random init {reached(t['global_random_init'])}")
    if t["ratio"] is not None:
        line += f"  ->  ratio {t['ratio']:.2f}"
    lines.append(line)
    return "\n".join(lines)


DENSE_TASKS = ("regress", "segment")
# the test scores a dense run's tables show, by task (the first is also shown for val)
DENSE_SCORES = {"regress": ("mae", "rel_l2", "ssim"), "segment": ("miou", "mean_dice", "pixel_acc")}


def format_dense(results) -> str:
    """The table a dense run prints: each model's test scores (and val's main one)."""
    keys = DENSE_SCORES[results["task"]]
    lines = [f"{'model':<30}{'val ' + keys[0]:>12}" + "".join(f"{'test ' + k:>16}" for k in keys)]
    for name, m in results["metrics"].items():
        lines.append(f"{name:<30}{m['val'][keys[0]]:>12.5f}" + "".join(f"{m['test'].get(k, float('nan')):>16.5f}"
                                                                       for k in keys))
    t = results["timing"]
    if "critical_path" in t:
        cp = t["critical_path"]
        lines.append(f"critical path {cp['cpu_s']:.1f} CPU s (slowest rank's local U-Nets {cp['local_cpu_s']:.1f} + "
                     f"gather + coarse {cp['coarse_cpu_s']:.1f})"
                     + (f"; global U-Net {t['global_train_cpu_s']:.1f} CPU s" if "global_train_cpu_s" in t else ""))
    return "\n".join(lines)


def dense_models_table(r: dict) -> str:
    """A dense run's scores per model as markdown (val: the main score; test: each)."""
    keys = DENSE_SCORES[r["task"]]
    lines = [f"| model | val {keys[0]} | " + " | ".join(f"test {k}" for k in keys) + " |",
             "|" + " --- |" * (2 + len(keys))]
    for name, m in r["metrics"].items():
        lines.append(f"| {name} | {m['val'][keys[0]]:.5f} | " + " | ".join(
            f"{m['test'][k]:.5f}" if k in m["test"] else "-" for k in keys) + " |")
    return "\n".join(lines)


def dense_comparison_table(named: list) -> str:
    """Dense runs side by side: each model's main test score (MAE or mean IoU) per run."""
    names = list(dict.fromkeys(m for _, r in named for m in r["metrics"]))
    lines = ["| run | task | grid | " + " | ".join(names) + " |", "|" + " --- |" * (3 + len(names))]
    for run, r in named:
        key = DENSE_SCORES[r["task"]][0]
        cells = [f"{r['metrics'][m]['test'][key]:.5f}" if m in r["metrics"] else "-" for m in names]
        lines.append(f"| {run} | {r['task']} (test {key}) | {r['decomposition']['grid']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_any(results: dict) -> str:
    if results.get("task") in DENSE_TASKS:
        return format_dense(results)
    return format_width_table(results) if results.get("mode") == "width" else format_table(results)


COMPARISON = (("average", "average"), ("vote", "vote"), ("CNN-DNN", "cnn_dnn"), ("coherent", "coherent_random"),
              ("transfer", "coherent_pretrained"), ("global", "global"), ("width recomposed", "recomposed"))


def comparison_table(named: list) -> str:
    """The papers' table across runs, test accuracy in %: [(run name, results), ...] -> markdown.
    Columns by model kind; global: the global CNN (in width runs: from random init)."""
    head = "| run | decomposition | locals min | locals max | " + " | ".join(c for c, _ in COMPARISON) + " |"
    lines = [head, "|" + " --- |" * (4 + len(COMPARISON))]
    for name, r in named:
        d = r.get("decomposition", {})
        models = r.get("models", [])
        locals_ = [m["test_acc"] for m in models if m.get("kind") == "local"]
        acc = {m.get("kind"): m.get("test_acc") for m in models}
        cells = [f"{100 * min(locals_):.2f}" if locals_ else "-", f"{100 * max(locals_):.2f}" if locals_ else "-"]
        cells += [f"{100 * acc[kind]:.2f}" if acc.get(kind) is not None else "-" for _, kind in COMPARISON]
        if d:
            where = f"{d.get('grid', '-')} overlap {d.get('overlap', '-')}, {r.get('arch', 'vgg')}{_precision(r)}"
        elif r.get("mode") == "width":
            w = r.get("width", {})
            where = (f"width: {w.get('subnets')} sub-networks of {w.get('global_width')}, {r.get('arch', 'vgg')}"
                     f"{_precision(r)}")
        else:
            where = r.get("mode")
        lines.append(f"| {name} | {where} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def models_table(r: dict) -> str:
    lines = ["| model | parameters | val acc (%) | test acc (%) |", "| --- | --- | --- | --- |"]
    for m in r.get("models", []):
        val, test = m.get("val_acc"), m.get("test_acc")
        lines.append(f"| {m['name']} | {_int(m.get('params'))} | {'-' if val is None else f'{100 * val:.2f}'} | "
                     f"{'-' if test is None else f'{100 * test:.2f}'} |")
    return "\n".join(lines)


def confusion_table(r: dict) -> str:
    """The CNN-DNN's test confusion counts as markdown (rows: true class); '' without one."""
    c = r.get("confusion")
    if not c:
        return ""
    names = r.get("classes") or [str(k) for k in range(len(c["counts"]))]
    lines = ["| true \\ predicted | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    lines += [f"| {name} | " + " | ".join(str(n) for n in row) + " |" for name, row in zip(names, c["counts"])]
    return "\n".join(lines)


def load_results(path: str) -> dict:
    path = path.rstrip("/")
    with open(path if path.endswith(".json") else os.path.join(path, "results.json")) as f:
        return json.load(f)


def write_report(runs: list, out: str) -> str:
    """REPORT_DIR/report.md and its figures for the run directories `runs`; returns report.md's path."""
    from .. import figures
    os.makedirs(out, exist_ok=True)
    named = [(os.path.basename(os.path.normpath(run_dir)), load_results(run_dir)) for run_dir in runs]
    classify = [(name, r) for name, r in named if r.get("task") not in DENSE_TASKS]
    dense = [(name, r) for name, r in named if r.get("task") in DENSE_TASKS]
    parts = ["# mpidd report", ""]
    if len(classify) > 1:
        parts += ["## Test accuracy across runs (%)", "", comparison_table(classify), ""]
        for kind, title, draw in (
                ("accuracy_against_N", "Test accuracy against the number of subdomains",
                 lambda p: figures.accuracy_against_subdomains(classify, p)),
                ("speedup_against_N", "Two-level critical path against the global CNN, with the FLOP limit",
                 lambda p: figures.speedup_against_subdomains(classify, p))):
            if draw(os.path.join(out, f"runs_{kind}.png")):
                parts += [f"![{title}](runs_{kind}.png)", ""]
    if len(dense) > 1:
        parts += ["## Dense prediction across runs", "", dense_comparison_table(dense), ""]
    for (name, r), run_dir in zip(named, runs):
        parts += [f"## {name}", "", f"`{os.path.abspath(run_dir)}`: mode {r.get('mode')}, {r.get('world_size')} ranks, "
                                    f"data `{r.get('data')}`", ""]
        parts += ([f"--task {r['task']}, loss {r.get('loss')}", "", dense_models_table(r), ""]
                  if r.get("task") in DENSE_TASKS else [models_table(r), ""])
        for kind, title, draw in figure_list(r, run_dir):
            file = f"{name}_{kind}.png"
            if draw(os.path.join(out, file)):
                parts += [f"![{title}]({file})", ""]
            if kind == "confusion" and r.get("confusion"):
                parts += [f"{r['confusion']['model']} on {r['confusion']['split']}, counts:", "",
                          confusion_table(r), ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def figure_list(r: dict, run_dir: str) -> list:
    """[(file kind, title, draw(path) -> path or None)] of one run's figures."""
    from .. import figures
    if r.get("task") in DENSE_TASKS:
        return [(f"predictions_{dataset.split('/')[-1]}", f"{model}: test input, target, prediction and error",
                 lambda p, dataset=dataset, model=model: figures.dense_predictions(run_dir, r, dataset, model, p))
                for model, dataset in r.get("predictions", {}).get("datasets", {}).items()] + [
            ("curves", "Training curves", lambda p: figures.training_curves(run_dir, p, r["task"])),
            ("phases", "Phase times per rank", lambda p: figures.phase_times(r, p))]
    return [("decomposition", "Subdomains", lambda p: figures.sample_image(r, p)),
            ("subdomain_accuracy", "Test accuracy of each subdomain's local CNN",
             lambda p: figures.subdomain_heat_map(r, p)),
            ("curves", "Training curves", lambda p: figures.training_curves(run_dir, p)),
            ("accuracy", "Accuracy of every model", lambda p: figures.accuracies(r, p)),
            ("phases", "Phase times per rank", lambda p: figures.phase_times(r, p)),
            ("confusion", "Confusion matrix of the CNN-DNN (test)", lambda p: figures.confusion(r, p)),
            ("time_to_accuracy", "Time to accuracy", lambda p: figures.time_to_accuracy(r, p))]


def write_run_report(run_dir: str):
    """The end of a run: RUN/report/report.md; a failure to draw costs a warning, not the run."""
    try:
        return write_report([run_dir], os.path.join(run_dir, "report"))
    except Exception as e:  # the results are written: a figure must not fail the run
        print(f"mpidd: warning: no report ({type(e).__name__}: {e}); python -m mpidd.report {run_dir} --out DIR "
              f"tries again", file=sys.stderr, flush=True)
        return None


def main(argv=None):
    import argparse
    from .arguments import add_version, prog
    p = argparse.ArgumentParser(prog=prog("mpidd.report"), description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version(p)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run directories (or results.json files)")
    p.add_argument("--out", metavar="REPORT_DIR", help="write report.md and PNG figures there instead of printing")
    args = p.parse_args(argv)
    try:
        if args.out:
            print(f"report: {write_report(args.runs, args.out)}")
        else:
            print("\n\n".join(format_any(load_results(run_dir)) for run_dir in args.runs))
    except (OSError, ValueError, KeyError) as e:
        print(f"mpidd.report: error: {e}", file=sys.stderr)
        return 2
    return 0
