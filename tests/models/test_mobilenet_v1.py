"""MobileNet V1 against its figures and against keras.applications.MobileNet itself."""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn

import xception
import xception.models.mobilenet_v1  # registers the models
from xception.models.mobilenet_v1 import MobileNetV1Config, keras_layer_order

# Trainable parameters with 1000 classes; 4,231,976 is the reference figure (PAPER.md 3).
PARAMETERS = {
    "mobilenet_v1": (1.0, 4_231_976),
    "mobilenet_v1_075": (0.75, 2_585_560),
    "mobilenet_v1_050": (0.5, 1_331_592),
    "mobilenet_v1_025": (0.25, 470_072),
}
# Keras 3 on NumPy 2 warns about __array__ on every weight it reads or writes.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:keras")


@pytest.fixture(scope="module")
def keras() -> ModuleType:
    os.environ.setdefault("KERAS_BACKEND", "torch")  # read once, when keras is imported
    return pytest.importorskip("keras")


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def keras_trainable(keras_model) -> int:
    return sum(int(np.prod(w.shape)) for w in keras_model.trainable_weights)


@pytest.mark.parametrize(("name", "expected"), [(n, p) for n, (_, p) in PARAMETERS.items()])
def test_parameter_counts(name: str, expected: int) -> None:
    assert count(xception.create_model(name)) == expected


@pytest.mark.parametrize(("name", "alpha_and_count"), PARAMETERS.items())
def test_counts_equal_keras(keras: ModuleType, name: str, alpha_and_count) -> None:
    alpha, expected = alpha_and_count
    reference = keras.applications.MobileNet(weights=None, alpha=alpha, input_shape=(224, 224, 3))
    assert keras_trainable(reference) == expected == count(xception.create_model(name))


def randomise(keras_model, rng: np.random.Generator) -> None:
    """Every weight from ``rng``: He-scaled kernels, BN statistics and affine terms far from
    the identity, and logits spread enough that the softmax is far from uniform."""
    for layer in keras_model.layers:
        weights = layer.get_weights()
        if layer.name.endswith("_bn"):
            shape = weights[0].shape
            gamma, beta = rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.2, shape)
            mean, var = rng.normal(0, 0.2, shape), rng.uniform(0.5, 1.5, shape)
            layer.set_weights([gamma, beta, mean, var])
        elif weights:  # (k, k, in, out) or depthwise (k, k, C, 1), + bias for conv_preds
            kernel = weights[0].shape
            fan_in = np.prod(kernel[:2]) * (1 if layer.name.startswith("conv_dw_") else kernel[2])
            layer.set_weights([rng.normal(0, (2 / fan_in) ** 0.5, w.shape) for w in weights])


def to_torch(keras_name: str, weight: np.ndarray) -> torch.Tensor:
    """Keras layout -> PyTorch layout for one weight of ``keras_name``."""
    if weight.ndim == 4 and keras_name.startswith("conv_dw_"):  # (k, k, C, 1) -> (C, 1, k, k)
        weight = weight.transpose(2, 3, 0, 1).reshape(-1, 1, *weight.shape[:2])
    elif weight.ndim == 4 and keras_name == "conv_preds":  # (1, 1, C, classes) -> Linear
        weight = weight[0, 0].T
    elif weight.ndim == 4:  # HWIO -> OIHW
        weight = weight.transpose(3, 2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))


def load_keras(model: nn.Module, keras_model) -> None:
    state = {}
    for keras_name, path in keras_layer_order():
        weights = keras_model.get_layer(keras_name).get_weights()
        names = ("weight", "bias", "running_mean", "running_var")[: len(weights)]
        state |= {
            f"{path}.{n}": to_torch(keras_name, w) for n, w in zip(names, weights, strict=False)
        }
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(key.endswith("num_batches_tracked") for key in missing)


def test_keras_layer_order_is_module_order() -> None:
    model = xception.create_model("mobilenet_v1")
    weighted = [name for name, m in model.named_modules() if list(m.parameters(recurse=False))]
    assert weighted == [path for _, path in keras_layer_order()]


# 223 is odd (asymmetric TF padding in the stem) yet Keras' explicit pads agree from there on.
@pytest.mark.parametrize("size", [(224, 224), (160, 223)])
def test_outputs_equal_keras(keras: ModuleType, size: tuple[int, int]) -> None:
    reference = keras.applications.MobileNet(weights=None, alpha=0.25, input_shape=(*size, 3))
    weighted = [layer.name for layer in reference.layers if layer.weights]
    assert weighted == [name for name, _ in keras_layer_order()]
    rng = np.random.default_rng(0)
    randomise(reference, rng)
    model = xception.create_model("mobilenet_v1_025").eval()
    load_keras(model, reference)

    x = rng.normal(size=(2, *size, 3)).astype(np.float32)
    expected = keras.ops.convert_to_numpy(reference(x, training=False))
    with torch.no_grad():
        logits = model(torch.from_numpy(x).permute(0, 3, 1, 2))
    probs = logits.softmax(-1).numpy()
    assert np.log(expected).std() > 1  # not two near-uniform outputs
    np.testing.assert_allclose(probs, expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("padding", ["tf", "symmetric"])
@pytest.mark.parametrize("size", [32, 224])
def test_runs_and_trains(size: int, padding: str) -> None:
    model = xception.create_model("mobilenet_v1_025", num_classes=10, padding=padding)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert model.conv1.conv.weight.grad is not None


def test_too_small_input_names_the_shape() -> None:
    model = xception.create_model("mobilenet_v1_025")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\) with H, W >= 32"):
        model(torch.randn(1, 3, 31, 64))


def test_channels_last_gives_the_same_result() -> None:
    torch.manual_seed(0)
    model = xception.create_model("mobilenet_v1_025").eval()
    x = torch.randn(2, 3, 97, 113)  # odd sizes exercise the asymmetric TF padding
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_feature_taps() -> None:
    model = xception.create_model("mobilenet_v1_050", features_only=True)
    maps = model(torch.randn(1, 3, 96, 128))
    assert model.reductions == [2, 4, 8, 16, 32]
    assert model.channels == [32, 64, 128, 256, 512]
    for m, channels, reduction in zip(maps, model.channels, model.reductions, strict=True):
        assert m.shape == (1, channels, -(96 // -reduction), -(128 // -reduction))


def test_activation_option() -> None:
    keras_like = xception.create_model("mobilenet_v1_025")
    paper = xception.create_model("mobilenet_v1_025", activation="relu")
    assert sum(isinstance(m, nn.ReLU6) for m in keras_like.modules()) == 27
    assert not any(isinstance(m, nn.ReLU6) for m in paper.modules())
    assert count(paper) == count(keras_like)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -0.5}, "alpha"),
        ({"alpha": 0.01}, "alpha"),
        ({"dropout": 1.5}, "dropout"),
        ({"activation": "gelu"}, "activation"),
        ({"padding": "valid"}, "padding"),
        ({"image_size": 31}, "image_size"),
    ],
)
def test_invalid_config_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MobileNetV1Config(**overrides)
    with pytest.raises(ValueError, match=field):
        xception.create_model("mobilenet_v1", **overrides)


def test_any_alpha() -> None:
    model = xception.create_model("mobilenet_v1", alpha=0.3, num_classes=5).eval()
    assert model.num_features == int(1024 * 0.3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
