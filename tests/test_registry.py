"""The registry: names, overrides, weight files, and every model under compile/export."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import xception
from xception.registry import get_entry
from xception.weights import load_weights, read_metadata, save_weights

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
    with pytest.raises(ValueError, match=r"no option 'residuals'.*residual"):
        xception.create_model("xception", residuals=False)


def test_num_classes_and_overrides_reach_the_config():
    model = xception.create_model("xception_tiny", num_classes=10, residual=False)
    assert model.config.num_classes == 10 and not model.config.residual
    assert model.num_classes == 10


def test_weights_round_trip_through_a_safetensors_file(tmp_path):
    torch.manual_seed(0)
    model = xception.create_model("xception_tiny", num_classes=5).eval()
    path = tmp_path / "w.safetensors"
    save_weights(model, path, "xception_tiny", {"classes": ["a", "b", "c", "d", "e"]})
    loaded = xception.create_model("xception_tiny", num_classes=5, weights=path).eval()
    x = torch.randn(2, 3, 71, 71)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    meta = read_metadata(path)
    assert meta["model"] == "xception_tiny" and meta["config"]["num_classes"] == 5
    assert meta["classes"] == ["a", "b", "c", "d", "e"]
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind


def test_mismatched_weights_name_the_first_offending_tensor(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(xception.create_model("xception_tiny", num_classes=5), path, "xception_tiny")
    target = xception.create_model("xception_tiny", num_classes=7)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"head.classifier.weight has shape \(5, 512\).*\(7, 512\)"
    ):
        load_weights(target, path)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    state = load_file(path)
    del state["entry_flow.block2.shortcut.conv.weight"]
    save_file(state, path)
    with pytest.raises(ValueError, match=r"lacks entry_flow.block2.shortcut.conv.weight \(expe"):
        xception.create_model("xception_tiny", num_classes=5, weights=path)


def test_missing_or_corrupt_weight_files_fail_cleanly(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        xception.create_model("xception_tiny", weights=tmp_path / "nope.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        xception.create_model("xception_tiny", weights=corrupt)
    good = tmp_path / "good.safetensors"
    save_weights(xception.create_model("xception_tiny"), good, "xception_tiny")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        xception.create_model("xception_tiny", weights=truncated)


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
