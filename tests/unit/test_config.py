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
    from mpidd.engine import classes_per_block
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
