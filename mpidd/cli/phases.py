"""The phases of a mpidd.train run, in order (every_phase): load (each rank reads only its
boxes), local, gather, coarse (methods.twolevel), coherent_random / coherent_pretrained
(methods.coherent), global (methods.global_cnn), or --mode width's (methods.width); each wraps
its method with the run's timing, checkpoints and metric rows."""

from __future__ import annotations

import os
import sys

import torch

from .. import data, parallel, rundir, saved, stream
from ..engine import Shard
from ..methods import coherent, global_cnn, twolevel, width
from ..models import CoarseDNN, build_cnn
from ..options import cnn_config, coherent_config, global_options, twolevel_config, width_config
from .arguments import NOT_RECORDED
from .plan import data_share, load_pretrained_checkpoint, load_pretrained_weights
from .run import EXIT_USAGE, Run, refuse


def read_split(run: Run, split: str, slices, check: bool = True) -> tuple[Shard, int]:
    """One split inside `slices`: all samples, or this rank's share in a data-parallel group.
    Memory access reads the images now; stream access makes a stream.BoxStream of them and, with
    `check`, reads them once in blocks to refuse NaN and inf before any training (phase "check").
    Returns (the Shard, bytes read now)."""
    ctx = run.ctx
    n = run.plan.info.sizes[split]
    rows = ctx.group.share(n) if ctx.group is not None else None
    if run.access == "stream":
        x = stream.BoxStream(run.args.data, split, slices, range(*rows) if rows else None, stats=run.io)
        y = data.load_split_labels(run.args.data, split, rows)
        nbytes = 0
        if check:
            with ctx.timer("check"):
                nbytes = stream.check_finite(x, block=run.args.read_block)
        return Shard(x, y, rows[0] if rows else 0, n), nbytes + y.nbytes
    x, y, nbytes = data.load_split(run.args.data, split, slices, block=run.args.read_block, rows=rows)
    return Shard(x, y, rows[0] if rows else 0, n), nbytes


def share_bytes(run: Run) -> int:
    """What this rank's data takes in memory (plan.data_share)."""
    ctx = run.ctx
    return data_share(run.plan, run.args, ctx.mine, ctx.group.size if ctx.group is not None else None,
                      run.global_ranks)


def load_local_data(run: Run):
    """Phase load: read this rank's subimage boxes (train/val/test, its share of the samples in
    a data-parallel group) and nothing else; streamed, check them (phase check) and keep streams.

    All of the rank's subdomains are read (or checked) before any training, so bad data (NaN,
    inf) is refused before training starts; memory is this rank's share of the data set, or,
    streamed, the batches in flight.
    """
    dec = run.plan.decomposition
    subsets, bytes_read = {}, 0
    with run.ctx.timer("load"):
        for i in run.ctx.mine:
            subsets[i] = {}
            for s in data.SPLITS:
                subsets[i][s], nbytes = read_split(run, s, dec.slices(i))
                bytes_read += nbytes
    return subsets, bytes_read


def load_whole_images(run: Run, check: bool = True):
    """Every split's whole images (this rank's share of the samples if data parallel)."""
    whole = tuple(slice(0, s) for s in run.plan.info.spatial_shape)
    split, nbytes = {}, 0
    with run.ctx.timer("global_load"):
        for s in data.SPLITS:
            split[s], n = read_split(run, s, whole, check=check)
            nbytes += n
    return split, nbytes


def load_or_refuse(run: Run, load):
    """Every rank loads; a DataError anywhere (e.g. NaN in one rank's box) refuses on every rank."""
    ctx = run.ctx
    result, error = None, None
    try:
        result = load()
    except data.DataError as e:
        error = str(e)
    failed = parallel.agree(ctx.comm, error)
    if failed and ctx.master_process:
        refuse(f"{failed[1]} (found by rank {failed[0]})" if ctx.comm.Get_size() > 1 else failed[1])
    elif failed:
        sys.exit(EXIT_USAGE)
    return result


def load_local_models(run: Run):
    """The trained local CNNs of this rank, from their checkpoints (the gather is done)."""
    ctx = run.ctx
    info, dec, args = run.plan.info, run.plan.decomposition, run.args
    models, rows = {}, []
    for i in ctx.mine:
        saved = rundir.load_checkpoint(run.directory.path(rundir.local_checkpoint(i)))
        model = build_cnn(info.channels, info.num_classes, dec.subimage_shape, cnn_config(args),
                          run.plan.width_factor)
        model.load_state_dict(saved["model"])
        models[i] = ctx.on_device(model)
        if ctx.leader:
            rows += [dict(r, model=f"local_{i}") for r in saved["loop"]["history"]]
    return models, rows


def gather_phase(run: Run, probs, subsets):
    """Phase gather: every subdomain's probabilities to rank 0, (n, N*K) per split, saved there."""
    ctx = run.ctx
    with ctx.timer("gather"):
        gathered = twolevel.gather_to_coarse(ctx, probs, subsets, run.plan.decomposition.num_subdomains,
                                             run.plan.info.num_classes, run.plan.info.sizes)
    if ctx.master_process:
        rundir.save_arrays(run.directory.path(rundir.PROBABILITIES), **gathered)
    return gathered


def coarse_phase(run: Run, gathered, labels):
    """Rank 0: coarse DNN (selected on val), average and vote on the gathered probabilities."""
    N, K = run.plan.decomposition.num_subdomains, run.plan.info.num_classes
    cfg = twolevel_config(run.args)
    dnn, history = twolevel.fit_coarse(run.ctx, gathered, labels, N, K, cfg)
    acc = twolevel.accuracies(dnn, gathered, labels, N, K, stop=run.stops.poll)
    return acc, [dict(r, model="coarse_dnn") for r in history], dnn


def load_pretrained(run: Run):
    """--from RUN_DIR: this rank's trained local CNNs (and, on rank 0, the coarse DNN)."""
    ctx = run.ctx
    args, info, dec = run.args, run.plan.info, run.plan.decomposition
    src, C, K = args.from_run, info.channels, info.num_classes

    def pretrained(model, name):
        return load_pretrained_weights(model, load_pretrained_checkpoint(src, name), src, name).to(ctx.device)
    local = {i: pretrained(build_cnn(C, K, dec.subimage_shape, cnn_config(args), run.plan.width_factor),
                           rundir.local_checkpoint(i)) for i in ctx.mine}
    dnn = None
    if ctx.master_process and args.dnn_init == "coarse":
        dnn = pretrained(CoarseDNN(dec.num_subdomains * K, K, args.coarse_hidden, args.coarse_dropout),
                         rundir.COARSE_CHECKPOINT)
    return {"local": local, "dnn": dnn}


def coherent_phase(run: Run, init, subsets, labels, exchange, pretrained):
    """The CNN-DNN trained as one model parallel model: from random weights, or from the
    pre-trained local CNNs (transfer learning) and the coarse DNN (--dnn-init coarse).

    Collective: every rank takes part, and agrees on stops step by step. Every epoch each rank
    saves its part (local CNNs, optimizer, rank 0: DNN), then, once all have, rank 0 records
    the position in the marker. Returns (accuracies on rank 0 else None, metric rows, timing
    of the training steps and their exchange)."""
    ctx = run.ctx
    args, plan = run.args, run.plan
    info, dec = plan.info, plan.decomposition
    N, K = dec.num_subdomains, info.num_classes
    name, cfg = f"coherent_{init}", coherent_config(args, init)
    start = None
    if init == "pretrained":
        start = {"local": pretrained["local"], "dnn": pretrained["dnn"] if args.dnn_init == "coarse" else None}
    local, dnn = coherent.initial_models(ctx, dec, info.channels, K, plan.width_factor, cnn_config(args), cfg,
                                         start)
    history, optimizer, timing = coherent.fit_coherent(ctx, name, local, dnn, subsets, labels, cfg, exchange)
    test = coherent.score(ctx, local, dnn, subsets, labels["test"], cfg, exchange)
    for i, model in local.items() if ctx.leader else ():  # (the members of a group hold the same weights)
        rundir.save_checkpoint(run.directory.path(rundir.coherent_local_checkpoint(name, i)),
                               model=model.state_dict(), epoch=cfg.opts.epochs, subdomain=i, box=dec.box(i),
                               width_factor=plan.width_factor, exchange=args.exchange, args=vars(args))
    rundir.save_checkpoint(run.directory.path(rundir.coherent_optimizer_checkpoint(name, ctx.rank)),
                           optimizer=optimizer.state_dict(), subdomains=sorted(local), epoch=cfg.opts.epochs)
    if not ctx.master_process:
        return None, [], timing
    rundir.save_checkpoint(run.directory.path(rundir.coherent_dnn_checkpoint(name)), model=dnn.state_dict(),
                           in_features=N * K, num_classes=K, hidden=list(args.coarse_hidden),
                           dropout=args.coarse_dropout, exchange=args.exchange, epoch=cfg.opts.epochs,
                           args=vars(args))
    acc = {"val": history[-1]["val_acc"], "test": test[1]}
    return acc, [dict(r, model=name) for r in history], timing


def global_phase(run: Run, split, test=False, alone=True):
    """The global CNN on whole images, same family and options as the local CNNs (rank 0 alone,
    or data parallel over every rank, ctx.group). Returns ({split: accuracy}, metric rows),
    or with `test` ({split: (loss, accuracy)}, metric rows, history with its test-accuracy curve)."""
    ctx = run.ctx
    args, info, timer = run.args, run.plan.info, ctx.timer
    with timer("global_train"):
        model, history = global_cnn.fit_global(ctx, split, info.channels, info.num_classes, info.spatial_shape,
                                               cnn_config(args), global_options(args), args.seed, test=test,
                                               alone=alone)
    if test:
        timer.add("global_curve", *curve_seconds(history))
    with timer("global_eval"):
        scores = global_cnn.scores(ctx, model, split, args.eval_batch_size, alone=alone)
    rows = [dict(r, model="global") for r in history] if ctx.leader else []
    if test:
        return scores, rows, history
    return {s: acc for s, (_, acc) in scores.items()}, rows


def curve_seconds(history):
    """(wall, CPU) seconds of the test-accuracy curve's evaluations in a training history."""
    return (sum(r.get("curve_seconds", 0.0) for r in history), sum(r.get("curve_cpu_seconds", 0.0) for r in history))


def width_phases(run: Run, whole):
    """--mode width (Gu, Zhang, Liu & Cai 2022): sub-networks in parallel, their weights
    gathered to rank 0 and recomposed into the global CNN, which is trained further; then
    the same global CNN from random weights for comparison (rank 0; the others wait).
    Collective. Returns (scores on rank 0 else None, metric rows)."""
    ctx = run.ctx
    args, info, timer, cfg = run.args, run.plan.info, ctx.timer, width_config(run.args)
    C, K, shape = info.channels, info.num_classes, info.spatial_shape
    run.begin("subnets")
    states, sub_scores, histories = width.fit_subnets(ctx, whole, C, K, shape, cfg)
    rows = [dict(r, model=f"subnet_{m}") for m, h in histories.items() for r in h]
    run.stops.sync()  # so that width_gather times the exchange, not the slowest rank
    with timer("width_gather"):
        states, sub_scores = width.gather_subnets(ctx, states, sub_scores)
    run.begin("recomposed")
    if not ctx.master_process:
        return None, rows
    scores = {"subnets": sub_scores}
    with timer("recompose"):
        model = width.recompose(ctx, states, C, K, shape, cfg)
    rundir.save_checkpoint(run.directory.path(rundir.RECOMPOSED_INITIAL_CHECKPOINT), model=model.state_dict(),
                           subnets=cfg.subnets, offdiag_noise=args.offdiag_noise, epoch=0, args=vars(args))
    with timer("recomposed_initial_eval"):
        scores["recomposed_initial"] = global_cnn.scores(ctx, model, whole, args.eval_batch_size)
    with timer("recomposed_train"):
        history = width.fit_recomposed(ctx, model, whole, cfg, test=True)
    timer.add("recomposed_curve", *curve_seconds(history))
    with timer("recomposed_eval"):
        scores["recomposed"] = global_cnn.scores(ctx, model, whole, args.eval_batch_size)
    scores["recomposed_curve"] = history
    rows += [dict(r, model="recomposed") for r in history]
    acc, global_rows, history = global_phase(run, whole, test=True)
    scores["global"], scores["global_curve"] = acc, history
    return scores, rows + global_rows


def every_phase(run: Run, subsets, whole):
    """Every phase of this run, in order. Returns (accuracies on rank 0, metric rows, coherent timing)."""
    ctx = run.ctx
    args, plan, work = run.args, run.plan, run.plan.work
    N, K = plan.decomposition.num_subdomains, plan.info.num_classes
    rows, accuracies, coherent_timing, pretrained = [], {}, {}, None
    if work.width:
        accuracies, rows = width_phases(run, whole)
        return accuracies, rows, coherent_timing
    if work.boxes and ctx.group is not None:  # each rank holds a share: the labels of every sample
        labels = data.load_labels(args.data)
    else:
        labels = {s: subsets[ctx.mine[0]][s].y for s in data.SPLITS} if subsets else None
    if args.from_run is not None:  # rank 0 has checked that they fit (plan_run)
        with ctx.timer("load"):
            pretrained = load_pretrained(run)
    if work.local:
        if run.directory.resuming and run.directory.marker.get("gathered"):  # local and gather are done
            local_models, rows = load_local_models(run)
            gathered = rundir.load_arrays(run.directory.path(rundir.PROBABILITIES)) if ctx.master_process else None
        else:
            info, dec = plan.info, plan.decomposition
            run.begin("local")
            probs, local_models, histories = twolevel.fit_local_models(
                ctx, subsets, dec, info.channels, K, plan.width_factor, twolevel_config(args), data.SPLITS)
            rows = [dict(r, model=f"local_{i}") for i, h in histories.items() for r in h] if ctx.leader else []
            run.stops.sync()  # so that "gather" times the exchange, not the slowest rank
            run.begin("gather")
            gathered = gather_phase(run, probs, subsets)
            del probs  # rank 0 holds them gathered now
            run.directory.mark(gathered=True)
        dnn = None
        run.begin("coarse")
        if ctx.master_process:
            with ctx.timer("coarse"):
                accuracies, coarse_rows, dnn = coarse_phase(run, gathered, labels)
            rows += coarse_rows
        pretrained = {"local": local_models, "dnn": dnn}
    if work.coherent:
        member = (ctx.group.rank, ctx.group.size) if ctx.group is not None else None
        exchange = None
        for init in work.coherent:
            run.stops.sync()  # all ranks start together: no rank's phase holds the wait
            # made after the sleepy sync: its allgathers would spin while rank 0 trains the coarse DNN
            exchange = exchange or parallel.ModelParallelExchange(
                ctx.comm, ctx.mine, N, K, poll_interval=run.stops.wait_interval, member=member)
            run.begin(f"coherent_{init}")
            with ctx.timer(f"coherent_{init}"):
                acc, coherent_rows, coherent_timing[init] = coherent_phase(
                    run, init, subsets, labels, exchange, pretrained)
            if ctx.master_process:
                accuracies[f"coherent_{init}"] = acc
                rows += coherent_rows
    if work.global_cnn:
        # --mode compare: the first rank of each node with the node's cores (data parallel
        # across nodes; the others wait), or with --global-alone rank 0 with its own threads
        # while the others wait; --mode global: every rank, data parallel (ctx.group)
        alone = run.global_size == 1  # (one node: its first rank, plain BatchNorm, no group)
        grun = run
        if args.mode == "compare":
            run.stops.sync()
            grun = run.with_group(None if alone else parallel.DataParallelGroup(
                ctx.comm, color=0 if run.global_ranks is not None else 1, key=ctx.rank,
                wait_interval=run.stops.wait_interval))
        run.begin("global")
        if run.global_ranks is not None:
            if whole is None:  # --mode compare: the local phase has already checked every pixel
                whole, run.bytes_whole = load_whole_images(grun, check=False)
            torch.set_num_threads(run.global_threads)  # the cores of its node's waiting ranks too
            try:
                acc, global_rows = global_phase(grun, whole, alone=alone)
            finally:
                torch.set_num_threads(run.threads)
            if ctx.master_process:
                accuracies["global"] = acc
            rows += global_rows
    return accuracies, rows, coherent_timing


def write_model_file(run: Run, accuracies):
    """Rank 0, at the end: RUN/model.pt, the self-describing model (mpidd.saved) that
    mpidd.predict and TwoLevelClassifier.load read, from the run's final checkpoints."""
    args, plan, work = run.args, run.plan, run.plan.work
    info, dec = plan.info, plan.decomposition
    N = dec.num_subdomains

    def weights(name):
        return rundir.load_checkpoint(run.directory.path(name))["model"]
    models = {}
    if "cnn_dnn" in accuracies:
        models["twolevel"] = saved.combined_part({i: weights(rundir.local_checkpoint(i)) for i in range(N)},
                                                 weights(rundir.COARSE_CHECKPOINT), "probabilities")
    for init in work.coherent:
        name = f"coherent_{init}"
        models[name] = saved.combined_part(
            {i: weights(rundir.coherent_local_checkpoint(name, i)) for i in range(N)},
            weights(rundir.coherent_dnn_checkpoint(name)), args.exchange)
    if work.global_cnn or work.width:
        models["global"] = saved.whole_part(weights(rundir.GLOBAL_CHECKPOINT))
    if work.width:  # (its decomposition is the whole image: grid 1x1, width factor 1)
        models["recomposed"] = saved.whole_part(weights(rundir.RECOMPOSED_CHECKPOINT))
    config = saved.recorded({k: v for k, v in vars(args).items() if k not in NOT_RECORDED})
    manifest = saved.manifest(image_shape=info.image_shape, input_dtype=info.dtype, grid=dec.grid, overlap=dec.overlap,
                              num_classes=info.num_classes, classes=info.classes, cnn=cnn_config(args),
                              width_factor=plan.width_factor, coarse_hidden=args.coarse_hidden,
                              coarse_dropout=args.coarse_dropout, hyperparameters=config)
    saved.save_model(os.path.join(args.out, saved.MODEL_FILE), manifest, models)
