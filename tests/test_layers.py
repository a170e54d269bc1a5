"""Layers against independent references: Keras (TensorFlow semantics) and closed forms."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xception.layers import (
    ClassifierHead,
    Conv2d,
    ConvNormAct,
    MaxPool2d,
    SeparableConv2d,
    _pad_same,
)

keras = pytest.importorskip("keras")


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def from_keras(y) -> torch.Tensor:
    return torch.as_tensor(np.asarray(keras.ops.convert_to_numpy(y))).permute(0, 3, 1, 2)


@pytest.mark.parametrize("size", [9, 10, 13, 74])
@pytest.mark.parametrize("stride", [1, 2])
def test_tf_padding_matches_keras_same(size, stride):
    torch.manual_seed(0)
    x = torch.randn(2, 5, size, size + 3)
    ref_conv = keras.layers.Conv2D(7, 3, strides=stride, padding="same", use_bias=False)
    expected = from_keras(ref_conv(to_nhwc(x)))
    conv = Conv2d(5, 7, 3, stride, padding="tf")
    kernel = np.asarray(keras.ops.convert_to_numpy(ref_conv.kernel))
    conv.weight.data = torch.as_tensor(kernel).permute(3, 2, 0, 1).contiguous()
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)

    pooled = from_keras(keras.layers.MaxPooling2D(3, strides=stride, padding="same")(to_nhwc(x)))
    torch.testing.assert_close(MaxPool2d(3, stride, "tf")(x), pooled)


def test_symmetric_padding_is_pytorch_style():
    x = torch.randn(1, 2, 74, 74)
    pool = MaxPool2d(3, 2, "symmetric")
    torch.testing.assert_close(pool(x), F.max_pool2d(x, 3, 2, 1))
    assert not torch.equal(pool(x), MaxPool2d(3, 2, "tf")(x))  # the 74x74 difference
    assert Conv2d(2, 2, 3, 2, "valid")(x).shape[-1] == 36


def test_separable_conv_matches_keras_separable_conv2d():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 11, 12)
    ref = keras.layers.SeparableConv2D(10, 3, padding="same", depth_multiplier=2, use_bias=False)
    expected = from_keras(ref(to_nhwc(x)))
    depthwise, pointwise = (np.asarray(keras.ops.convert_to_numpy(w)) for w in ref.weights)
    conv = SeparableConv2d(6, 10, 3, depth_multiplier=2)
    # Keras depthwise (k, k, C, m) -> grouped OIHW (C*m, 1, k, k), channel c*m + j.
    conv.spatial.weight.data = torch.as_tensor(depthwise).reshape(3, 3, 12, 1).permute(2, 3, 0, 1)
    conv.pointwise.weight.data = torch.as_tensor(pointwise).permute(3, 2, 0, 1).contiguous()
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 3, 6, 12])
@pytest.mark.parametrize("multiplier", [1, 2])
@pytest.mark.parametrize(("bias", "mid_norm"), [(False, False), (True, True)])
def test_separable_conv_parameter_count_closed_form(groups, multiplier, bias, mid_norm):
    cin, cout, k = 12, 20, 3
    conv = SeparableConv2d(
        cin, cout, k, groups=groups, depth_multiplier=multiplier, bias=bias, mid_norm=mid_norm
    )
    mid = multiplier * cin
    expected = k * k * cin * mid // groups + mid * cout
    expected += (mid + cout) * bias + 2 * mid * mid_norm
    assert sum(p.numel() for p in conv.parameters()) == expected


def test_groups_one_is_a_regular_conv_followed_by_a_pointwise_conv():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 9, 9)
    conv = SeparableConv2d(4, 8, groups=1)
    expected = F.conv2d(F.conv2d(x, conv.spatial.weight, padding=1), conv.pointwise.weight)
    torch.testing.assert_close(conv(x), expected)


def test_mid_activation_acts_between_the_stages():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 9, 9)
    linear = SeparableConv2d(4, 8)
    relu = SeparableConv2d(4, 8, mid_activation="relu")
    relu.load_state_dict(linear.state_dict())
    expected = relu.pointwise(F.relu(relu.spatial(x)))
    torch.testing.assert_close(relu(x), expected)
    assert not torch.allclose(relu(x), linear(x))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"groups": 5}, "groups"),
        ({"depth_multiplier": 0}, "depth_multiplier"),
        ({"padding": "same"}, "padding"),
        ({"mid_activation": "tanh"}, "activation"),
    ],
)
def test_separable_conv_rejects_invalid_options_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SeparableConv2d(12, 8, **kwargs)


def test_conv_norm_act_orders():
    assert list(ConvNormAct(3, 4, 3)._modules) == ["conv", "bn", "act"]
    assert list(ConvNormAct(3, 4, 3, norm_after_act=True)._modules) == ["conv", "act", "bn"]
    assert list(ConvNormAct(3, 4, 1, act="none")._modules) == ["conv", "bn"]


def test_classifier_head_dropout_acts_only_in_training():
    head = ClassifierHead(16, 3, dropout=0.5)
    x = torch.ones(64, 16, 2, 2)
    head.train()
    pre = head.dropout(head(x, pre_logits=True))
    assert 0 < (pre == 0).float().mean() < 1
    head.eval()
    torch.testing.assert_close(head(x), head.classifier(torch.ones(64, 16)))


def test_tf_max_pool_without_a_padded_copy_equals_pooling_the_padded_input():
    # Eager TF-SAME max pooling uses the op's own -inf padding and ceil mode instead of
    # padding a copy; it must equal pooling the explicitly -inf-padded input, values and
    # gradients, at every parity of height and width.
    pool = MaxPool2d(3, 2, "tf")
    for h, w in itertools.product(range(3, 14), range(3, 14)):
        x = torch.randn(2, 3, h, w, requires_grad=True)
        padded = _pad_same(x, (3, 3), (2, 2), (1, 1), value=float("-inf"))
        expected = F.max_pool2d(padded, 3, 2)
        out = pool(x)
        assert out.shape == expected.shape == (2, 3, -(-h // 2), -(-w // 2))
        assert torch.equal(out, expected)
        grad = torch.randn_like(out)
        (ours,) = torch.autograd.grad(out, x, grad)
        (reference,) = torch.autograd.grad(expected, x, grad)
        assert torch.equal(ours, reference)
