"""Inception V3: the paper's Table 3 figure, torchvision parity, and the model contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import inception_v3 as torchvision_inception_v3

import xception
import xception.models.inception_v3  # registers the models
from xception.layers import Conv2d, ConvNormAct, scaled_channels
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
        ("width_multiplier", 0.0),
        ("width_multiplier", -0.5),
        ("fc_layers", 4096),
        ("fc_layers", (4096, 0)),
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


# Width multiplier and hidden FC layers (the Table 2 reproduction at small scale).

VARIANTS = ["inception_v3", "inception_v3_paper"]


def valid(size: int, kernel: int = 3, stride: int = 1) -> int:
    return (size - kernel) // stride + 1


def tap_sizes(size: int) -> list[int]:
    """Spatial sides at the five taps: valid 3x3/2 conv, valid 3x3, 'same' 3x3 (stride 2);
    3x3/2 pool, 1x1, valid 3x3 (4); then three 3x3/2 valid reductions (8, 16, 32)."""
    s2 = valid(valid(size, 3, 2))
    s4 = valid(valid(s2, 3, 2))
    s8 = valid(s4, 3, 2)
    s16 = valid(s8, 3, 2)
    return [s2, s4, s8, s16, valid(s16, 3, 2)]


@pytest.mark.parametrize("width", [0.5, 0.25])
@pytest.mark.parametrize("name", VARIANTS)
def test_narrow_models_run_and_expose_consistent_features(name: str, width: float) -> None:
    model = build(name, width_multiplier=width, num_classes=10)
    extractor = xception.create_model(name, features_only=True, width_multiplier=width).eval()
    # Mixed_7c concatenates 320, 2 x 2 x 384 and 192 channel towers, each scaled on its own.
    last = scaled_channels(320, width) + 4 * scaled_channels(384, width)
    last += scaled_channels(192, width)
    assert model.num_features == extractor.channels[-1] == last
    assert model.head.classifier.in_features == last
    assert extractor.channels[:2] == [scaled_channels(64, width), scaled_channels(192, width)]
    for size in (80, 96):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert model(x).shape == (2, 10)
            maps = extractor(x)
        assert [tuple(m.shape[1:]) for m in maps] == [
            (c, s, s) for c, s in zip(extractor.channels, tap_sizes(size), strict=True)
        ]


@pytest.mark.parametrize("width", [0.5, 0.25])
@pytest.mark.parametrize("name", VARIANTS)
def test_every_conv_is_scaled_from_its_full_width_counterpart(name: str, width: float) -> None:
    full = xception.create_model(name, aux_logits=True, num_classes=10)
    narrow = xception.create_model(name, aux_logits=True, num_classes=10, width_multiplier=width)
    convs = {n: m for n, m in full.named_modules() if isinstance(m, nn.Conv2d)}
    narrow_convs = {n: m for n, m in narrow.named_modules() if isinstance(m, nn.Conv2d)}
    assert list(narrow_convs) == list(convs)
    assert len(convs) == 94 + 2  # 94 conv units in the trunk, 2 in the aux tower
    for key, conv in convs.items():
        assert narrow_convs[key].out_channels == scaled_channels(conv.out_channels, width), key
        assert narrow_convs[key].kernel_size == conv.kernel_size, key
    assert narrow.Conv2d_1a_3x3.conv.in_channels == 3
    assert narrow.AuxLogits.head.classifier.in_features == scaled_channels(768, width)
    # The aux tower taps Mixed_6e (four 192-channel towers) and runs in training.
    assert narrow.AuxLogits.conv0.conv.in_channels == 4 * scaled_channels(192, width)
    narrow.train()
    logits, aux = narrow(torch.randn(2, 3, AUX_MIN_INPUT_SIZE, AUX_MIN_INPUT_SIZE))
    assert logits.shape == aux.shape == (2, 10)


def test_width_one_is_the_default_model(modern: InceptionV3) -> None:
    explicit = build("inception_v3", width_multiplier=1.0)
    assert [(k, v.shape) for k, v in explicit.state_dict().items()] == [
        (k, v.shape) for k, v in modern.state_dict().items()
    ]


def test_fc_layers_add_the_jft_head(model: InceptionV3) -> None:
    name = "inception_v3_paper" if model.config.paper_topology else "inception_v3"
    with_fc = build(name, fc_layers=(4096, 4096))
    base = sum(p.numel() for p in model.parameters())
    added = 2048 * 4096 + 4096 + 4096 * 4096 + 4096 + (4096 * 1000 + 1000) - (2048 * 1000 + 1000)
    assert sum(p.numel() for p in with_fc.parameters()) == base + added
    hidden = [m for m in with_fc.head.fc if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in hidden] == [(2048, 4096), (4096, 4096)]
    assert with_fc.head.classifier.in_features == 4096
    with torch.no_grad():
        features = with_fc.forward_features(torch.randn(2, 3, 75, 75))
        assert with_fc.forward_head(features, pre_logits=True).shape == (2, 4096)
        assert with_fc.forward_head(features).shape == (2, 1000)


def test_fc_layers_on_a_narrow_model() -> None:
    model = build("inception_v3_paper", width_multiplier=0.25, fc_layers=(64, 32), num_classes=7)
    hidden = [m for m in model.head.fc if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in hidden] == [
        (model.num_features, 64),
        (64, 32),
    ]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 80, 80)).shape == (2, 7)
