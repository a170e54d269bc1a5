"""The fast inference path computes the same function as the eager model."""

import pytest
import torch
from torch import nn

import xception
from xception.fusion import CACHE_BUDGET, MicroBatched, fold_batchnorm, inference_model
from xception.layers import ClassifierHead
from xception.models.base import ImageClassifier


def with_random_statistics(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = xception.create_model(name).eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize(
    ("name", "size"),
    [("xception", 99), ("inception_v3", 99), ("mobilenet_v1", 64), ("inception_v3_paper", 99)],
)
def test_folding_keeps_the_function(name, size):
    model = with_random_statistics(name)
    folded = fold_batchnorm(model)
    x = torch.randn(2, 3, size, size + 7)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5)
    remaining = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    # Keras 1.x's conv -> ReLU -> BN order cannot fold; everything else does.
    assert (remaining > 0) == (name == "inception_v3_paper")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0  # original intact


def test_compiled_fast_path_matches_eager_and_is_frozen():
    model = with_random_statistics("xception_tiny")
    fast = inference_model(model, channels_last=True, compile=True)
    x = torch.randn(3, 3, 80, 80).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4)
        # Frozen: the convolution weights were baked (prepacked) into the compiled graph, so
        # changing them afterwards changes nothing; an unfrozen graph reads them every call.
        for conv in (m for m in fast.modules() if isinstance(m, nn.Conv2d)):
            conv.weight.zero_()
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("name", "size", "micro_batched", "whole_batch"),
    [
        ("xception_tiny", 96, ["entry_flow"], ["middle_flow", "exit_flow"]),
        ("inception_v3", 99, ["Conv2d_1a_3x3", "Mixed_5d", "Mixed_6a"], ["Mixed_6b", "Mixed_7c"]),
        ("mobilenet_v1", 64, ["conv1", "blocks.5"], ["blocks.6", "blocks.12"]),
    ],
)
def test_micro_batching_keeps_the_function_and_splits_at_stride_16(
    name, size, micro_batched, whole_batch
):
    model = fold_batchnorm(with_random_statistics(name))
    seen: dict[str, list[int]] = {}
    for stage in model.stage_names:
        model.get_submodule(stage).register_forward_pre_hook(
            lambda _, args, stage=stage: seen.setdefault(stage, []).append(len(args[0]))
        )
    x = torch.randn(5, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        micro = MicroBatched(model, 2)
        seen.clear()
        torch.testing.assert_close(micro(x), expected, rtol=1e-4, atol=1e-5)
    for stage in micro_batched:
        assert seen[stage] == [2, 2, 1], stage
    for stage in whole_batch:
        assert seen[stage] == [5], stage


def test_micro_batching_only_on_cpu_models_and_checks_input():
    model = with_random_statistics("xception_tiny")
    assert isinstance(inference_model(model), MicroBatched)
    assert not isinstance(inference_model(model.to("meta")), MicroBatched)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        inference_model(model)(torch.randn(2, 1, 96, 96))
    with pytest.raises(ValueError, match="micro_batch=0"):
        MicroBatched(model, 0)


def test_inference_models_stay_in_eval_mode_when_callers_restore_the_mode():
    # evaluate() and summary save .training, call eval() and restore it: a wrapper left in
    # training mode would put an unfoldable BatchNorm (Keras 1.x order) into training.
    model = with_random_statistics("inception_v3_paper")
    x = torch.randn(2, 3, 99, 99)
    with torch.no_grad():
        expected = model(x)
        for fast in (inference_model(model), inference_model(model, compile=True)):
            assert not any(m.training for m in fast.modules())
        fast = inference_model(model)
        was = fast.training
        fast.eval()
        fast.train(was)
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4)


def test_micro_batches_hold_the_largest_early_map_within_the_cache_budget():
    # Fig. 5's largest map is block 2's 128 channels at (size - 3) // 2 - 1 square; at width
    # 0.25 it has 32 channels: 32 x 45 x 45 float32 at 96 px, 128 x 147 x 147 at 299 px.
    tiny = MicroBatched(fold_batchnorm(with_random_statistics("xception_tiny")))
    assert tiny.micro_batch(torch.zeros(256, 3, 96, 96)) == CACHE_BUDGET // (32 * 45 * 45 * 4)
    # Other sizes scale by pixel count: 192 px holds about a quarter as many images.
    at_192 = tiny.micro_batch(torch.zeros(1, 3, 192, 192))
    assert CACHE_BUDGET // (32 * 93 * 93 * 4) <= at_192 <= CACHE_BUDGET // (4 * 32 * 45 * 45 * 4)
    full = inference_model(with_random_statistics("xception"))
    assert full.micro_batch(torch.zeros(8, 3, 299, 299)) == CACHE_BUDGET // (128 * 147 * 147 * 4)


class Plain(ImageClassifier):
    """An ImageClassifier with only what the base class asks for (no ``config``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, 16), nn.ReLU())
        self.head = ClassifierHead(16, 4)
        self.stage_names, self.feature_info = ("stem", "body"), []
        self.in_chans, self.min_input_size = 3, 32


def test_micro_batching_models_without_a_config_probes_a_default_size():
    model = Plain().eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(inference_model(model)(x), model(x), rtol=1e-5, atol=1e-6)
    # 8 channels at 111 x 111 after the stem, probed at 224 px, then scaled to 64 px.
    per_image = 8 * 111 * 111 * 4 / 224**2 * 64**2
    assert MicroBatched(model).micro_batch(x) == int(CACHE_BUDGET // per_image)


def test_probing_leaves_a_training_model_and_its_statistics_alone():
    model = xception.create_model("xception_tiny").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    MicroBatched(model)
    assert model.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
