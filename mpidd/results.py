"""results.json of a run, from every rank's gathered phase timings and rank 0's scores. No MPI.

Every model's `cpu_s` is its critical path (the max over ranks of the CPU seconds of the
phases it needs, in order) and `total_cpu_s` the CPU seconds summed over ranks.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np

from . import __version__
from .coherent_model import NAMES as COHERENT_NAMES
from .decomposition import format_grid, rank_of_subdomain


def seconds(stats, kind, *names):
    """Sum of `kind` ("cpu_s" or "wall_s") over phases `names` of one rank's gathered stats."""
    return sum(stats["phases"].get(n, {}).get(kind, 0.0) for n in names)


def assemble_results(args, plan, all_stats, acc, size, threads, versions) -> dict:
    """results.json. Every model's `cpu_s` is its critical path (max over ranks of the CPU
    seconds of the phases it needs, in order) and `total_cpu_s` the sum over ranks."""
    info, dec = plan.info, plan.decomposition
    N = dec.num_subdomains

    def critical(*names):
        return max(seconds(st, "cpu_s", *names) for st in all_stats)

    def total(*names):
        return sum(seconds(st, "cpu_s", *names) for st in all_stats)

    models, timing = [], {}
    composite_params = N * plan.local_params + plan.dnn_params
    if "cnn_dnn" in acc:
        owner = {i: st["rank"] for st in all_stats for i in st["subdomains"]}
        for i in range(N):  # cpu_s: training + probabilities of this subdomain's CNN
            cpu = seconds(all_stats[owner[i]], "cpu_s", f"subdomain_{i}")
            models.append({"name": f"local {i} {dec.coords(i)}", "kind": "local", "subdomain": i,
                           "rank": owner[i], "params": plan.local_params, "cpu_s": cpu, "total_cpu_s": cpu,
                           **_accs(acc["local"][i])})
        local_cpu = [seconds(st, "cpu_s", "load", "local") for st in all_stats]
        slowest = int(np.argmax(local_cpu))
        gather_cpu = critical("gather")
        coarse_cpu = seconds(all_stats[0], "cpu_s", "coarse")
        combiners = {"cpu_s": local_cpu[slowest] + gather_cpu, "total_cpu_s": total("load", "local", "gather")}
        models.append({"name": "average", "kind": "average", **combiners, **_accs(acc["average"])})
        models.append({"name": "majority vote", "kind": "vote", **combiners, **_accs(acc["vote"])})
        timing["critical_path"] = {
            "cpu_s": local_cpu[slowest] + gather_cpu + coarse_cpu,
            "wall_s": max(seconds(st, "wall_s", "load", "local") for st in all_stats)
                      + max(seconds(st, "wall_s", "gather") for st in all_stats)
                      + seconds(all_stats[0], "wall_s", "coarse"),
            "slowest_rank": slowest, "local_cpu_s": local_cpu[slowest],
            "probabilities_cpu_s": seconds(all_stats[slowest], "cpu_s", "probabilities"),
            "gather_cpu_s": gather_cpu, "coarse_cpu_s": coarse_cpu,
            "definition": "max over ranks of (load + local) + gather + coarse; CPU = process time; "
                          "probabilities: the part of that rank's local phase spent on its local CNNs' class "
                          "probabilities of every split (what the coarse DNN needs)"}
        timing["total_cpu_s_twolevel"] = total("load", "local", "gather") + coarse_cpu
        models.append({"name": "CNN-DNN", "kind": "cnn_dnn", "params": composite_params,
                       "dnn_params": plan.dnn_params, "cpu_s": timing["critical_path"]["cpu_s"],
                       "total_cpu_s": timing["total_cpu_s_twolevel"], **_accs(acc["cnn_dnn"])})
    for init, name in COHERENT_NAMES.items():
        if f"coherent_{init}" not in acc:
            continue
        phase = f"coherent_{init}"
        if init == "pretrained" and "critical_path" in timing:  # after this run's local + coarse phases
            cpu, cpu_total = (timing["critical_path"]["cpu_s"] + critical(phase),
                              timing["total_cpu_s_twolevel"] + total(phase))
        else:  # from random weights, or from an earlier run's (--from) checkpoints
            cpu, cpu_total = critical("load", phase), total("load", phase)
        per_rank = [st["coherent"][init] for st in all_stats]
        timing[phase] = {
            "critical_path_cpu_s": cpu, "total_cpu_s": cpu_total,
            "phase_wall_s": max(seconds(st, "wall_s", phase) for st in all_stats),
            "steps": per_rank[0]["steps"], "batch_size": args.batch_size,
            "exchange_fraction_max": max(t["exchange_fraction"] for t in per_rank),
            "exchange_cpu_fraction_max": max(t["exchange_cpu_fraction"] for t in per_rank),
            **{f"{name}_per_rank": [t[key] for t in per_rank] for name, key in (
                ("exchange_fraction", "exchange_fraction"), ("exchange_cpu_fraction", "exchange_cpu_fraction"))},
            **{f"{name}_per_rank": [scale * t[key] / t["steps"] for t in per_rank] for name, key, scale in (
                ("exchange_ms_per_step", "exchange_s", 1e3), ("exchange_cpu_ms_per_step", "exchange_cpu_s", 1e3),
                ("step_ms", "step_s", 1e3), ("step_cpu_ms", "step_cpu_s", 1e3),
                ("bytes_per_step", "exchange_bytes", 1))},
            "definition": "exchange_fraction: wall time in the gather of local outputs and the scatter of "
                          "their gradients, waits for slower ranks included, / wall time of the training "
                          "steps; exchange_cpu_fraction: the same with CPU (process) time, which the "
                          "sleeping waits do not use"}
        if init == "pretrained":
            timing[phase]["pretrained_from"] = args.from_run or "this run"
        models.append({"name": name, "kind": phase, "params": composite_params, "cpu_s": cpu,
                       "total_cpu_s": cpu_total, **_accs(acc[phase])})
    if "global" in acc:
        # rank 0 alone (--global-alone, or one rank), or data parallel over every rank: then the
        # CPU seconds one process would spend are every rank's summed (the same model, batches and
        # steps, each rank a share of every batch; the gradient sums' cost included)
        trained = [st for st in all_stats if "global_train" in st["phases"]]
        g = all_stats[0]["phases"]["global_train"]
        timing["global_ranks"] = len(trained)
        timing["global_threads"] = all_stats[0].get("global_threads") or threads
        timing["global_train_cpu_s"] = sum(st["phases"]["global_train"]["cpu_s"] for st in trained)
        timing["global_train_cpu_s_rank0"], timing["global_train_wall_s"] = g["cpu_s"], g["wall_s"]
        cpu = sum(seconds(st, "cpu_s", "global_load", "global_train", "global_eval") for st in trained)
        models.append({"name": "global CNN", "kind": "global", "params": plan.global_params,
                       "cpu_s": cpu, "total_cpu_s": cpu, "ranks": len(trained),
                       "cpu_s_rank0": seconds(all_stats[0], "cpu_s", "global_load", "global_train", "global_eval"),
                       **_accs(acc["global"])})
        if "critical_path" in timing:
            timing["global_over_critical_path"] = timing["global_train_cpu_s"] / timing["critical_path"]["cpu_s"]
    return {
        **common_results(args, plan, all_stats, size, threads, versions),
        "decomposition": {"grid": format_grid(dec.grid), "overlap": dec.overlap,
                          "image_shape": format_grid(info.spatial_shape),
                          "subimage_shape": format_grid(dec.subimage_shape),
                          "num_subdomains": N, "boxes": dec.boxes(),
                          "rank_of_subdomain": ([rank_of_subdomain(i, size) for i in range(N)]
                                                if plan.work.boxes else [])},
        "width_factor": plan.width_factor,
        "accuracy": {m["name"]: {"val": m.get("val_acc"), "test": m.get("test_acc")} for m in models},
        "models": models,
        "parameters": {"local": plan.local_params, "global": plan.global_params,
                       "coarse_dnn": plan.dnn_params},
        "timing": timing,
        **({"confusion": {"model": "CNN-DNN", "split": "test", "rows": "true class", "columns": "predicted class",
                          "counts": acc["cnn_dnn_confusion"]}} if "cnn_dnn_confusion" in acc else {}),
    }


def common_results(args, plan, all_stats, size, threads, versions) -> dict:
    """The part of results.json that every mode writes: data, ranks, versions, configuration."""
    info = plan.info
    return {
        "mpidd_version": __version__, "slurm": slurm_job(),
        "data": args.data, "classes": info.classes, "sizes": info.sizes,
        "normalization": getattr(args, "normalization", None),
        "world_size": size, "threads_per_rank": threads, "mode": args.mode,
        "arch": args.arch, "precision": getattr(args, "precision", "32"),
        "per_rank": all_stats,
        "versions": versions,
        "config": {k: v for k, v in vars(args).items() if k not in ("config",)},
    }


def slurm_job(environ=None) -> dict | None:
    """The Slurm job this process runs in: its id and, in a job array, the array's id and this
    task's index (None outside Slurm)."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in env:
        return None
    return {"job_id": env["SLURM_JOB_ID"], "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
            "array_task_id": env.get("SLURM_ARRAY_TASK_ID"), "job_name": env.get("SLURM_JOB_NAME")}


def source_commit(root=None) -> dict | None:
    """The git commit of the checkout mpidd runs from, and whether it had uncommitted changes to
    tracked files other than documentation (*.md, docs/: make docs-figures rewrites them between
    its runs); None for an installed copy (no .git beside the package) or without git."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        def git(*argv):
            return subprocess.run(["git", "-C", root, *argv], capture_output=True, text=True, timeout=20,
                                  check=True).stdout.strip()
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)*.md",
                                  ":(exclude)docs"))}
    except (OSError, subprocess.SubprocessError):
        return None


def time_to_accuracy(history, target, offset=0.0, initial_acc=None):
    """CPU seconds (training steps only, evaluations excluded) until the first point of the
    test-accuracy curve (`--curve-points` per epoch) that reaches `target`, plus `offset`;
    epoch 0 (`offset` alone) if `initial_acc`, the accuracy before training, already does;
    None if no point does."""
    if initial_acc is not None and initial_acc >= target:
        return {"cpu_s": offset, "epoch": 0}
    for point in (p for record in history for p in record["curve"]):
        if point["test_acc"] >= target:
            return {"cpu_s": offset + point["cpu_s"], "epoch": point["epoch"]}
    return None


def assemble_width_results(args, plan, all_stats, scores, size, threads, versions) -> dict:
    """results.json of --mode width. Critical path (`cpu_s`) of the recomposed network: max over
    ranks of (load + its sub-networks' training) + gather + recompose (+ further training); of
    the global CNN from random init: rank 0's load + training. `total_cpu_s` sums over ranks.
    Training includes its per-epoch validation; the final scoring of each model and the
    test-accuracy curve's evaluations are left out."""
    M, root = args.subnets, all_stats[0]
    owner = {m: st["rank"] for st in all_stats for m in st["subdomains"]}
    models = []
    for m in range(M):
        cpu = seconds(all_stats[owner[m]], "cpu_s", f"subnet_{m}")
        models.append({"name": f"subnet {m}", "kind": "subnet", "subnet": m, "rank": owner[m],
                       "params": plan.subnet_params, "cpu_s": cpu, "total_cpu_s": cpu,
                       **_scores(scores["subnets"][m])})
    parallel_cpu = max(seconds(st, "cpu_s", "global_load", "subnets") for st in all_stats)
    gather_cpu = max(seconds(st, "cpu_s", "width_gather") for st in all_stats)
    before = parallel_cpu + gather_cpu + seconds(root, "cpu_s", "recompose")
    total_before = sum(seconds(st, "cpu_s", "global_load", "subnets", "width_gather") for st in all_stats) \
        + seconds(root, "cpu_s", "recompose")
    trained = seconds(root, "cpu_s", "recomposed_train") - seconds(root, "cpu_s", "recomposed_curve")
    global_cpu = seconds(root, "cpu_s", "global_load", "global_train") - seconds(root, "cpu_s", "global_curve")
    # time to the target: training steps only on both sides (no validation, no curve evaluations)
    steps_before = max(seconds(st, "cpu_s", "global_load", "subnet_steps") for st in all_stats) \
        + gather_cpu + seconds(root, "cpu_s", "recompose")
    models.append({"name": "recomposed (before training)", "kind": "recomposed_initial",
                   "params": plan.global_params, "cpu_s": before, "total_cpu_s": total_before,
                   **_scores(scores["recomposed_initial"])})
    models.append({"name": f"recomposed + {args.epochs} epochs", "kind": "recomposed",
                   "params": plan.global_params, "cpu_s": before + trained,
                   "total_cpu_s": total_before + trained, **_scores(scores["recomposed"])})
    models.append({"name": f"global CNN (random init, {args.epochs} ep.)", "kind": "global",
                   "params": plan.global_params, "cpu_s": global_cpu, "total_cpu_s": global_cpu,
                   **_scores(scores["global"])})
    mean_sub_loss = float(np.mean([scores["subnets"][m]["test"][0] for m in range(M)]))
    recomposed_to = time_to_accuracy(scores["recomposed_curve"], args.target_acc, steps_before,
                                     initial_acc=scores["recomposed_initial"]["test"][1])
    global_to = time_to_accuracy(scores["global_curve"], args.target_acc, seconds(root, "cpu_s", "global_load"))
    return {
        **common_results(args, plan, all_stats, size, threads, versions),
        "width": {"subnets": M, "subnet_width": args.width // M, "global_width": args.width,
                  "shard": args.shard, "offdiag_noise": args.offdiag_noise, "subnet_epochs": args.subnet_epochs,
                  "epochs": args.epochs, "transfer_lr": args.transfer_lr, "lr": args.lr,
                  "rank_of_subnet": [owner[m] for m in range(M)]},
        "accuracy": {m["name"]: {"val": m["val_acc"], "test": m["test_acc"]} for m in models},
        "models": models,
        "parameters": {"subnet": plan.subnet_params, "global": plan.global_params},
        "loss_bound": {
            "recomposed_test_loss": scores["recomposed_initial"]["test"][0], "mean_subnet_test_loss": mean_sub_loss,
            "holds": scores["recomposed_initial"]["test"][0] <= mean_sub_loss + 1e-6,
            "applies": args.offdiag_noise == 0,  # noise in the off-diagonal blocks breaks the mean-logit identity
            "statement": "cross-entropy is convex in the logits and the recomposed logits are the mean of "
                         "the sub-networks' logits (zero off-diagonal blocks), so the recomposed loss is at "
                         "most the mean of the sub-networks' losses"},
        "time_to_target": {
            "target_test_acc": args.target_acc, "recomposed": recomposed_to, "global_random_init": global_to,
            "recomposed_start_cpu_s": steps_before,
            "ratio": (recomposed_to["cpu_s"] / global_to["cpu_s"]) if recomposed_to and global_to else None,
            "curves": {name: [{k: p[k] for k in ("epoch", "cpu_s", "test_acc")}
                              for r in scores[f"{name}_curve"] for p in r["curve"]]
                       for name in ("recomposed", "global")},
            "definition": "critical-path CPU seconds until the first point of the test-accuracy curve "
                          "(--curve-points per epoch) that reaches the target: recomposed = max over ranks "
                          "(load + sub-network training steps) + gather + recompose (recomposed_start_cpu_s) "
                          "+ its training steps "
                          "(epoch 0: the recomposed network before training); random init = load + its "
                          "training steps. Evaluations (validation, curve) are left out on both sides"},
    }


def _scores(d):
    """{split: (loss, accuracy)} -> the table's columns."""
    return {"val_acc": d["val"][1], "test_acc": d["test"][1], "val_loss": d["val"][0], "test_loss": d["test"][0]}


def _accs(d):
    return {"val_acc": d["val"], "test_acc": d["test"]}
