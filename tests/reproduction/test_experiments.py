import pytest
import torch

from xception import create_model
from xception.reproduction.experiments import (
    EXPERIMENTS,
    SCALES,
    arms,
    get_experiment,
    get_scale,
)
from xception.training.config import TrainConfig
from xception.training.recipes import RECIPES


@pytest.mark.parametrize("scale", ["tiny", "small", "full"])
@pytest.mark.parametrize("experiment", ["residual", "activation", "spectrum", "head", "families"])
def test_every_arm_builds_and_runs_at_its_scale(experiment, scale):
    """The plan is runnable: every arm's model exists with its overrides and takes the
    images it will be trained on (Inception V3's 75 px minimum included)."""
    s = get_scale(scale)
    plan = get_experiment(experiment)
    for arm in arms(plan, s):
        size = s.family_image_size if plan.families else s.image_size
        if scale != "tiny" and (arm.model != s.xception[0] or size > 128):
            continue  # the large members are built by the model tests; keep this fast
        model = create_model(arm.model, num_classes=10, **arm.overrides).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, size, size)).shape == (1, 10)


def test_arms_differ_from_the_baseline_only_in_the_knob_under_study():
    tiny = get_scale("tiny")
    _, base = tiny.xception
    residual = arms(get_experiment("residual"), tiny)  # at the paper's depth
    deep = {**base, "middle_blocks": 8}
    assert [a.overrides for a in residual] == [deep, {**deep, "residual": False}]
    activation = arms(get_experiment("activation"), tiny)
    assert [a.overrides["mid_activation"] for a in activation] == ["none", "elu", "relu"]
    assert all({**a.overrides, "mid_activation": "none"} == {**base, "mid_activation": "none"}
               for a in activation)  # fmt: skip
    spectrum = arms(get_experiment("spectrum"), tiny)
    groups = [a.overrides["spatial_groups"] for a in spectrum]
    assert groups[0] == 1 and groups[-1] is None and groups == [*sorted(groups[:-1]), None]
    head = arms(get_experiment("head"), tiny)
    assert all(a.multi_label for a in head)
    with_fc = [a for a in head if a.name.endswith("-fc")]
    assert [a.overrides["fc_layers"] for a in with_fc] == [(tiny.fc_units, tiny.fc_units)] * 2


@pytest.mark.parametrize("scale", ["tiny", "small", "full"])
def test_families_compare_xception_and_inception_at_the_same_parameter_count(scale):
    """Tables 1 and 2 compare at equal size: every arm within 5% of the others it is
    compared with (the full models differ by 3.4%), counted with a 10-class head as the
    arms train; in ``head``, the arms with FC layers with each other."""

    def params(arm):
        model = create_model(arm.model, num_classes=10, **arm.overrides)
        return sum(p.numel() for p in model.parameters())

    families = {arm.name: params(arm) for arm in arms(get_experiment("families"), get_scale(scale))}
    assert set(families) == {"xception", "inception-paper", "inception"}
    head = {arm.name: params(arm) for arm in arms(get_experiment("head"), get_scale(scale))}
    assert head["xception"] == families["xception"]  # the same paper-depth Xception
    for group in (families, {k: v for k, v in head.items() if k.endswith("-fc")}):
        assert len(group) >= 2 and max(group.values()) / min(group.values()) < 1.05, group


def test_spectrum_costs_fall_from_regular_to_depthwise_convolution():
    """Multiply-adds of the spatial stage scale as 1/g (PAPER.md section 1): the sweep is
    monotone in cost, regular convolution the dearest."""
    from xception.summary import count_macs

    tiny = get_scale("tiny")
    costs = [
        count_macs(create_model(a.model, num_classes=10, **a.overrides), tiny.image_size)
        for a in arms(get_experiment("spectrum"), tiny)
    ]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)


def test_scales_name_real_recipes_and_valid_training_options():
    for scale in SCALES.values():
        assert scale.recipe in RECIPES and scale.multi_recipe in RECIPES
        for experiment in EXPERIMENTS.values():  # validates every field
            recipe = RECIPES[experiment.recipe or scale.recipe]
            TrainConfig(**{**recipe, **scale.train, **experiment.train})
        assert scale.family_image_size >= 139  # Inception V3's last grid 3x3 or larger


def test_claims_name_arms_of_their_experiment():
    for experiment in EXPERIMENTS.values():
        names = {a.name for a in arms(experiment, get_scale("tiny"))}
        for claim in experiment.claims:
            assert {claim.better, claim.worse} <= names


def test_unknown_names_fail_clearly():
    with pytest.raises(ValueError, match=r"unknown experiment 'fig11'.*residual"):
        get_experiment("fig11")
    with pytest.raises(ValueError, match=r"unknown scale 'huge'.*tiny"):
        get_scale("huge")
