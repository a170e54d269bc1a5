"""The registry: names, overrides, models built from weight files (whose recorded
architecture is authoritative), and every model under compile/export."""

import pytest
import torch
from safetensors.torch import save_file

import xception
from xception.registry import get_entry
from xception.weights import save_weights

PAPER_COUNTS = {
    "xception": 22_855_952,
    "inception_v3_paper": 23_626_728,
    "inception_v3": 23_834_568,
    "mobilenet_v1": 4_231_976,
}


@pytest.mark.parametrize(("name", "count"), PAPER_COUNTS.items())
def test_registered_models_have_the_papers_parameter_counts(name, count):
    model = xception.create_model(name)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count


def test_list_models_names_the_families():
    names = xception.list_models()
    for name in [
        "xception",
        "xception_small",
        "xception_tiny",
        "inception_v3",
        "inception_v3_paper",
        "mobilenet_v1",
        "mobilenet_v1_075",
        "mobilenet_v1_050",
        "mobilenet_v1_025",
    ]:
        assert name in names


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'xceptoin'; known models: .*xception"):
        xception.create_model("xceptoin")


def test_unknown_override_lists_the_options():
    with pytest.raises(ValueError, match=r"unknown xception option 'residuals'.*residual"):
        xception.create_model("xception", residuals=False)


def test_num_classes_and_overrides_reach_the_config():
    model = xception.create_model("xception_tiny", num_classes=10, residual=False)
    assert model.config.num_classes == 10 and not model.config.residual
    assert model.num_classes == 10


def test_a_weights_file_builds_the_network_it_records(tmp_path):
    """Files converted from timm record symmetric padding and BN epsilon 1e-5: loading
    one by its model name must not build the registry's TF padding and 1e-3 instead."""
    torch.manual_seed(0)
    saved = xception.create_model("xception_tiny", padding="symmetric", bn_eps=1e-5).eval()
    randomise_batchnorm(saved)
    path = tmp_path / "timm_style.safetensors"
    save_weights(saved, path, "xception_tiny")
    x = torch.randn(2, 3, 75, 75)
    for loaded in (
        xception.create_model("xception_tiny", weights=path),
        xception.create_model(weights=path),
        xception.load_model(path)[0],
    ):
        assert loaded.config == saved.config
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x), saved(x), rtol=0, atol=0)


def randomise_batchnorm(model):
    """Real statistics, so that a wrong epsilon or padding changes the outputs visibly."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            shape = module.running_var.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(shape, generator=generator) * 1e-3 + 1e-4)


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("xception_tiny", {"padding": "tf"}, r"saved with padding='symmetric'; padding='tf'"),
        ("xception_tiny", {"bn_eps": 1e-3}, r"saved with bn_eps=1e-05; bn_eps=0.001"),
        ("xception_tiny", {"global_pool": "max"}, r"global_pool='avg'; global_pool='max'"),
        ("xception_tiny", {"residual": False}, r"residual=True; residual=False"),
        ("xception", {}, r"holds xception_tiny with middle_blocks=2; xception has middle_blocks=8"),
        ("inception_v3", {}, r"holds xception_tiny weights, which inception_v3 cannot take"),
        ("xception_tiny", {"num_classes": 10}, r"has 1000 classes, not num_classes=10"),
        ("xception_tiny", {"mid_activation": "tanh"}, r"mid_activation='tanh' is not one of"),
        ("xception_tiny", {"depth": 3}, r"unknown xception_tiny option 'depth'"),
    ],
)
def test_what_would_change_a_files_function_fails_naming_both_values(
    tmp_path, name, overrides, message
):
    path = tmp_path / "w.safetensors"
    saved = xception.create_model("xception_tiny", padding="symmetric", bn_eps=1e-5)
    save_weights(saved, path, "xception_tiny")
    with pytest.raises(ValueError, match=message):
        xception.create_model(name, weights=path, **overrides)


def test_another_name_with_overrides_that_match_the_file_loads_it(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(xception.create_model("xception_tiny"), path, "xception_tiny")
    tiny = xception.create_model("xception", weights=path, width_multiplier=0.25, middle_blocks=2)
    assert tiny.config == xception.model_config("xception_tiny")


def test_training_settings_may_differ_from_the_files(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(xception.create_model("xception_tiny"), path, "xception_tiny")
    model = xception.create_model(
        "xception_tiny", weights=path, dropout=0.5, bn_momentum=0.1, image_size=128
    )
    assert (model.config.dropout, model.config.bn_momentum, model.config.image_size) == (
        0.5,
        0.1,
        128,
    )
    backbone = xception.create_model(weights=path, features_only=True, output_stride=16)
    assert backbone.reductions[-1] == 16


def test_plain_safetensors_files_load_into_the_named_model(tmp_path):
    model = xception.create_model("xception_tiny", num_classes=3)
    path = tmp_path / "plain.safetensors"
    save_file(model.state_dict(), path)
    loaded = xception.create_model("xception_tiny", num_classes=3, weights=path)
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError, match=r"not an xception weights file.*pass the model name"):
        xception.load_model(path)


def test_files_recording_unknown_models_or_configs_fail_cleanly(tmp_path):
    model = xception.create_model("xception_tiny")
    path = tmp_path / "w.safetensors"
    save_weights(model, path, "xception_huge")
    with pytest.raises(ValueError, match="records model 'xception_huge', which this version"):
        xception.load_model(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(
        state,
        path,
        metadata={"format": "xception", "model": "xception_tiny", "config": '{"depth": 2}'},
    )
    with pytest.raises(
        ValueError, match=r"records an invalid config: unknown xception_tiny option 'depth'"
    ):
        xception.load_model(path)


SMALL = {"xception_tiny": 71, "inception_v3": 75, "mobilenet_v1_025": 32}


@pytest.mark.parametrize("name", xception.list_models())
def test_every_model_exports_and_matches_eager(name):
    model = xception.create_model(name).eval()
    x = torch.randn(2, model.in_chans, model.min_input_size, model.min_input_size + 5)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "size"), SMALL.items())
def test_models_compile_and_match_eager(name, size):
    model = xception.create_model(name).eval()
    x = torch.randn(2, 3, size, size).to(memory_format=torch.channels_last)
    torch._dynamo.reset()  # the models share ImageClassifier.forward's frame
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_registry_entries_describe_themselves():
    for name in xception.list_models():
        entry = get_entry(name)
        assert entry.description and entry.config.num_classes == 1000
