"""Weight files: safetensors with JSON metadata, strict loads that name what is wrong."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import xception
from xception.weights import load_weights, read_metadata, save_weights


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


class _Payload:
    """Pickles as a call to ``Path.touch``: loading it unsafely would create the marker."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_in_one_line_without_unsafe_advice(
    tmp_path, capsys
):
    from xception.cli import main

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"weight": _Payload(marker)}, evil)
    assert main(["convert", str(evil), "--model", "xception", "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "holds Python objects that cannot be loaded safely" in err
    assert err.count("\n") == 1 and "weights_only" not in err
    assert not marker.exists()


def _malformed(good, tmp_path):
    """Files like ``good`` with one thing wrong each: (name, metadata changes, tensor change)."""
    import json

    from safetensors import safe_open

    with safe_open(good, "pt") as f:
        meta = f.metadata()
    tensors = load_file(good)
    config = json.loads(meta["config"])
    conv = next(k for k, v in tensors.items() if v.dim() == 4)
    cases = {
        "config_list": ({"config": "[1, 2]"}, None),
        "config_string": ({"config": '"big"'}, None),
        "config_unknown_option": ({"config": json.dumps({**config, "groups": 4})}, None),
        "model_unknown": ({"model": '"resnet"'}, None),
        "classes_int": ({"classes": "5"}, None),
        "classes_short": ({"classes": '["a", "b"]'}, None),
        "classes_not_strings": ({"classes": "[1, 2, 3]"}, None),
        "preprocessing_big": ({"preprocessing": '{"image_size": "big"}'}, None),
        "huge_head": ({"config": json.dumps({**config, "num_classes": 10**12})}, None),
        "int64_conv": ({}, lambda t: {**t, conv: t[conv].to(torch.int64)}),
        "bool_conv": ({}, lambda t: {**t, conv: t[conv] > 0}),
        "nan_weights": ({}, lambda t: {**t, conv: torch.full_like(t[conv], float("nan"))}),
        "inf_statistics": (
            {},
            lambda t: {k: v.fill_(float("inf")) if "running_var" in k else v for k, v in t.items()},
        ),
        "missing_tensor": ({}, lambda t: {k: v for k, v in t.items() if k != conv}),
        "wrong_shape": ({}, lambda t: {**t, conv: t[conv][:1]}),
    }
    for name, (changes, change) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(change(dict(tensors)) if change else tensors, path, metadata={**meta, **changes})
        yield name, path
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:1000])
    yield "truncated", tmp_path / "truncated.safetensors"
    (tmp_path / "empty.safetensors").write_bytes(b"")
    yield "empty", tmp_path / "empty.safetensors"


def test_malformed_weight_files_end_in_one_line_and_a_nonzero_exit(tmp_path, capsys):
    from PIL import Image

    from xception.cli import main

    model = xception.create_model("xception_tiny", num_classes=3).eval()
    good = tmp_path / "good.safetensors"
    pre = {"image_size": 72, "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3}
    save_weights(model, good, "xception_tiny", {"classes": ["a", "b", "c"], "preprocessing": pre})
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 40), (200, 20, 20)).save(image)
    assert main(["predict", "--weights", str(good), str(image)]) == 0
    capsys.readouterr()
    tried = 0
    for name, path in _malformed(good, tmp_path):
        assert main(["predict", "--weights", str(path), str(image)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert str(path) in err, (name, err)
        tried += 1
    assert tried == 17
    nan = tmp_path / "nan_weights.safetensors"
    # loaded anyway when asked; the NaN outputs are then an error row, not an answer
    assert main(["predict", "--weights", str(nan), str(image), "--allow-nonfinite"]) == 1
    assert "the model's outputs are not finite" in capsys.readouterr().out
