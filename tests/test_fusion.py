"""The fast inference path computes the same function as the eager model."""

import pytest
import torch
from torch import nn

import xception
from xception.fusion import fold_batchnorm, inference_model


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


def test_compiled_channels_last_fast_path_matches_eager():
    model = with_random_statistics("xception_tiny")
    fast = inference_model(model, channels_last=True, compile=True)
    x = torch.randn(2, 3, 80, 80).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
