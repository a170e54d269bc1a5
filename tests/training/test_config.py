"""TrainConfig: typed fields, layered sources merged key by key, YAML round trips, and a
flag with help and default for every field."""

import dataclasses

import pytest

from xception.cli import build_parser, main, train_options
from xception.training.config import (
    GROUPS,
    TrainConfig,
    from_yaml_file,
    resolve,
    to_yaml,
)
from xception.training.recipes import RECIPES


def test_model_overrides_merge_key_by_key_across_layers():
    """`quick` sets bn_momentum=0.1; a flag adding mid_activation must not drop it."""
    parse = build_parser().parse_args
    flags = train_options(parse(["train", "--override", "mid_activation=relu"]))
    config = resolve("quick", None, flags)
    assert config.model_overrides == {"bn_momentum": 0.1, "mid_activation": "relu"}
    yaml_layer = {"model_overrides": {"residual": False, "bn_momentum": 0.2}}
    config = resolve("quick", yaml_layer, flags)
    assert config.model_overrides == {
        "bn_momentum": 0.2,
        "residual": False,
        "mid_activation": "relu",
    }
    assert config.model_config(3).bn_momentum == 0.2 and config.model_config(3).num_classes == 3


def test_model_overrides_given_as_text_merge_too_and_bad_text_is_named():
    config = resolve("quick", None, {"model_overrides": "{mid_activation: relu}"})
    assert config.model_overrides == {"bn_momentum": 0.1, "mid_activation": "relu"}
    with pytest.raises(ValueError, match=r"model_overrides='\{a: \[1' is not a mapping"):
        resolve("quick", None, {"model_overrides": "{a: [1"})


@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("dropout", "the training option dropout"),
        ("image_size", "the training option image_size"),
        ("num_classes", "the data's classes"),
    ],
)
def test_model_fields_a_run_sets_itself_are_refused_in_model_overrides(key, field):
    with pytest.raises(ValueError, match=f"model_overrides may not set {key}: {field}"):
        resolve("quick", None, {"model_overrides": {key: 0.3}})


def test_config_yaml_of_earlier_versions_still_resumes(tmp_path):
    """Runs saved `loss: softmax|sigmoid`; the loss now follows the data."""
    config = resolve("quick")
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(config, "quick") + "loss: softmax\n")
    assert from_yaml_file(path) == (config, "quick")


def test_flags_override_yaml_over_recipe_over_defaults():
    config = resolve("quick", {"epochs": 3, "lr": 0.1}, {"lr": "0.2"})
    assert (config.epochs, config.lr, config.optimizer) == (3, 0.2, "adamw")
    assert config.momentum == TrainConfig().momentum


def test_config_yaml_round_trips_tuples_and_every_field(tmp_path):
    config = resolve(
        "quick",
        overrides={
            "model_overrides": {"fc_layers": [64, 64], "spatial_groups": "None"},
            "max_steps": "5",
            "device": "cpu",
        },
    )
    assert config.model_overrides["fc_layers"] == (64, 64)  # typed as the model's field
    assert config.model_overrides["spatial_groups"] is None and config.max_steps == 5
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(config, "quick"))
    assert from_yaml_file(path) == (config, "quick")


def test_an_invalid_model_option_fails_before_any_data_is_touched(tmp_path):
    with pytest.raises(ValueError, match="mid_activation='tanh' is not one of"):
        resolve("quick", overrides={"model_overrides": {"mid_activation": "tanh"}})
    with pytest.raises(ValueError, match="below the minimum input size 71"):
        resolve("quick", overrides={"image_size": 64})
    with pytest.raises(ValueError, match="unknown xception_tiny option 'depth'"):
        resolve("quick", overrides={"model_overrides": {"depth": 2}})
    with pytest.raises(ValueError, match="unknown model 'xceptoin'"):
        resolve("quick", overrides={"model": "xceptoin"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 6, "grad_accum": 4}, "multiple of grad_accum"),
        ({"epochs": "ten"}, "epochs='ten'"),
        ({"model_overrides": 5}, "model_overrides=5"),
        ({"optimizer": "adam"}, "optimizer='adam' is not one of 'sgd', 'rmsprop_tf', 'adamw'"),
        ({"device": "gpu"}, "device='gpu' is not auto"),
        ({"crop_pct": 1.5}, "0 < crop_pct <= 1"),
        ({"learning_rate": 1}, "unknown training option 'learning_rate'; valid: amp,"),
    ],
)
def test_invalid_training_options_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve("quick", overrides=overrides)


def test_every_field_is_a_flag_in_its_group_with_help_and_default(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for group in GROUPS:
        assert f"{group} options:" in text
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata["group"] in GROUPS and field.metadata["help"]
        flag = "--override" if field.name == "model_overrides" else "--" + field.name
        assert flag.replace("_", "-") + " " in text, flag
        if field.name != "model_overrides":
            shown = str(field.default).lower() if field.default is not None else "none"
            assert f"(default: {shown}" in text, field.name
    assert "(default: 10; quick: 18)" in text  # epochs: the default recipe's value too


def test_every_flag_reaches_its_field():
    import typing

    from xception.config import choices

    parse = build_parser().parse_args
    hints = typing.get_type_hints(TrainConfig)
    texts = {"device": "cpu", "model": "xception_small", "mean": "0.4,0.4,0.4"}
    for field in dataclasses.fields(TrainConfig):
        if field.name == "model_overrides":
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            assert train_options(parse(["train", f"--no-{flag[2:]}"]))[field.name] is False
            continue
        literal = choices(hints[field.name])
        given = str(literal[-1]) if literal else texts.get(field.name, "7")
        assert train_options(parse(["train", flag, given]))[field.name] == given


def test_recipes_name_only_training_options():
    for values in RECIPES.values():
        TrainConfig(**values)
