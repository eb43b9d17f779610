import pytest

from mpidd.cli.arguments import ConfigError, get_args_parser, parse_args


def test_every_flag_shows_its_default_in_help():
    parser = get_args_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert all(a.help for a in options), [a.option_strings for a in options if not a.help]
    text = parser.format_help()
    assert text.count("(default:") >= len(options)


def test_file_then_command_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('grid = "4x4"\nepochs = 7\ncoarse-hidden = [32, 16]\nbatchnorm = false\n')
    args = parse_args(["--config", str(cfg), "--epochs", "2"])
    assert (args.grid, args.epochs, args.coarse_hidden, args.batchnorm) == ("4x4", 2, (32, 16), False)
    assert args.overlap == 0  # default


@pytest.mark.parametrize("text,message", [
    ('mode = "bogus"', "not one of"),
    ('arch = "alexnet"', "not one of"),
    ('optimizer = "lbfgs"', "not one of"),
    ("epochs = 2.5", "wrong type"),
    ('epochs = "3"', "wrong type"),
    ("overwrite = 1", "wrong type"),
    ("colour = 3", "unknown keys colour"),
    ("epochs = [", "config file"),
])
def test_bad_config_file_values_are_refused(tmp_path, text, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(cfg)])


@pytest.mark.parametrize("argv,message", [
    (["--coarse-hidden", "64,x"], "comma-separated integers"),
    (["--coarse-hidden", "64,0"], ">= 1"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--dropout", "1.5"], "--dropout out of range"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--config", "/nonexistent.toml"], "does not exist"),
    (["--coherent-epochs", "0"], "--coherent-epochs must be >= 1"),
    (["--transfer-lr", "0"], "--transfer-lr must be > 0"),
    (["--blocks-per-stage", "0"], "--blocks-per-stage must be >= 1"),
    (["--from", "runs/x"], "use it with --mode coherent --init pretrained"),
    (["--mode", "coherent", "--init", "random", "--from", "runs/x"], "use it with --mode coherent --init pretrained"),
    (["--exchange", "logits"], "--dnn-init random with --exchange logits"),
    (["--mode", "coherent", "--exchange", "logits"], "--dnn-init random with --exchange logits"),
    (["--mode", "halo"], "--mode halo trains a U-Net domain parallel: use it with --task segment or regress"),
])
def test_bad_values_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_coherent_options_resolve(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('mode = "coherent"\nfrom = "runs/earlier"\narch = "resnet"\n')
    args = parse_args(["--config", str(cfg), "--transfer-lr", "1e-4"])
    assert (args.mode, args.init, args.from_run, args.arch, args.transfer_lr) == (
        "coherent", "pretrained", "runs/earlier", "resnet", 1e-4)
    args = parse_args(["--mode", "coherent", "--init", "random", "--exchange", "logits"])
    assert args.exchange == "logits" and args.from_run is None
    assert parse_args(["--exchange", "logits", "--dnn-init", "random"]).mode == "compare"


def test_a_runs_config_json_can_be_passed_back(tmp_path):
    """config.json holds every option (nulls for unset ones such as --threads); reading it back
    with --config gives the same options."""
    import json
    args = parse_args(["--grid", "4x4", "--mode", "coherent", "--from", "runs/a", "--coarse-hidden", "32"])
    saved = {k: v for k, v in vars(args).items() if k not in ("config", "overwrite", "out")}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    again = parse_args(["--config", str(path)])
    assert {k: v for k, v in vars(again).items() if k in saved} == saved
    assert again.threads is None and again.width_factor is None


def test_shuffle_blocks_on_a_file_in_class_order_warns(tmp_path):
    """A training split written class by class: its chunk rows hold one class each, so --shuffle
    blocks warns (naming the way out); the same samples in a mixed order, or --shuffle exact, do not."""
    import numpy as np

    from mpidd import data, write_dataset
    from mpidd.cli.plan import order_warning, resolve_shuffle
    from mpidd.feed import classes_per_block
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 128)
    x = rng.integers(0, 255, (len(y), 1, 8, 8)).astype(np.uint8)
    small = (x[:8], np.arange(8) % 4)
    for name, order in (("sorted", np.arange(len(y))), ("mixed", rng.permutation(len(y)))):
        path = write_dataset(str(tmp_path / f"{name}.h5"), {"train": (x[order], y[order]), "val": small,
                                                            "test": small}, chunk_samples=64)
        info = data.inspect(path)
        args = parse_args(["--data", path, "--shuffle", "blocks"])
        resolve_shuffle(args, info)
        assert args.shuffle_block == 64
        warning = order_warning(args, info)
        if name == "sorted":
            assert classes_per_block(y, 64) == 1.0
            assert warning.startswith("warning: --shuffle blocks: a chunk row of the training split (64 samples) "
                                      "holds 1.0 of the 4 classes")
            assert "--shuffle exact" in warning and "(8 chunk rows)" in warning
        else:
            assert classes_per_block(y[order], 64) > 3 and warning is None
        args = parse_args(["--data", path, "--shuffle", "exact"])
        resolve_shuffle(args, info)
        assert order_warning(args, info) is None


# Non-default values of every option that mpidd.options maps, as command-line flags.
NON_DEFAULT = ["--epochs", "5", "--batch-size", "32", "--lr", "1e-3", "--optimizer", "sgd", "--momentum", "0.8",
               "--weight-decay", "1e-4", "--schedule", "step", "--shuffle", "blocks", "--shuffle-buffer", "3",
               "--log-interval", "7", "--curve-points", "2", "--coarse-hidden", "32,16", "--arch", "resnet",
               "--width", "16", "--depth", "3", "--convs-per-block", "1", "--blocks-per-stage", "1",
               "--dense-layers", "2,3,4", "--hidden", "64", "--head-pool", "2", "--dropout", "0.25", "--no-batchnorm",
               "--subnets", "2", "--subnet-epochs", "4", "--transfer-lr", "1e-4", "--coherent-lr", "1e-3",
               "--coherent-epochs", "3", "--coarse-dropout", "0.1", "--coarse-input", "prob", "--coarse-epochs", "7",
               "--coarse-steps", "100", "--coarse-lr", "1e-2", "--coarse-weight-decay", "0",
               "--coarse-batch-size", "16", "--seed", "3", "--eval-batch-size", "64", "--shard",
               "--offdiag-noise", "0.01", "--exchange", "logits", "--dnn-init", "random"]


def resolved(argv, normalization=None, shuffle_block=1):
    """parse_args, then what cli.plan resolves from the data file."""
    args = parse_args(argv)
    args.normalization = normalization and {"mean": list(normalization[0]), "std": list(normalization[1]),
                                            "source": "data file"}
    args.shuffle_block = shuffle_block
    return args


def api_twin(args, estimator):
    """The estimator with the same option values as `args` (its keywords are argparse dests)."""
    from mpi4py import MPI
    norm = args.normalization and (args.normalization["mean"], args.normalization["std"])
    given = {k: getattr(args, k) for k in estimator.HYPERPARAMETERS if hasattr(args, k)}
    return estimator(**dict(given, normalization=norm), comm=MPI.COMM_SELF)


def test_the_command_line_and_the_api_build_their_configs_alike():
    """Both map their options with mpidd.options: the same values give the same configs, but
    for the options only the command line has (OPTIONAL: the API keeps TrainOptions' defaults).
    The defaults are the configs' own (the dataclasses document the command line's)."""
    import dataclasses

    import mpidd
    from mpidd import options
    from mpidd.engine import TrainOptions
    from mpidd.methods.coherent import CoherentConfig
    from mpidd.methods.twolevel import TwoLevelConfig
    from mpidd.methods.width import WidthConfig

    def api_side(opts):  # what the API gets where the command line has an OPTIONAL
        return dataclasses.replace(opts, shuffle_block=1, shuffle_buffer=8, log_interval=0, test_points=1)

    # defaults, spelled out
    cli = resolved([])
    two, wide = api_twin(cli, mpidd.TwoLevelClassifier), api_twin(cli, mpidd.WidthClassifier)
    assert options.twolevel_config(cli) == TwoLevelConfig(local=TrainOptions(log_interval=100), coarse=TrainOptions(
        epochs=5, lr=3e-3, weight_decay=1e-4, select_best=True, log_interval=100))
    assert two.config() == TwoLevelConfig()
    assert options.coherent_config(two, "random") == CoherentConfig()
    assert options.coherent_config(two, "pretrained") == CoherentConfig(opts=TrainOptions(epochs=2, lr=5e-4))
    assert options.coherent_config(cli, "random") == CoherentConfig(opts=TrainOptions(epochs=2, lr=2e-3,
                                                                                      log_interval=100))
    assert wide.config() == WidthConfig()
    assert options.width_config(cli) == WidthConfig(subnet_opts=TrainOptions(epochs=6, log_interval=100),
                                                    recomposed_opts=TrainOptions(epochs=3, lr=5e-4, log_interval=100,
                                                                                 test_points=4))
    assert options.global_options(cli) == TrainOptions(log_interval=100, test_points=4)

    # other values, a normalisation and --shuffle blocks
    cli = resolved(NON_DEFAULT, normalization=((0.5, 0.25), (0.2, 0.125)), shuffle_block=64)
    two, wide = api_twin(cli, mpidd.TwoLevelClassifier), api_twin(cli, mpidd.WidthClassifier)
    c, a = options.twolevel_config(cli), two.config()
    assert c.cnn == a.cnn and (c.cnn.input_mean, c.cnn.input_std) == ((0.5, 0.25), (0.2, 0.125))
    assert (c.cnn.arch, c.cnn.dense_layers, c.cnn.batchnorm) == ("resnet", (2, 3, 4), False)
    assert (c.local.shuffle_block, c.local.shuffle_buffer) == (64, 3)
    assert dataclasses.replace(c, local=api_side(c.local), coarse=api_side(c.coarse)) == a
    assert c.local == TrainOptions(epochs=5, batch_size=32, lr=1e-3, optimizer="sgd", momentum=0.8, weight_decay=1e-4,
                                   schedule="step", shuffle_block=64, shuffle_buffer=3, log_interval=7)
    assert c.coarse == TrainOptions(epochs=7, batch_size=16, lr=1e-2, optimizer="adam", weight_decay=0,
                                    schedule="cosine", select_best=True, log_interval=7)
    assert (c.coarse_hidden, c.coarse_dropout, c.coarse_input, c.coarse_min_steps, c.seed, c.eval_batch_size) == (
        (32, 16), 0.1, "prob", 100, 3, 64)
    for init, lr in (("random", 1e-3), ("pretrained", 1e-4)):
        c, a = options.coherent_config(cli, init), options.coherent_config(two, init)
        assert (c.opts.epochs, c.opts.lr, c.opts.log_interval, c.output, c.coarse_hidden) == (3, lr, 7, "logits",
                                                                                              (32, 16))
        assert dataclasses.replace(c, opts=api_side(c.opts)) == a
    c, a = options.width_config(cli), wide.config()
    assert (c.subnet_opts.epochs, c.subnet_opts.lr, c.subnet_opts.log_interval) == (4, 1e-3, 7)
    assert (c.recomposed_opts.epochs, c.recomposed_opts.lr, c.recomposed_opts.log_interval,
            c.recomposed_opts.test_points) == (5, 1e-4, 7, 2)
    assert (c.subnets, c.shard, c.offdiag_noise) == (2, True, 0.01)
    assert dataclasses.replace(c, subnet_opts=api_side(c.subnet_opts),
                               recomposed_opts=api_side(c.recomposed_opts)) == a
    assert options.global_options(cli) == dataclasses.replace(c.subnet_opts, epochs=5, log_interval=7, test_points=2)


def test_options_reads_only_declared_names():
    """Every name mpidd.options reads is an argparse dest (or resolved by cli.plan), and one of
    the estimator's keywords unless OPTIONAL (the command line's alone)."""
    import mpidd
    from mpidd import options

    class Reads:
        def __init__(self, values):
            self.values, self.names = values, set()

        def __getattr__(self, name):
            self.names.add(name)
            if name in self.values:
                return self.values[name]
            raise AttributeError(name)

    cli = vars(resolved([]))
    two, wide = Reads(cli), Reads(cli)
    options.twolevel_config(two), options.coherent_config(two, "random"), options.coherent_config(two, "pretrained")
    options.width_config(wide), options.global_options(wide)
    assert two.names | wide.names <= set(vars(parse_args([]))) | {"normalization", "shuffle_block"}
    assert two.names - set(options.OPTIONAL) <= set(mpidd.TwoLevelClassifier.HYPERPARAMETERS)
    assert wide.names - set(options.OPTIONAL) <= set(mpidd.WidthClassifier.HYPERPARAMETERS)
    keywords = mpidd.TwoLevelClassifier.HYPERPARAMETERS + mpidd.WidthClassifier.HYPERPARAMETERS
    assert not set(options.OPTIONAL) & set(keywords)


def test_the_coarse_weight_decay_defaults_to_the_tasks():
    """1e-4 for the classifiers' coarse DNN, 0 for the dense coarse network (whose tiny field
    losses Adam's L2 term would outweigh); a value given is kept, in dense_config too."""
    from mpidd import options
    assert parse_args(["--data", "f.h5"]).coarse_weight_decay == 1e-4
    for task in ("regress", "segment"):
        args = parse_args(["--data", "f.h5", "--task", task])
        assert args.coarse_weight_decay == 0.0 and options.dense_config(args).coarse.weight_decay == 0.0
    args = parse_args(["--data", "f.h5", "--task", "regress", "--coarse-weight-decay", "1e-3"])
    assert options.dense_config(args).coarse.weight_decay == 1e-3
    import mpidd
    assert mpidd.TwoLevelUNet().coarse_weight_decay == 0.0 and mpidd.TwoLevelClassifier().coarse_weight_decay == 1e-4


def test_the_transfer_lr_defaults_to_the_tasks():
    """5e-4 for the classifiers, 2e-3 for segment and regress (the dense coherent model from the
    two-level one learns faster at it); the same in the API; a value given is kept."""
    from mpidd import options
    assert parse_args(["--data", "f.h5"]).transfer_lr == 5e-4
    for task, lr in (("regress", 2e-3), ("segment", 2e-3)):
        args = parse_args(["--data", "f.h5", "--task", task])
        assert args.transfer_lr == lr and options.dense_coherent_options(args, "pretrained").lr == lr
        assert options.dense_coherent_options(args, "random").lr == args.coherent_lr
    args = parse_args(["--data", "f.h5", "--task", "regress", "--transfer-lr", "1e-4"])
    assert options.dense_coherent_options(args, "pretrained").lr == 1e-4
    assert options.dense_coherent_options(args, "random").lr == args.coherent_lr == 2e-3
    import mpidd
    for task, lr in (("regress", 2e-3), ("segment", 2e-3)):
        assert options.dense_coherent_options(mpidd.TwoLevelUNet(task=task), "pretrained").lr == lr
    assert options.dense_coherent_options(mpidd.TwoLevelUNet(transfer_lr=3e-3), "pretrained").lr == 3e-3
    assert mpidd.TwoLevelClassifier().transfer_lr == 5e-4
