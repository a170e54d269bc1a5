"""timm / Cadene weights convert into files that reproduce timm's outputs."""

import pytest
import torch
from safetensors.torch import save_file

from xception.interop.timm import convert_timm
from xception.registry import create_model, load_model
from xception.weights import read_metadata

timm = pytest.importorskip("timm")


def randomized(name: str, num_classes: int = 1000) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return model


@pytest.fixture(scope="module")
def reference():
    return {
        "xception": randomized("legacy_xception", 7),
        "inception_v3": randomized("inception_v3", 5),
    }


@pytest.mark.parametrize(
    ("ours", "suffix", "cadene"),
    [
        ("xception", ".safetensors", False),
        ("xception", ".pth", True),
        ("inception_v3", ".pth", False),
    ],
)
def test_converted_weights_reproduce_timm(reference, tmp_path, ours, suffix, cadene):
    source = reference[ours]
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if cadene:
        state = {
            k.replace("fc.", "last_linear.", 1) if k.startswith("fc.") else k: v
            for k, v in state.items()
        }
    path = tmp_path / f"timm{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    out = tmp_path / "ours.safetensors"
    convert_timm(path, ours, out)
    model, meta = load_model(out)
    assert meta["source"]["format"] == "timm" and len(meta["source"]["sha256"]) == 64
    assert len(meta["classes"]) == source.num_classes
    by_name = create_model(ours, weights=out)  # as the README loads it: the file's numerics
    assert by_name.config == model.config
    for size in ((299, 299), (171, 150)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), source(x), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(by_name.eval()(x), source(x), rtol=1e-4, atol=1e-5)


def test_notop_converts_the_backbone_only(reference, tmp_path):
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in reference["xception"].state_dict().items()}, path)
    out = tmp_path / "ours.safetensors"
    convert_timm(path, "xception", out, include_top=False)
    model, _ = load_model(out)
    x = torch.randn(1, 3, 299, 299)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(x),
            reference["xception"].forward_head(
                reference["xception"].forward_features(x), pre_logits=True
            ),
            rtol=1e-4,
            atol=1e-5,
        )


def test_partial_wrong_and_unsafe_files_fail_cleanly(reference, tmp_path):
    state = {k: v.contiguous() for k, v in reference["xception"].state_dict().items()}
    del state["block3.skip.weight"]
    partial = tmp_path / "partial.safetensors"
    save_file(state, partial)
    with pytest.raises(ValueError, match=r"lacks entry_flow.block4.shortcut.conv.weight"):
        convert_timm(partial, "xception", tmp_path / "out.safetensors")
    inception = tmp_path / "inception.safetensors"
    save_file(
        {k: v.contiguous() for k, v in reference["inception_v3"].state_dict().items()}, inception
    )
    with pytest.raises(ValueError, match="lacks entry_flow"):
        convert_timm(inception, "xception", tmp_path / "out.safetensors")
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"weights": object()}, unsafe)
    with pytest.raises(ValueError, match="holds Python objects that cannot be loaded safely"):
        convert_timm(unsafe, "xception", tmp_path / "out.safetensors")
    with pytest.raises(FileNotFoundError):
        convert_timm(tmp_path / "missing.pth", "xception", tmp_path / "out.safetensors")
    with pytest.raises(ValueError, match="supports xception, inception_v3"):
        convert_timm(partial, "mobilenet_v1", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_metadata_carries_imagenet_classes_for_1000_class_weights(tmp_path):
    source = timm.create_model("inception_v3").eval()
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    convert_timm(path, "inception_v3", tmp_path / "ours.safetensors")
    meta = read_metadata(tmp_path / "ours.safetensors")
    assert len(meta["classes"]) == 1000 and meta["classes"][0] == "tench"
    assert meta["preprocessing"]["image_size"] == 299


def test_convert_command_writes_once_and_names_problems(reference, tmp_path, capsys):
    from xception.cli import main

    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in reference["inception_v3"].state_dict().items()}, path)
    out = tmp_path / "ours.safetensors"
    argv = ["convert", str(path), "--from", "timm", "--model", "inception_v3", "--out", str(out)]
    assert main(argv) == 0 and out.is_file()
    before = out.read_bytes()
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main([*argv, "--overwrite", "--notop"]) == 0
    assert load_model(out)[0].num_classes == 0
    assert (
        main(
            [
                "convert",
                str(tmp_path / "none.pth"),
                "--from",
                "keras",
                "--model",
                "xception",
                "--out",
                str(tmp_path / "x.safetensors"),
            ]
        )
        == 2
    )
