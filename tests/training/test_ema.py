"""Polyak averaging: closed forms, the TF warm-up rule, buffers and bit-exact resume."""

import pytest
import torch
from torch import nn

from xception.training.ema import ModelEma


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def _assert_bitwise_equal(first: nn.Module, second: nn.Module) -> None:
    mine, theirs = first.state_dict(), second.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key


def _scalar_model(value: float) -> nn.Module:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def test_warmup_follows_tf_num_updates_rule():
    ema = ModelEma(_scalar_model(0.0), decay=0.9999)
    # min(decay, (1 + t) / (10 + t)): 1/10, 2/11, 1/2 at t = 8, then capped.
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(8) == pytest.approx(0.5)
    assert ema.decay_at(89_990) == pytest.approx(0.9999)
    assert ema.decay_at(10**9) == 0.9999
    assert ModelEma(_scalar_model(0.0), decay=0.5).decay_at(100) == 0.5
    assert ModelEma(_scalar_model(0.0), decay=0.9, warmup=False).decay_at(0) == 0.9


def test_closed_form_on_a_scalar():
    model = _scalar_model(1.0)
    fixed = ModelEma(model, decay=0.5, warmup=False)
    warm = ModelEma(model, decay=0.99)
    for value in (3.0, 5.0, 9.0):
        model.weight.data.fill_(value)
        fixed.update(model)
        warm.update(model)
    # Fixed 0.5: e1 = (1 + 3) / 2 = 2;  e2 = (2 + 5) / 2 = 3.5;  e3 = (3.5 + 9) / 2 = 6.25
    assert fixed.averaged.weight.item() == 6.25
    # Warm-up decays 1/10, 2/11, 3/12:
    # e1 = .1 * 1 + .9 * 3 = 2.8;  e2 = 2/11 * 2.8 + 9/11 * 5 = 50.6/11;
    # e3 = 1/4 * e2 + 3/4 * 9
    e2 = 50.6 / 11
    assert warm.averaged.weight.item() == pytest.approx(0.25 * e2 + 0.75 * 9.0, rel=1e-6)
    assert warm.num_updates == 3


def test_decay_zero_tracks_the_model_and_its_buffers():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_step(model, opt, 0)
    ema = ModelEma(model, decay=0.0)
    for seed in range(1, 4):
        _train_step(model, opt, seed)
        ema.update(model)
    _assert_bitwise_equal(ema.averaged, model)
    assert ema.averaged[1].num_batches_tracked.item() == 4


def test_batchnorm_statistics_are_averaged_with_the_weights_and_counts_copied():
    """As in TF's Inception training (trainable and moving-average variables alike): the
    averaged weights meet statistics averaged over the same steps."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ModelEma(model, decay=0.5, warmup=False)
    norm = model[1]
    expected_mean = norm.running_mean.clone()
    expected_var = norm.running_var.clone()
    for seed in range(3):
        _train_step(model, opt, seed)
        ema.update(model)
        expected_mean = 0.5 * expected_mean + 0.5 * norm.running_mean
        expected_var = 0.5 * expected_var + 0.5 * norm.running_var
    averaged = ema.averaged[1]
    assert not torch.equal(averaged.running_mean, norm.running_mean)
    torch.testing.assert_close(averaged.running_mean, expected_mean)
    torch.testing.assert_close(averaged.running_var, expected_var)
    assert averaged.num_batches_tracked.item() == norm.num_batches_tracked.item() == 3


def test_averaged_copy_is_frozen_eval_and_detached_from_the_model():
    model = _scalar_model(2.0)
    ema = ModelEma(model, decay=0.9)
    assert not ema.averaged.training
    assert not any(p.requires_grad for p in ema.averaged.parameters())
    model.weight.data.fill_(5.0)
    assert ema.averaged.weight.item() == 2.0


def test_unwraps_data_parallel_wrappers():
    model = _scalar_model(1.0)
    wrapped = nn.DataParallel(model)  # same .module convention as DistributedDataParallel
    ema = ModelEma(wrapped, decay=0.5, warmup=False)
    assert isinstance(ema.averaged, nn.Linear)
    model.weight.data.fill_(3.0)
    ema.update(wrapped)
    assert ema.averaged.weight.item() == pytest.approx(2.0)


def test_rejects_mismatched_models():
    ema = ModelEma(_scalar_model(0.0))
    with pytest.raises(ValueError):
        ema.update(nn.Linear(1, 1))
