"""Keras weight import against Keras itself: keras.applications models with random weights
(BatchNorm statistics included), saved in both file formats with and without their
classifier, converted, reloaded from our file and compared output for output."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import xception
from xception.interop.keras import INCEPTION_V3_KERAS_ORDER, convert_keras, load_keras_state
from xception.layers import ConvNormAct
from xception.registry import load_model

keras = pytest.importorskip("keras")  # conftest.py selects the torch backend
h5py = pytest.importorskip("h5py")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:keras")

FORMATS = ("h5", "weights.h5")  # legacy HDF5 (keras.applications' files), Keras 3
# max |ours - Keras| / max |Keras|, float32, after 36 (Xception) to 94 (Inception) layers.
RTOL = 1e-4


# ----------------------------------------------------------------------- Keras side


def randomise(model: Any, rng: np.random.Generator) -> None:
    """Every weight from ``rng``: He-scaled kernels (so that a random deep net neither fades
    nor saturates, and border or ordering errors still show in the logits), BatchNorm
    statistics and affine terms far from the identity, random biases."""
    draws = {
        "gamma": lambda shape: rng.uniform(0.5, 1.5, shape),
        "beta": lambda shape: rng.normal(0, 0.2, shape),
        "moving_mean": lambda shape: rng.normal(0, 0.2, shape),
        "moving_variance": lambda shape: rng.uniform(0.5, 1.5, shape),
        "bias": lambda shape: rng.normal(0, 0.2, shape),
    }
    for layer in model.layers:
        for weight in layer.weights:
            shape = weight.shape
            if weight.name in draws:
                value = draws[weight.name](shape)
            else:  # kernel (k, k, in, out) or (in, out); depthwise (k, k, C, m)
                depthwise = weight.name == "depthwise_kernel"
                depthwise |= isinstance(layer, keras.layers.DepthwiseConv2D)
                fan_in = np.prod(shape[:2] if depthwise else shape[:-1])
                value = rng.normal(0, (2 / fan_in) ** 0.5, shape)
            weight.assign(value.astype(np.float32))


def write_legacy(model: Any, path: Path) -> None:
    """Keras 3 only saves ``.weights.h5``; its legacy writer still makes the old layout."""
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, model)


def keras2_name(name: str) -> str:
    """Keras 2 numbered auto names from 1 (``conv2d_1`` was Keras 3's ``conv2d``)."""
    match = re.fullmatch(r"(conv2d|batch_normalization)(?:_(\d+))?", name)
    return f"{match[1]}_{int(match[2] or 0) + 1}" if match else name


def write_keras2(model: Any, path: Path) -> None:
    """The layout of keras.applications' downloads, written by Keras 2: ``:0`` weight names
    nested under the layer's group, here with ``layer_names`` split into two chunks."""
    names = [keras2_name(layer.name).encode() for layer in model.layers]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names0"], f.attrs["layer_names1"] = np.array_split(np.array(names), 2)
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.1.4"
        for layer, name in zip(model.layers, names, strict=True):
            group = f.create_group(name.decode())
            weights = layer.trainable_weights + layer.non_trainable_weights
            weight_names = [f"{name.decode()}/{w.name}:0" for w in weights]
            group.attrs["weight_names"] = [n.encode() for n in weight_names]
            for weight_name, weight in zip(weight_names, weights, strict=True):
                group.create_dataset(weight_name, data=keras.ops.convert_to_numpy(weight))


def save(model: Any, path: Path) -> None:
    if path.name.endswith(".weights.h5"):
        model.save_weights(path)
    else:
        write_legacy(model, path)


def run_keras(model: Any, x: np.ndarray) -> Any:
    with torch.no_grad():
        out = model(x, training=False)
    if isinstance(out, list | tuple):
        return [keras.ops.convert_to_numpy(o) for o in out]
    return keras.ops.convert_to_numpy(out)


# ------------------------------------------------------------------------- the cases


@dataclass
class Case:
    """One keras.applications model with random weights, its files and our conversions."""

    top: Any  # with the classifier (logits: no softmax), fixed input size
    notop: Any  # include_top=False, pooling="avg", any input size, the same weights
    classifier: str
    files: dict[tuple[str, bool], Path]  # (format, include_top) -> Keras file
    converted: dict[tuple[str, bool], Path]  # (format, include_top) -> our converted file
    models: dict[tuple[str, bool], nn.Module]  # our model, reloaded from the converted file

    def logits(self, pooled: np.ndarray) -> np.ndarray:
        """Keras' classifier on Keras' pooled features: logits at any input size."""
        head = self.top.get_layer(self.classifier)
        x = pooled[:, None, None] if len(head.kernel.shape) == 4 else pooled  # 1x1 conv_preds
        return run_keras(head, x).reshape(len(pooled), -1)


def make_case(
    tmp: Path, factory: Any, model_name: str, size: int, classifier: str, **kwargs: Any
) -> Case:
    keras.utils.clear_session()  # auto names (conv2d_1, ...) restart, whatever ran before
    top = factory(weights=None, classifier_activation=None, input_shape=(size, size, 3), **kwargs)
    randomise(top, np.random.default_rng(0))
    notop = factory(
        weights=None, include_top=False, pooling="avg", input_shape=(None, None, 3), **kwargs
    )
    notop.set_weights(top.get_weights()[:-2])  # all but the classifier's kernel and bias
    files, converted, models = {}, {}, {}
    for fmt in FORMATS:
        for include_top, reference in ((True, top), (False, notop)):
            path = tmp / f"{model_name}{'' if include_top else '_notop'}.{fmt}"
            save(reference, path)
            out = tmp / f"{path.name}.safetensors"
            convert_keras(path, model_name, out, include_top=include_top)
            files[fmt, include_top], converted[fmt, include_top] = path, out
            models[fmt, include_top] = load_model(out)[0].eval()
    return Case(top, notop, classifier, files, converted, models)


@pytest.fixture(scope="module")
def xception_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    tmp = tmp_path_factory.mktemp("keras_xception")
    return make_case(tmp, keras.applications.Xception, "xception", 299, "predictions")


@pytest.fixture(scope="module")
def inception_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    tmp = tmp_path_factory.mktemp("keras_inception")
    return make_case(tmp, keras.applications.InceptionV3, "inception_v3", 299, "predictions")


@pytest.fixture(scope="module")
def mobilenet_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    tmp = tmp_path_factory.mktemp("keras_mobilenet")
    return make_case(
        tmp, keras.applications.MobileNet, "mobilenet_v1_025", 224, "conv_preds", alpha=0.25
    )


CASES = ("xception_case", "inception_case", "mobilenet_case")


# --------------------------------------------------------------------------- helpers


def inputs(batch: int, size: tuple[int, int]) -> np.ndarray:
    """NHWC images in the [-1, 1] range the reference preprocessing produces."""
    return np.random.default_rng(1).uniform(-1, 1, (batch, *size, 3)).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def run(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(nchw(x)).numpy()


def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    error = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert error < RTOL, f"relative error {error:.2e}"


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("case_name", CASES)
def test_both_formats_and_notop_files_give_the_same_tensors(
    request: pytest.FixtureRequest, case_name: str
) -> None:
    case: Case = request.getfixturevalue(case_name)
    for include_top in (True, False):
        assert_same_state(case.models["h5", include_top], case.models["weights.h5", include_top])
    top, notop = (case.models["h5", t].state_dict() for t in (True, False))
    assert notop.keys() == {k for k in top if not k.startswith("head.classifier.")}
    assert all(torch.equal(tensor, top[key]) for key, tensor in notop.items())


@pytest.mark.parametrize(
    ("case_name", "batch", "size"),
    [("xception_case", 2, 299), ("inception_case", 1, 299), ("mobilenet_case", 2, 224)],
)
def test_logits_equal_keras_at_the_reference_size(
    request: pytest.FixtureRequest, case_name: str, batch: int, size: int
) -> None:
    case: Case = request.getfixturevalue(case_name)
    x = inputs(batch, (size, size))
    assert_close(run(case.models["h5", True], x), run_keras(case.top, x))


@pytest.mark.parametrize(
    ("case_name", "model_name"),
    [("xception_case", "xception"), ("inception_case", "inception_v3")],
)
def test_files_loaded_by_model_name_equal_keras(
    request: pytest.FixtureRequest, case_name: str, model_name: str
) -> None:
    """``create_model(name, weights=FILE)`` as the README shows builds the file's network:
    Keras' InceptionV3 needs its average pools without the padding in the count."""
    case: Case = request.getfixturevalue(case_name)
    model = xception.create_model(model_name, weights=case.converted["h5", True]).eval()
    x = inputs(1, (299, 299))
    assert_close(run(model, x), run_keras(case.top, x))
    notop = xception.create_model(model_name, weights=case.converted["h5", False]).eval()
    x = inputs(1, (224, 224))
    assert_close(run(notop, x), run_keras(case.notop, x))


# Xception at 150 pads a 72x72 max-pool (0, 1); MobileNet needs multiples of 32 (its docs).
@pytest.mark.parametrize(
    ("case_name", "size"),
    [("xception_case", (150, 150)), ("inception_case", (139, 157)), ("mobilenet_case", (160, 192))],
)
def test_notop_files_give_keras_pooled_features_and_logits_at_other_sizes(
    request: pytest.FixtureRequest, case_name: str, size: tuple[int, int]
) -> None:
    case: Case = request.getfixturevalue(case_name)
    x = inputs(1, size)
    pooled = run_keras(case.notop, x)
    notop = case.models["weights.h5", False]
    assert notop.num_classes == 0
    assert_close(run(notop, x), pooled)
    assert_close(run(case.models["weights.h5", True], x), case.logits(pooled))


# Keras layers whose output (or input: the unnamed residual adds) is each feature tap.
XCEPTION_TAPS = (
    ("entry_flow.block1", "block1_conv2_act", "output"),
    ("entry_flow.block2", "block3_sepconv1_act", "input"),
    ("entry_flow.block3", "block4_sepconv1_act", "input"),
    ("middle_flow", "block13_sepconv1_act", "input"),
    ("exit_flow", "block14_sepconv2_act", "output"),
)


def test_xception_feature_maps_and_logits_equal_keras_with_asymmetric_padding(
    xception_case: Case,
) -> None:
    """201x173: TF SAME pads odd and even sides differently all the way down."""
    case, x = xception_case, inputs(1, (201, 173))
    model = case.models["h5", True]
    assert [info.module for info in model.feature_info] == [tap[0] for tap in XCEPTION_TAPS]
    notop = case.notop
    outputs = [getattr(notop.get_layer(layer), end) for _, layer, end in XCEPTION_TAPS]
    *maps, pooled = run_keras(keras.Model(notop.input, [*outputs, notop.output]), x)
    with torch.no_grad():
        ours = model.forward_intermediates(nchw(x))
        logits = model.forward_head(ours[-1]).numpy()
    for our_map, keras_map in zip(ours, maps, strict=True):
        assert_close(our_map.permute(0, 2, 3, 1).numpy(), keras_map)
    assert_close(logits, case.logits(pooled))


# --------------------------------------------------------------------- file variants


def test_keras2_files_with_chunked_layer_names_convert_identically(
    xception_case: Case, tmp_path: Path
) -> None:
    """keras.applications' own downloads: auto names from ``conv2d_1``, ``kernel:0``."""
    path = tmp_path / "xception_weights_tf_dim_ordering_tf_kernels.h5"
    write_keras2(xception_case.top, path)
    with h5py.File(path) as f:
        assert "layer_names" not in f.attrs
        assert "conv2d_1/kernel:0" in f["conv2d_1"]
    state = load_keras_state(path, xception.create_model("xception"))
    expected = xception_case.models["h5", True].state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_inception_v3_file_records_keras_pooling_and_scale_free_batchnorm(
    inception_case: Case, tmp_path: Path
) -> None:
    model = inception_case.models["h5", True]
    assert model.config.avg_pool_count_include_pad is False  # saved, so it reloads identically
    bn = model.Mixed_5b.branch1x1.bn
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))  # Keras' scale=False
    torchvision_style = xception.create_model("inception_v3")
    with pytest.raises(ValueError, match="avg_pool_count_include_pad=False"):
        load_keras_state(inception_case.files["h5", True], torchvision_style)


def test_inception_v3_keras_order_lists_every_conv_unit_once() -> None:
    model = xception.create_model("inception_v3")
    units = [name for name, m in model.named_modules() if isinstance(m, ConvNormAct)]
    assert len(INCEPTION_V3_KERAS_ORDER) == len(set(INCEPTION_V3_KERAS_ORDER)) == 94
    assert sorted(INCEPTION_V3_KERAS_ORDER) == sorted(units)


def test_full_model_h5_checks_batchnorm_epsilon(mobilenet_case: Case, tmp_path: Path) -> None:
    path = tmp_path / "mobilenet.h5"
    mobilenet_case.top.save(path)  # legacy full model: weights under model_weights + config
    model = xception.create_model("mobilenet_v1_025")
    model.load_state_dict(load_keras_state(path, model))
    assert_same_state(model, mobilenet_case.models["h5", True])

    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        layer = next(lay for lay in config["config"]["layers"] if lay["name"] == "conv1_bn")
        layer["config"]["epsilon"] = 1e-5
        f.attrs["model_config"] = json.dumps(config)
    with pytest.raises(ValueError, match=r"'conv1_bn' uses BatchNorm epsilon 1e-05, the model"):
        load_keras_state(path, model)


# ------------------------------------------------------------------------ error paths


@pytest.mark.parametrize("fmt", FORMATS)
def test_notop_file_into_a_model_with_classifier_names_it(mobilenet_case: Case, fmt: str) -> None:
    path = mobilenet_case.files[fmt, False]
    missing = r"lacks Keras layer 'conv_preds' \(for head.classifier\).*include_top=False"
    with pytest.raises(ValueError, match=missing):
        load_keras_state(path, xception.create_model("mobilenet_v1_025"))
    with pytest.raises(ValueError, match=missing):
        convert_keras(path, "mobilenet_v1_025", path.with_suffix(".out"))


def test_file_with_classifier_into_notop_fails_naming_it(mobilenet_case: Case) -> None:
    path = mobilenet_case.files["h5", True]
    with pytest.raises(ValueError, match=r"first Keras layer 'conv_preds'.*include_top=True"):
        load_keras_state(path, xception.create_model("mobilenet_v1_025", 0), include_top=False)


def test_another_architecture_names_the_first_offending_layer(mobilenet_case: Case) -> None:
    path = mobilenet_case.files["weights.h5", True]
    shapes = r"'conv1' gives conv1.conv.weight of shape \(8, 3, 3, 3\).*expects \(32, 3, 3, 3\)"
    with pytest.raises(ValueError, match=shapes):
        load_keras_state(path, xception.create_model("mobilenet_v1"))
    with pytest.raises(ValueError, match=r"lacks Keras layer 'block1_conv1'"):
        convert_keras(path, "xception", path.with_suffix(".out"))


def test_non_keras_numerics_are_refused(mobilenet_case: Case) -> None:
    model = xception.create_model("mobilenet_v1_025", padding="symmetric")
    with pytest.raises(ValueError, match="padding='tf'"):
        load_keras_state(mobilenet_case.files["h5", True], model)


def test_unreadable_files_fail_with_one_line(mobilenet_case: Case, tmp_path: Path) -> None:
    data = mobilenet_case.files["h5", True].read_bytes()
    (tmp_path / "truncated.h5").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.h5").write_text("not hdf5\n")
    h5py.File(tmp_path / "empty.h5", "w").close()
    for name, match in (
        ("truncated.h5", "not a readable Keras HDF5 file"),
        ("text.h5", "not a readable Keras HDF5 file"),
        ("empty.h5", "not Keras weights"),
    ):
        with pytest.raises(ValueError, match=match) as error:
            load_keras_state(tmp_path / name, xception.create_model("mobilenet_v1_025"))
        assert "\n" not in str(error.value)
        assert error.value.__cause__ is None  # and no h5py traceback chained:
        assert error.value.__context__ is None or error.value.__suppress_context__
    with pytest.raises(FileNotFoundError):
        convert_keras(tmp_path / "missing.h5", "mobilenet_v1_025", tmp_path / "out")


def test_keras_before_3_6_weights_h5_is_refused(mobilenet_case: Case, tmp_path: Path) -> None:
    path = tmp_path / "old.weights.h5"
    shutil.copy(mobilenet_case.files["weights.h5", True], path)
    with h5py.File(path, "r+") as f:
        for entry in f["layers"].values():
            entry["vars"].attrs.pop("name", None)
    with pytest.raises(ValueError, match=r"Keras < 3\.6.*layer names"):
        load_keras_state(path, xception.create_model("mobilenet_v1_025"))


def test_a_converted_keras_notop_file_fine_tunes_with_a_new_head(
    xception_case: Case, image_folder: Path, tmp_path: Path
) -> None:
    """Keras' `Xception(include_top=False)` weights -> convert -> train --init-weights."""
    xception.train(
        "finetune",
        init_weights=xception_case.converted["h5", False],
        data=image_folder,
        image_size=71,
        batch_size=4,
        max_steps=1,
        workers=0,
        out=tmp_path / "run",
        progress=False,
    )
    log = (tmp_path / "run" / "run.log").read_text()
    assert "new head.classifier for 3 classes (the file's had no classifier)" in log
    model, metadata = xception.load_model(tmp_path / "run" / "last.safetensors")
    assert model.config.padding == "tf" and model.config.bn_eps == 1e-3  # Keras' numerics
    assert metadata["classes"] == ["blue", "green", "red"]
