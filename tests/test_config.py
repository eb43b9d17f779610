import pytest

from mpidd.config import ConfigError, get_args_parser, parse_args


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
    ('model = "bogus"', "not one of"),
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
])
def test_bad_values_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)
