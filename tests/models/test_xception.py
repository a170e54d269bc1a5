"""Xception against the paper's figures, timm's port, and its own invariants."""

import pytest
import torch

import xception
from xception.interop.timm import timm_xception_key

PAPER_PARAMS = 22_855_952
# Input channels of every separable convolution in Fig. 5, in order.
SEPCONV_INPUTS = [64, 128, 128, 256, 256, 728, *[728] * 24, 728, 728, 1024, 1536]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_is_the_papers():
    model = xception.create_model("xception")
    assert n_params(model) == PAPER_PARAMS
    running_stats = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    assert n_params(model) + running_stats == 22_910_480


def test_without_residuals_the_four_projection_shortcuts_go():
    projections = sum(
        cin * cout + 2 * cout for cin, cout in [(64, 128), (128, 256), (256, 728), (728, 1024)]
    )
    model = xception.create_model("xception", residual=False)
    assert n_params(model) == PAPER_PARAMS - projections == 21_878_880


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_spatial_groups_walk_the_spectrum(groups):
    extra = sum(9 * c * c // groups - 9 * c for c in SEPCONV_INPUTS)
    model = xception.create_model("xception", spatial_groups=groups)
    assert n_params(model) == PAPER_PARAMS + extra


def test_fc_head_and_mid_norm_parameter_counts():
    fc = xception.create_model("xception", fc_layers=(4096, 4096))
    hidden = 2048 * 4096 + 4096 + 4096 * 4096 + 4096
    assert n_params(fc) == PAPER_PARAMS + hidden + 4096 * 1000 - 2048 * 1000
    mid_norm = xception.create_model("xception", mid_norm=True)
    assert n_params(mid_norm) == PAPER_PARAMS + 2 * sum(SEPCONV_INPUTS)


def test_spatial_sizes_follow_the_paper():
    model = xception.create_model("xception").eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 299, 299)
        assert model.entry_flow.block1.conv1(x).shape[-1] == 149
        maps = model.forward_intermediates(x)
    assert [tuple(m.shape[1:]) for m in maps] == [
        (64, 147, 147),
        (128, 74, 74),
        (256, 37, 37),
        (728, 19, 19),
        (2048, 10, 10),
    ]
    assert [i.channels for i in model.feature_info] == [64, 128, 256, 728, 2048]
    assert [i.reduction for i in model.feature_info] == [2, 4, 8, 16, 32]


@pytest.mark.parametrize(("output_stride", "last"), [(16, 19), (8, 37)])
def test_output_stride_dilates_instead_of_reducing(output_stride, last):
    model = xception.create_model(
        "xception", output_stride=output_stride, features_only=True
    ).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 299, 299))
    assert maps[-1].shape[-1] == last
    assert max(model.reductions) == output_stride
    # The stride-32 model's weights less its classifier: dilation changes no shape.
    assert n_params(model) == PAPER_PARAMS - (2048 * 1000 + 1000)


def test_parameters_line_up_with_timms_legacy_xception():
    timm = pytest.importorskip("timm")
    ours = xception.create_model("xception").state_dict()
    theirs = timm.create_model("legacy_xception").state_dict()
    assert [timm_xception_key(k) for k in ours] == list(theirs)
    assert all(ours[k].shape == theirs[timm_xception_key(k)].shape for k in ours)


def test_outputs_equal_timms_with_its_padding_and_bn_epsilon():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("legacy_xception").eval()
    for bn in (m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    state = reference.state_dict()
    model = xception.create_model("xception", padding="symmetric", bn_eps=1e-5).eval()
    model.load_state_dict({k: state[timm_xception_key(k)] for k in model.state_dict()})
    paper = xception.create_model("xception").eval()
    paper.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 299, 299)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        # TF padding differs from the port at the 74x74 max-pool: a real difference.
        assert not torch.allclose(paper(x), expected, rtol=1e-4, atol=1e-5)


def test_runs_from_the_minimum_size_at_any_batch_and_memory_format():
    model = xception.create_model("xception_tiny").eval()
    x = torch.randn(3, 3, 71, 83)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
        last = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert batched.shape == (3, 1000)
    torch.testing.assert_close(single, batched, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last, batched, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 70, 71), (1, 3, 71, 70), (1, 1, 99, 99), (3, 99, 99)])
def test_bad_input_names_the_expected_shape(shape):
    model = xception.create_model("xception_tiny")
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\) with H, W >= 71"):
        model(torch.randn(shape))


def test_dropout_acts_in_training_and_not_in_evaluation():
    torch.manual_seed(0)
    model = xception.create_model("xception_tiny", num_classes=10, dropout=0.5)
    x = torch.randn(2, 3, 71, 71)
    features = model.forward_features(x)
    model.train()
    assert not torch.allclose(model.forward_head(features), model.forward_head(features))
    model.eval()
    torch.testing.assert_close(model.forward_head(features), model.forward_head(features))


def test_knobs_change_the_computation():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 71, 71)
    base = xception.create_model("xception_tiny").eval()
    for override in ({"mid_activation": "relu"}, {"global_pool": "max"}):
        variant = xception.create_model("xception_tiny", **override).eval()
        variant.load_state_dict(base.state_dict())
        assert not torch.allclose(variant(x), base(x))


def test_num_classes_zero_and_reset_classifier():
    model = xception.create_model("xception_tiny", num_classes=0).eval()
    x = torch.randn(1, 3, 71, 71)
    assert model(x).shape == (1, model.num_features) == (1, 512)
    model.reset_classifier(7)
    assert model(x).shape == (1, 7) and model.num_classes == 7


def test_small_and_tiny_are_scaled_members_of_the_family():
    for name, width, middle in (("xception_small", 0.5, 4), ("xception_tiny", 0.25, 2)):
        model = xception.create_model(name)
        same = xception.create_model("xception", width_multiplier=width, middle_blocks=middle)
        assert n_params(model) == n_params(same) < PAPER_PARAMS
        assert all(i.channels % 8 == 0 for i in model.feature_info)
        assert len(model.middle_flow) == middle


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"spatial_groups": 16}, "spatial_groups"),
        ({"spatial_groups": 0}, "spatial_groups"),
        ({"middle_blocks": -1}, "middle_blocks"),
        ({"width_multiplier": 0.0}, "width_multiplier"),
        ({"output_stride": 4}, "output_stride"),
        ({"mid_activation": "tanh"}, "mid_activation"),
        ({"dropout": 1.5}, "dropout"),
        ({"image_size": 64}, "image_size"),
        ({"in_chans": 0}, "in_chans"),
        ({"num_classes": -1}, "num_classes"),
        ({"fc_layers": (0,)}, "fc_layers"),
        ({"padding": "same"}, "padding"),
    ],
)
def test_invalid_config_fails_at_construction_naming_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        xception.create_model("xception", **override)


def test_dynamic_batch_export_matches_eager():
    model = xception.create_model("xception").eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    x = torch.randn(2, 3, 71, 71)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    y = torch.randn(5, 3, 71, 71)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(y), model(y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"fc_layers": 4096}, "fc_layers"),
        ({"middle_blocks": 2.5}, "middle_blocks"),
        ({"residual": "maybe"}, "residual"),
    ],
)
def test_wrongly_typed_options_name_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        xception.create_model("xception", **override)


@pytest.mark.parametrize("activation", ["none", "relu", "elu"])
def test_the_papers_no_activation_reaches_every_pointwise_convolution_untouched(activation):
    """Fig. 10's arms differ only between the two stages of each separable convolution:
    with "none", what every pointwise convolution reads is exactly what the depthwise one
    wrote (no code path inserts a non-linearity there); with ReLU or ELU it is that
    non-linearity of it, in every one of the model's separable layers."""
    from xception.layers import SeparableConv2d

    model = xception.create_model("xception_tiny", mid_activation=activation).eval()
    units = [m for m in model.modules() if isinstance(m, SeparableConv2d)]
    written, read = {}, {}
    for index, unit in enumerate(units):
        unit.spatial.register_forward_hook(lambda _m, _i, out, k=index: written.__setitem__(k, out))
        unit.pointwise.register_forward_pre_hook(lambda _m, i, k=index: read.__setitem__(k, i[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 96, 96))
    expected = {"none": lambda t: t, "relu": torch.relu, "elu": torch.nn.functional.elu}
    assert len(units) == 3 * 2 + 2 * 3 + 2 + 2 and len(read) == len(units)  # Fig. 5, tiny
    for index in range(len(units)):
        assert (written[index] < 0).any()  # a non-linearity would change something
        torch.testing.assert_close(read[index], expected[activation](written[index]))
