"""The command line: output a user reads, and one-line errors with a non-zero exit."""

import subprocess
import sys

import pytest

from xception import create_model
from xception.cli import key_value_dict, main


def test_summary_prints_the_layer_table_and_totals(capsys):
    assert main(["summary", "xception"]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters: 22,855,952" in out
    assert "buffers (BN stats):   54,528" in out
    assert "8.36 G) at 299x299" in out
    assert "middle_flow" in out and "block12" in out


def test_summary_applies_overrides_and_image_size(capsys):
    argv = [
        "summary",
        "xception",
        "--override",
        "residual=False",
        "mid_activation=relu",
        "--image-size",
        "71",
        "--depth",
        "1",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "21,878,880" in out and "at 71x71" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["summary", "xceptoin"], "unknown model 'xceptoin'; known models:"),
        (["summary", "xception", "--override", "groups=4"], "unknown xception option 'groups'"),
        (["summary", "xception", "--override", "spatial_groups=16"], "spatial_groups=16"),
        (["summary", "xception", "--override", "residual"], "not of the form key=value"),
        (["summary", "xception", "--image-size", "64"], "H, W >= 71"),
        (["summary", "xception", "--override", "width_multiplier=inf"], "must be finite"),
        (["train", "--set", "model_overrides={a: [1"], "is not a mapping of option"),
        (["train", "--set", "model_overrides={}", "--override", "residual=0"], "not both"),
        (["train", "--set", "lr=nan"], "lr=nan must be finite"),
        (["summary", "xception_tiny", "--image-size", "-5"], "-5 is less than 1"),
        (["bench", "xception_tiny", "--batch-size", "0"], "0 is less than 1"),
        (["predict", "--weights", "w.safetensors", "--top-k", "two", "x.png"], "'two' is not"),
        (["train", "--resume", "README.md"], "README.md is neither"),
        (["export", "--weights", "w", "--out", "tests", "--overwrite"], "tests is a folder"),
    ],
)
def test_user_errors_are_one_line_with_exit_status_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_override_texts_become_the_config_fields_types():
    from xception import model_config

    texts = ["fc_layers=(4096, 4096)", "spatial_groups=None", "mid_activation=elu"]
    texts += ["residual=False", "output_stride=16", "dropout=0.5", "middle_blocks=4"]
    config = model_config("xception", **key_value_dict([texts]))
    assert config.fc_layers == (4096, 4096) and config.spatial_groups is None
    assert config.mid_activation == "elu" and config.residual is False
    assert config.output_stride == 16 and config.dropout == 0.5 and config.middle_blocks == 4
    assert model_config("xception", fc_layers="64,64").fc_layers == (64, 64)
    assert model_config("xception", fc_layers="").fc_layers == ()


def test_models_lists_every_registered_model(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "22,855,952" in out and "23,626,728" in out and "4,231,976" in out


def test_console_entry_point_and_module_run():
    tiny = sum(p.numel() for p in create_model("xception_tiny").parameters())
    result = subprocess.run(
        [sys.executable, "-m", "xception", "summary", "xception_tiny", "--depth", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"trainable parameters: {tiny:,}" in result.stdout


def test_train_layout_flag_overrides_only_when_given():
    from xception.cli import build_parser, train_options

    parse = build_parser().parse_args
    assert "channels_last" not in train_options(parse(["train"]))
    assert train_options(parse(["train", "--no-channels-last"]))["channels_last"] is False
    assert train_options(parse(["train", "--channels-last"]))["channels_last"] is True


def test_train_help_names_what_each_flag_takes():
    from xception.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    usage = " ".join(train.format_usage().split())
    assert "[--mean X,X,X]" in usage  # a three-value tuple, written as the flag parses it
    assert "[--epochs N]" in usage
    assert "[--lr X]" in usage
