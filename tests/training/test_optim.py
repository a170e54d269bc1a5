"""RMSpropTF against TF's formula and timm, parameter groups and learning-rate schedules."""

import itertools
import math

import pytest
import torch
from timm.optim import RMSpropTF as TimmRMSpropTF
from torch import nn

from xception.layers import SeparableConv2d
from xception.registry import create_model
from xception.training.builders import build_schedule
from xception.training.config import resolve
from xception.training.optim import (
    LRSchedule,
    RMSpropTF,
    param_groups,
    scale_lr,
    set_lr,
    staircase_decay,
)


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        SeparableConv2d(8, 8, 3, bias=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def test_param_groups_decay_only_conv_and_linear_weights():
    model = _small_model()
    decayed, plain = param_groups(model, 1e-5)
    assert decayed["weight_decay"] == 1e-5 and plain["weight_decay"] == 0.0
    decayed_ids = {id(p) for p in decayed["params"]}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            conv_or_linear = isinstance(module, nn.Conv2d | nn.Linear)
            assert (id(p) in decayed_ids) == (conv_or_linear and pname == "weight"), name
    # Every trainable parameter appears exactly once.
    everything = decayed["params"] + plain["params"]
    assert len(everything) == len({id(p) for p in everything}) == len(list(model.parameters()))
    frozen = nn.Linear(2, 2, bias=False).requires_grad_(False)
    assert param_groups(frozen, 1e-5) == []


def test_rmsprop_tf_two_steps_on_a_scalar_by_hand():
    # lr 0.1, alpha 0.9, momentum 0.9, eps 0.01, weight decay 0.5; p0 = 1, grads 2 then 1.
    # step 1: g = 2 + 0.5 * 1 = 2.5;  ms = 0.9 * 1 + 0.1 * 6.25 = 1.525
    #         mom = 0.1 * 2.5 / sqrt(1.535);  p1 = 1 - mom
    # step 2: g = 1 + 0.5 * p1;  ms = 0.9 * 1.525 + 0.1 * g**2
    #         mom = 0.9 * mom + 0.1 * g / sqrt(ms + 0.01);  p2 = p1 - mom
    mom1 = 0.1 * 2.5 / math.sqrt(1.535)
    p1 = 1.0 - mom1
    g2 = 1.0 + 0.5 * p1
    ms2 = 0.9 * 1.525 + 0.1 * g2**2
    mom2 = 0.9 * mom1 + 0.1 * g2 / math.sqrt(ms2 + 0.01)
    p2 = p1 - mom2

    p = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    opt = RMSpropTF([p], lr=0.1, alpha=0.9, momentum=0.9, eps=0.01, weight_decay=0.5)
    for grad, expected in [(2.0, p1), (1.0, p2)]:
        p.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
        assert p.item() == pytest.approx(expected, rel=1e-14)
    assert opt.state[p]["square_avg"].item() == pytest.approx(ms2, rel=1e-14)


def test_rmsprop_tf_starts_from_ones_not_zeros():
    # With ms initialised to 0 the first step would be lr * g / sqrt(0.1 g**2) ~ 3.16 lr;
    # from ones it is lr * g / sqrt(0.9 + 0.1 g**2).
    p = nn.Parameter(torch.zeros(1))
    opt = RMSpropTF([p], lr=1.0, eps=0.0)
    p.grad = torch.full((1,), 0.1)
    opt.step()
    assert p.item() == pytest.approx(-0.1 / math.sqrt(0.9 + 0.001), rel=1e-6)


@pytest.mark.parametrize("foreach", [False, True])
def test_rmsprop_tf_matches_timm(foreach):
    """Same trajectory as timm with lr_in_momentum=True and coupled weight decay."""
    ours_model, timm_model = _small_model(), _small_model()
    ours = RMSpropTF(param_groups(ours_model, 1e-2), lr=0.01, alpha=0.9, eps=1e-3, momentum=0.9)
    reference = TimmRMSpropTF(
        param_groups(timm_model, 1e-2),
        lr=0.01,
        alpha=0.9,
        eps=1e-3,
        momentum=0.9,
        decoupled_decay=False,  # coupled L2; the rate itself comes from the groups
        lr_in_momentum=True,
        foreach=foreach,
    )
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(2, 3, 8, 8, generator=gen)
        lr = 0.01 * 0.5**step  # a changing lr exercises lr-in-momentum
        for model, opt in [(ours_model, ours), (timm_model, reference)]:
            set_lr(opt, lr)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for mine, theirs in zip(ours_model.parameters(), timm_model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


def test_rmsprop_tf_state_dict_round_trip():
    model = _small_model()
    opt = RMSpropTF(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    clone = RMSpropTF(model.parameters())
    clone.load_state_dict(opt.state_dict())
    first = next(model.parameters())
    torch.testing.assert_close(clone.state[first]["square_avg"], opt.state[first]["square_avg"])


def test_staircase_changes_exactly_at_the_boundary():
    assert staircase_decay(0.045, 1.999999, 2, 0.94) == 0.045
    assert staircase_decay(0.045, 2.0, 2, 0.94) == pytest.approx(0.045 * 0.94)
    assert staircase_decay(0.045, 5.5, 2, 0.94) == pytest.approx(0.045 * 0.94**2)
    jft = build_schedule(resolve("paper-jft"), 1)  # the recipes carry the paper's schedules
    assert jft.lr_at(0, 0.0, 2_999_999) == 0.001
    assert jft.lr_at(0, 0.0, 3_000_000) == pytest.approx(0.0009)
    assert jft.lr_at(0, 0.0, 9_000_000_000) == pytest.approx(0.001 * 0.9**3000)
    imagenet = build_schedule(resolve("paper-imagenet"), 1)
    steps_per_epoch = 1251
    for step, expected in [(2 * steps_per_epoch - 1, 0.045), (2 * steps_per_epoch, 0.0423)]:
        assert imagenet.lr_at(step, step / steps_per_epoch, 0) == pytest.approx(expected)
    by_step = LRSchedule(0.1, 0.5, 10, "step")
    assert [by_step.lr_at(s, 0.0, 0) for s in (9, 10, 19, 20)] == [0.1, 0.05, 0.05, 0.025]


def test_warmup_ramps_linearly_and_meets_the_schedule():
    schedule = LRSchedule(0.1, 0.5, 3, "step", warmup_steps=4)
    # Warm-up factor (step + 1) / 4 on top of the staircase (x0.5 from step 3 on).
    expected = [0.025, 0.05, 0.075, 0.05, 0.05, 0.05, 0.025]
    got = [schedule.lr_at(step, 0.0, 0) for step in range(7)]
    assert got == pytest.approx(expected)
    plain = LRSchedule(0.1, 0.5, 100, "step", warmup_steps=4)
    assert [plain.lr_at(s, 0.0, 0) for s in range(5)] == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1]
    )


def test_scale_lr_and_validation():
    assert scale_lr(0.1, 1024, 256) == pytest.approx(0.4)
    assert scale_lr(0.045, 32, 64) == pytest.approx(0.0225)
    with pytest.raises(ValueError):
        scale_lr(0.1, 0, 256)
    with pytest.raises(ValueError):
        LRSchedule(0.1, 0.9, 2, "epochs")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LRSchedule(0.1, 0.9, 0, "epoch")


def test_spatial_lr_fan_in_scales_the_spatial_stage_by_groups_over_channels():
    # Adam's first step moves every weight by lr (m / sqrt(v) = sign(g)): the spatial
    # stage of a groups=2, 8-channel separable conv must move by lr * 2 / 8, the rest by lr.
    torch.manual_seed(0)
    conv = SeparableConv2d(8, 16, groups=2)
    groups = param_groups(conv, 0.0, spatial_lr_fan_in=True)
    assert [g["lr_scale"] for g in groups] == [1.0, 0.25]
    optimizer = torch.optim.AdamW(groups, lr=1.0, weight_decay=0.0, eps=1e-12)
    set_lr(optimizer, 0.1)
    before = {name: p.detach().clone() for name, p in conv.named_parameters()}
    conv(torch.randn(2, 8, 5, 5)).square().sum().backward()
    optimizer.step()
    for name, p in conv.named_parameters():
        expected = 0.025 if name.startswith("spatial") else 0.1
        torch.testing.assert_close((p - before[name]).abs(), torch.full_like(p, expected))


def test_spatial_lr_fan_in_leaves_a_depthwise_network_unchanged():
    model = create_model("xception_tiny", num_classes=3)
    scaled = param_groups(model, 1e-5, spatial_lr_fan_in=True)
    assert [(g["weight_decay"], g["lr_scale"]) for g in scaled] == [(1e-5, 1.0), (0.0, 1.0)]
    regular = create_model("xception_tiny", num_classes=3, spatial_groups=1)
    spatial = {
        id(m.spatial.weight): 1 / m.spatial.in_channels
        for m in regular.modules()
        if isinstance(m, SeparableConv2d)
    }
    for group in param_groups(regular, 1e-5, spatial_lr_fan_in=True):
        for p in group["params"]:
            assert group["lr_scale"] == spatial.get(id(p), 1.0)


def test_cosine_schedule_warms_up_then_halves_at_the_middle_and_ends_near_zero():
    from xception.training.optim import cosine_decay

    schedule = LRSchedule(0.1, 0.9, 1, "epoch", warmup_steps=10, kind="cosine", total_steps=110)
    assert schedule.lr_at(0, 0.0, 0) == pytest.approx(0.1 / 10)  # warm-up's first step
    assert schedule.lr_at(10, 9.0, 0) == pytest.approx(0.1)  # epochs do not matter
    assert schedule.lr_at(60, 0.0, 0) == pytest.approx(0.05)
    assert schedule.lr_at(109, 0.0, 0) == pytest.approx(0.1 * (1 + math.cos(math.pi * 0.99)) / 2)
    assert schedule.lr_at(500, 0.0, 0) == 0.0
    values = [cosine_decay(1.0, step, 0, 50) for step in range(51)]
    assert all(a >= b for a, b in itertools.pairwise(values))
