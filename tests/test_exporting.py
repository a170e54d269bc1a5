"""ONNX and torch.export exports match the eager model (at several batch sizes and, for
dynamic-size graphs, at sizes other than the example's, odd ones included: TF SAME padding is
asymmetric there) and carry the weights file's classes and preprocessing."""

import dataclasses
import importlib.util
import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from xception.data.transforms import Preprocessing, normalize
from xception.exporting import (
    _smallest_dynamic_size,
    export_onnx,
    export_program,
    load_onnx_session,
    load_program,
    predict_onnx_batch,
)
from xception.registry import create_model
from xception.weights import save_weights

# onnxscript: torch.onnx.export(dynamo=True) builds its graphs with it
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")
needs_onnx = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ONNX_MODULES),
    reason="needs the export extra: " + ", ".join(ONNX_MODULES),
)
CLASSES = ["cat", "dog", "fox", "owl"]


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def make_weights(path, name, size, multi_label=False):
    """A weights file with random BatchNorm statistics and a large classifier, so logits
    are of order 1-10 and the relative tolerance means something."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=len(CLASSES))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    model.head.classifier.weight.data.uniform_(-1, 1)
    pre = Preprocessing(image_size=size)
    metadata = {
        "classes": CLASSES,
        "preprocessing": dataclasses.asdict(pre),
        "multi_label": multi_label,
    }
    save_weights(model, path, name, metadata)
    return path, model.eval(), pre


def images(*shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 2 - 1


def run(session, x):
    return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_weights(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", "xception_tiny", 96)


@pytest.fixture(scope="module")
def tiny_onnx(tiny, tmp_path_factory):
    """xception_tiny (TF padding, strided 3x3 and 1x1 convs) with dynamic height and width."""
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert export_onnx(tiny[0], out, dynamic_size=True) == out
    return out


@needs_onnx
def test_onnx_dynamic_size_matches_pytorch(tiny, tiny_onnx):
    import onnx

    _, model, _ = tiny
    onnx.checker.check_model(onnx.load(tiny_onnx))
    session, _ = load_onnx_session(tiny_onnx)
    assert [d for d in session.get_inputs()[0].shape] == ["batch", 3, "height", "width"]
    # batch 1 and 3 at the example size; then even, odd and non-square sizes, where the
    # asymmetric TF SAME pads differ from the example's
    for shape in ((1, 3, 96, 96), (3, 3, 96, 96), (2, 3, 80, 80), (2, 3, 97, 97), (1, 3, 71, 89)):
        x = images(*shape)
        with torch.no_grad():
            expected = model(x)
        close(run(session, x), expected)


@needs_onnx
def test_onnx_metadata_round_trips(tiny, tiny_onnx):
    import onnx

    _, _, pre = tiny
    props = {p.key for p in onnx.load(tiny_onnx).metadata_props}
    assert {"xception.model", "xception.config", "xception.classes"} <= props
    assert {"xception.preprocessing", "xception.multi_label"} <= props
    _, metadata = load_onnx_session(tiny_onnx)
    assert metadata["model"] == "xception_tiny"
    assert metadata["classes"] == CLASSES
    assert metadata["preprocessing"] == json.loads(json.dumps(dataclasses.asdict(pre)))
    assert metadata["multi_label"] is False
    assert metadata["config"]["width_multiplier"] == 0.25


@needs_onnx
def test_predict_onnx_batch_matches_pytorch(tiny, tiny_onnx):
    _, model, pre = tiny
    session, _ = load_onnx_session(tiny_onnx)
    batch = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(normalize(batch, pre, torch.float32))
    close(predict_onnx_batch(session, batch, pre), expected)


@needs_onnx
def test_onnx_batch_is_always_dynamic(tmp_path):
    """MobileNet at its 32 px minimum, where its last map is 1x1 (as Inception V3's at
    75 px) and torch.export treats size-1 dimensions specially: the batch stays dynamic."""
    import onnx

    size = 32
    weights, model, _ = make_weights(tmp_path / "w.safetensors", "mobilenet_v1_025", size, True)
    out = export_onnx(weights, tmp_path / "m.onnx", opset=18)
    onnx.checker.check_model(onnx.load(out))
    session, metadata = load_onnx_session(out)
    assert session.get_inputs()[0].shape == ["batch", 3, size, size]
    assert metadata["multi_label"] is True
    for batch in (1, 3):
        x = images(batch, 3, size, size)
        with torch.no_grad():
            expected = model(x)
        close(run(session, x), expected)


@pytest.mark.parametrize(
    ("name", "smallest"), [("mobilenet_v1_025", 33), ("xception_tiny", 71), ("inception_v3", 107)]
)
def test_a_dynamic_size_range_starts_where_the_last_map_is_2x2(name, smallest):
    """At 32 px MobileNet's last map is 1x1 (70 for Xception, 106 for Inception V3)."""
    overrides = {"width_multiplier": 0.25} if name == "inception_v3" else {}
    model = create_model(name, num_classes=3, **overrides).eval()
    assert _smallest_dynamic_size(model) == smallest


def test_program_matches_eager_and_keeps_metadata(tiny, tmp_path):
    weights, model, pre = tiny
    out = export_program(weights, tmp_path / "tiny.pt2")
    program, metadata = load_program(out)
    for batch in (1, 4):
        x = images(batch, 3, 96, 96)
        with torch.no_grad():
            close(program.module()(x), model(x))
    assert metadata["classes"] == CLASSES
    assert metadata["preprocessing"] == json.loads(json.dumps(dataclasses.asdict(pre)))
    assert metadata["model"] == "xception_tiny"


@pytest.mark.parametrize(
    ("export", "load"),
    [
        (export_program, load_program),
        pytest.param(export_onnx, load_onnx_session, marks=needs_onnx),
    ],
)
def test_missing_or_foreign_files_fail_clearly(tmp_path, tiny, export, load):
    with pytest.raises(FileNotFoundError):
        export(tmp_path / "missing.safetensors", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing")
    plain = tmp_path / "plain.safetensors"  # no metadata at all
    save_file({"weight": torch.zeros(2)}, str(plain))
    unlabelled = tmp_path / "unlabelled.safetensors"  # a model, but no classes
    save_weights(create_model("mobilenet_v1_025", num_classes=2), unlabelled, "mobilenet_v1_025")
    for weights, message in (
        (plain, "is not an xception weights file"),
        (unlabelled, "carries no classes or preprocessing metadata"),
    ):
        with pytest.raises(ValueError, match=message):
            export(weights, tmp_path / "out")
    with pytest.raises(ValueError, match="raw"):
        export(tiny[0], tmp_path / "out", raw=True)
    assert not list(tmp_path.glob("out*"))


def test_missing_onnx_names_the_extra(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"xception\[export\]"):
        export_onnx(tiny[0], tmp_path / "m.onnx")
