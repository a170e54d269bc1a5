"""Inception V3: the paper's Table 3 figure, torchvision parity, and the model contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import inception_v3 as torchvision_inception_v3

import xception
import xception.models.inception_v3  # registers the models
from xception.layers import Conv2d, ConvNormAct
from xception.models.inception_v3 import AUX_MIN_INPUT_SIZE, InceptionV3, torchvision_key_map


def build(name: str, **overrides: object) -> InceptionV3:
    model = xception.create_model(name, **overrides)
    assert isinstance(model, InceptionV3)
    return model.eval()


@pytest.fixture(scope="module")
def modern() -> InceptionV3:
    return build("inception_v3")


@pytest.fixture(scope="module")
def paper() -> InceptionV3:
    return build("inception_v3_paper")


@pytest.fixture(scope="module", params=["inception_v3", "inception_v3_paper"])
def model(request: pytest.FixtureRequest, modern: InceptionV3, paper: InceptionV3) -> InceptionV3:
    return modern if request.param == "inception_v3" else paper


def parameter_groups(model: nn.Module) -> dict[str, int]:
    groups = dict.fromkeys(("conv weights", "conv biases", "bn gamma/beta", "fc"), 0)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            groups["conv weights"] += module.weight.numel()
            groups["conv biases"] += 0 if module.bias is None else module.bias.numel()
        elif isinstance(module, nn.BatchNorm2d):
            groups["bn gamma/beta"] += module.weight.numel() + module.bias.numel()
        elif isinstance(module, nn.Linear):
            groups["fc"] += sum(p.numel() for p in module.parameters())
    return groups


def randomized_torchvision(aux_logits: bool = False) -> nn.Module:
    """torchvision's model with non-trivial BatchNorm statistics, so parity means something."""
    torch.manual_seed(0)
    reference = torchvision_inception_v3(weights=None, aux_logits=aux_logits, init_weights=False)
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, 0.0, 0.1)
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return reference.eval()


# Paper, Table 3 and section 3 of the project sheet.


def test_modern_parameter_count(modern: InceptionV3) -> None:
    assert sum(p.numel() for p in modern.parameters()) == 23_834_568


def test_paper_parameter_count_and_decomposition(paper: InceptionV3) -> None:
    assert sum(p.numel() for p in paper.parameters()) == 23_626_728
    assert parameter_groups(paper) == {
        "conv weights": 21_526_368,
        "conv biases": 17_120,
        "bn gamma/beta": 34_240,
        "fc": 2_049_000,
    }


def test_paper_unit_is_biased_conv_relu_then_batchnorm(paper: InceptionV3) -> None:
    units = [m for m in paper.modules() if isinstance(m, ConvNormAct)]
    assert len(units) == 94
    for unit in units:
        assert list(dict(unit.named_children())) == ["conv", "act", "bn"]
        assert unit.conv.bias is not None
        assert (unit.bn.eps, unit.bn.momentum) == (1e-3, 0.01)


def test_modern_unit_is_conv_batchnorm_relu(modern: InceptionV3) -> None:
    for unit in (m for m in modern.modules() if isinstance(m, ConvNormAct)):
        assert list(dict(unit.named_children())) == ["conv", "bn", "act"]
        assert unit.conv.bias is None


def test_paper_topology_details(paper: InceptionV3, modern: InceptionV3) -> None:
    assert paper.Mixed_6e.branch7x7dbl_1.conv.out_channels == 160
    assert modern.Mixed_6e.branch7x7dbl_1.conv.out_channels == 192
    assert isinstance(paper.Mixed_7a.pool, nn.AvgPool2d)
    assert isinstance(modern.Mixed_7a.pool, nn.MaxPool2d)
    # Keras/TF SAME average pooling ignores the padding; torchvision's counts it.
    assert not paper.Mixed_5b.pool.count_include_pad
    assert modern.Mixed_5b.pool.count_include_pad


@pytest.mark.parametrize(
    ("name", "channels"),
    [("inception_v3", [256, 288, 288, 768]), ("inception_v3_paper", [256, 256, 256, 736])],
)
def test_35x35_modules_and_reduction_channels(name: str, channels: list[int]) -> None:
    model = build(name)
    blocks = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a"]
    outputs: dict[str, torch.Tensor] = {}
    for block in blocks:
        model.get_submodule(block).register_forward_hook(
            lambda module, args, out, block=block: outputs.__setitem__(block, out)
        )
    with torch.no_grad():
        model(torch.randn(1, 3, 75, 75))
    assert [outputs[block].shape[1] for block in blocks] == channels
    assert [model.get_submodule(block).out_channels for block in blocks] == channels


# Parity with torchvision.


def test_state_dict_maps_one_to_one_onto_torchvision(modern: InceptionV3) -> None:
    reference = torchvision_inception_v3(weights=None, aux_logits=False, init_weights=False)
    mapping = torchvision_key_map(modern)
    assert list(mapping.values()) == list(reference.state_dict())
    ours, theirs = list(modern.named_parameters()), list(reference.named_parameters())
    assert len(ours) == len(theirs)
    for (name, param), (ref_name, ref_param) in zip(ours, theirs, strict=True):
        assert (mapping[name], param.shape) == (ref_name, ref_param.shape)


@pytest.fixture(scope="module")
def torchvision_pair() -> tuple[InceptionV3, nn.Module]:
    reference = randomized_torchvision()
    ours = build("inception_v3")
    state = reference.state_dict()
    ours.load_state_dict({k: state[v] for k, v in torchvision_key_map(ours).items()}, strict=True)
    return ours, reference


@pytest.mark.parametrize("size", [(299, 299), (107, 150)])
def test_outputs_match_torchvision(
    torchvision_pair: tuple[InceptionV3, nn.Module], size: tuple[int, int]
) -> None:
    ours, reference = torchvision_pair
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)


def test_tf_and_symmetric_padding_coincide(torchvision_pair: tuple[InceptionV3, nn.Module]) -> None:
    """Every 'same' layer is stride 1 with an odd kernel: TF SAME needs no dynamic padding."""
    symmetric = torchvision_pair[0]
    tf = build("inception_v3", padding="tf")
    assert not any(m.dynamic_padding for m in tf.modules() if isinstance(m, Conv2d))
    tf.load_state_dict(symmetric.state_dict())
    x = torch.randn(1, 3, 80, 91)
    with torch.no_grad():
        torch.testing.assert_close(tf(x), symmetric(x), atol=0, rtol=0)


# The model contract: input checks, feature taps, memory formats, options.


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("inception_v3", [64, 192, 288, 768, 2048]),
        ("inception_v3_paper", [64, 192, 256, 768, 2048]),
    ],
)
def test_feature_pyramid_at_299(name: str, channels: list[int]) -> None:
    extractor = xception.create_model(name, features_only=True).eval()
    assert extractor.channels == channels
    assert extractor.reductions == [2, 4, 8, 16, 32]
    with torch.no_grad():
        maps = extractor(torch.randn(1, 3, 299, 299))
    assert [tuple(m.shape[1:]) for m in maps] == [
        (c, s, s) for c, s in zip(channels, [147, 71, 35, 17, 8], strict=True)
    ]


def test_smallest_input_runs(model: InceptionV3) -> None:
    with torch.no_grad():
        assert model(torch.randn(1, 3, 75, 75)).shape == (1, 1000)


@pytest.mark.parametrize("shape", [(1, 3, 74, 74), (1, 3, 75, 74), (1, 1, 75, 75), (3, 75, 75)])
def test_bad_input_raises_with_expected_shape(modern: InceptionV3, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\) with H, W >= 75"):
        modern(torch.randn(shape))


def test_channels_last_matches_contiguous(model: InceptionV3) -> None:
    x = torch.randn(2, 3, 107, 150)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(
            model(x.to(memory_format=torch.channels_last)), expected, atol=1e-5, rtol=1e-5
        )


def test_aux_tower_matches_torchvision_layout_and_returns_a_pair_in_training() -> None:
    model = xception.create_model("inception_v3", aux_logits=True, num_classes=10)
    reference = torchvision_inception_v3(
        weights=None, aux_logits=True, init_weights=False, num_classes=10
    )
    mapping = torchvision_key_map(model)
    assert list(mapping.values()) == list(reference.state_dict())
    assert [p.shape for p in model.parameters()] == [p.shape for p in reference.parameters()]

    model.train()
    logits, aux = model(torch.randn(2, 3, AUX_MIN_INPUT_SIZE, AUX_MIN_INPUT_SIZE))
    assert logits.shape == aux.shape == (2, 10)
    with pytest.raises(ValueError, match="aux_logits"):
        model(torch.randn(2, 3, AUX_MIN_INPUT_SIZE - 1, AUX_MIN_INPUT_SIZE))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 75, 75)).shape == (1, 10)


def test_without_aux_there_is_no_aux_tower(modern: InceptionV3) -> None:
    assert modern.AuxLogits is None
    assert not any(key.startswith("AuxLogits") for key in modern.state_dict())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dropout", 1.5),
        ("global_pool", "median"),
        ("num_classes", -1),
        ("in_chans", 0),
        ("padding", "valid"),
        ("image_size", 74),
        ("bn_eps", 0.0),
    ],
)
def test_invalid_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        xception.create_model("inception_v3", **{field: value})


def test_options(modern: InceptionV3) -> None:
    assert xception.model_config("inception_v3_paper").paper_topology
    assert modern.num_features == 2048
    model = build("inception_v3", num_classes=0, in_chans=1, global_pool="max")
    with torch.no_grad():
        assert model(torch.randn(2, 1, 75, 75)).shape == (2, 2048)
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 75, 75)).shape == (2, 5)
