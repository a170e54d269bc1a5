"""Export a self-describing weights file to ONNX (onnxruntime, TensorRT, ...) or to a
torch.export program (``.pt2``: AOTInductor, ExecuTorch), carrying the class names and
preprocessing along so the exported file is as self-describing as the weights.

Both go through ``torch.export.export``: it fails loudly when a dimension marked dynamic
would be specialised, where ``torch.onnx.export`` alone silently falls back to a graph with
the example's sizes baked in.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from xception import __version__
from xception.data.transforms import Preprocessing, normalize
from xception.files import atomic_write, cache_folder, sha256
from xception.registry import load_model

if TYPE_CHECKING:
    import onnxruntime

INPUT, OUTPUT = "images", "logits"
AXES = {0: "batch", 2: "height", 3: "width"}  # names of the input's dynamic axes
PREFIX = "xception."  # ONNX metadata_props keys
PROGRAM_METADATA = "xception.json"  # the .pt2 archive's extra file
INSTALL_HINT = "pip install 'xception[export]'"
EXAMPLE_BATCH = 2  # torch.export specialises dimensions whose example size is 0 or 1


def _require(*modules: str) -> list[Any]:
    """Import the optional export dependencies, naming the extra that provides them."""
    try:
        return [importlib.import_module(name) for name in modules]
    except ImportError as error:
        raise ImportError(f"{error.name} is not installed: {INSTALL_HINT}") from error


def _load(weights: Path, raw: bool) -> tuple[nn.Module, dict[str, Any], int]:
    """The float32 eval model, the metadata to embed and the image size it was trained at."""
    model, metadata = load_model(weights, raw=raw)
    missing = [key for key in ("classes", "preprocessing") if key not in metadata]
    if missing:
        raise ValueError(f"{weights} carries no {' or '.join(missing)} metadata")
    size = int(metadata["preprocessing"].get("image_size", Preprocessing.image_size))
    embedded = {
        "model": metadata["model"],
        "config": metadata.get("config", {}),
        "classes": metadata["classes"],
        "preprocessing": metadata["preprocessing"],
        "multi_label": bool(metadata.get("multi_label", False)),
    }
    return model.float().eval(), embedded, size


def _last_map_size(model: nn.Module, size: int) -> int:
    with torch.no_grad():
        return model.forward_features(torch.zeros(1, model.in_chans, size, size)).shape[-1]


def _smallest_dynamic_size(model: nn.Module) -> int:
    """The smallest input size whose last feature map is at least 2x2.

    torch.export treats size-1 dimensions specially (broadcasting, contiguity), so a graph
    traced where the last map is 1x1 (Inception V3 at 75 px) holds only there, and one traced
    above cannot promise sizes where it would be 1x1: the dynamic range starts here.
    """
    low = high = model.min_input_size
    while _last_map_size(model, high) < 2:
        low, high = high + 1, high * 2
    while low < high:  # the map grows with the input: bisect for the first size that fits
        middle = (low + high) // 2
        low, high = (low, middle) if _last_map_size(model, middle) >= 2 else (middle + 1, high)
    return high


def _export(model: nn.Module, size: int, dynamic_size: bool) -> ExportedProgram:
    """Export at the image size with a dynamic batch (and H, W) that must stay dynamic."""
    dims = {0: Dim(AXES[0], min=1)}
    if dynamic_size:
        smallest = _smallest_dynamic_size(model)
        size = max(size, smallest)
        dims |= {axis: Dim(AXES[axis], min=smallest) for axis in (2, 3)}
    example = torch.zeros(EXAMPLE_BATCH, model.in_chans, size, size)
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=(dims,))


def _name_axes(graph: Any) -> None:
    """Call the input's symbolic axes batch/height/width (not s77) wherever shapes use them."""
    dims = graph.input[0].type.tensor_type.shape.dim
    mapping = {dims[axis].dim_param: name for axis, name in AXES.items() if dims[axis].dim_param}
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b")
    for info in (*graph.input, *graph.output, *graph.value_info):
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda match: mapping[match[0]], dim.dim_param)


def export_onnx(
    weights: Path,
    out: Path,
    dynamic_size: bool = False,
    raw: bool = False,
    opset: int | None = None,
    calibrate: str | Path | Iterable[Any] | None = None,
) -> Path:
    """Write ``weights`` as an ONNX graph ``images`` (N, 3, H, W in [-1, 1]) -> ``logits``.

    The batch is always dynamic; ``dynamic_size`` makes H and W dynamic too, from the
    smallest size whose last feature map is 2x2 (71 px for Xception, 33 for MobileNet, 107
    for Inception V3). Metadata goes to ``metadata_props`` as ``xception.*``. With
    ``calibrate``, the graph is quantized to int8 on it (``quantize_onnx``).
    """
    _require("onnx", "onnxruntime", "onnxscript")
    model, metadata, size = _load(Path(weights), raw)
    return write_onnx(model, metadata, size, Path(out), dynamic_size, opset, calibrate)


def write_onnx(
    model: nn.Module,
    metadata: dict[str, Any],
    size: int,
    out: Path,
    dynamic_size: bool = False,
    opset: int | None = None,
    calibrate: str | Path | Iterable[Any] | None = None,
) -> Path:
    """``export_onnx`` of a float32 eval model in memory, ``metadata`` embedded."""
    (onnx,) = _require("onnx")
    if calibrate is not None:
        with tempfile.TemporaryDirectory(prefix="xception-export-") as work:
            fp32 = write_onnx(model, metadata, size, Path(work) / "fp32.onnx", dynamic_size, opset)
            return quantize_onnx(fp32, out, calibrate)
    program = torch.onnx.export(
        _export(model, size, dynamic_size),
        dynamo=True,
        input_names=[INPUT],
        output_names=[OUTPUT],
        opset_version=opset,
        verbose=False,
    )
    proto = program.model_proto
    _name_axes(proto.graph)
    onnx.helper.set_model_props(
        proto,
        {
            PREFIX + key: value if key == "model" else json.dumps(value)
            for key, value in metadata.items()
        },
    )
    onnx.checker.check_model(proto)
    atomic_write(out, lambda tmp: onnx.save_model(proto, tmp, format="protobuf"))
    return out


def cached_onnx(weights: Path, raw: bool = False) -> Path:
    """The ONNX export of ``weights`` that the onnxruntime backend runs, exported once per
    file content (and package version) into ``files.cache_folder("onnx")``: exporting
    takes seconds to a minute, reading a cached file a fraction of a second."""
    key = f"{sha256(weights)[:32]}-{'raw' if raw else 'default'}-{__version__}"
    folder = cache_folder("onnx")
    path = folder / f"{key}.onnx"
    if not path.is_file():
        print(
            f"exporting {weights.name} for onnxruntime once, into {path} "
            "(--backend torch runs PyTorch instead)",
            file=sys.stderr,
        )
        folder.mkdir(parents=True, exist_ok=True)
        export_onnx(weights, path, raw=raw)
    return path


def quantize_onnx(fp32: Path, out: Path, calibrate: str | Path | Iterable[Any]) -> Path:
    """Post-training static int8 quantization of an export of ours with onnxruntime: QDQ
    format (what TensorRT, OpenVINO and mobile runtimes take), per-channel int8 weights,
    uint8 activations whose ranges come from ``calibrate``'s images (a folder, or
    normalised float32 NCHW batches; MinMax), and 7-bit
    weights (``reduce_range``), which CPUs without VNNI need to avoid overflow in their
    int8 dot products. The metadata of the fp32 export is kept, with the precision."""
    from xception.precision import calibration_batches

    onnx, _ = _require("onnx", "onnxruntime")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = onnx.load(str(fp32))
    props = {prop.key: prop.value for prop in source.metadata_props}
    pre = Preprocessing(**json.loads(props[PREFIX + "preprocessing"]))

    class Images(CalibrationDataReader):
        def __init__(self) -> None:
            from_folder = isinstance(calibrate, str | Path)
            self.batches = iter(calibration_batches(calibrate, pre) if from_folder else calibrate)

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch}

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="xception-quantize-") as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        staged = Path(work) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(staged),
            Images(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        proto = onnx.load(str(staged))
        onnx.helper.set_model_props(proto, {**props, PREFIX + "precision": json.dumps("int8")})
        atomic_write(out, lambda tmp: onnx.save_model(proto, tmp, format="protobuf"))
    return out


def load_onnx_session(path: Path) -> tuple[onnxruntime.InferenceSession, dict[str, Any]]:
    """An onnxruntime session on the best available provider, and the embedded metadata."""
    (ort,) = _require("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    session = ort.InferenceSession(str(path), providers=ort.get_available_providers())
    props = session.get_modelmeta().custom_metadata_map
    if PREFIX + "model" not in props:
        raise ValueError(f"{path} was not exported by xception (no {PREFIX}model metadata)")
    metadata = {
        key.removeprefix(PREFIX): value if key == PREFIX + "model" else json.loads(value)
        for key, value in props.items()
        if key.startswith(PREFIX)
    }
    return session, metadata


class OnnxModel(nn.Module):
    """An onnxruntime session of one of our exports as a module: normalised float NCHW in,
    float32 logits out (on the CPU), so evaluation and prediction run it as any model."""

    def __init__(self, session: onnxruntime.InferenceSession) -> None:
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().float().contiguous().cpu().numpy()
        (logits,) = self.session.run([OUTPUT], {INPUT: images})
        return torch.from_numpy(logits)


def predict_onnx_batch(
    session: onnxruntime.InferenceSession, images_uint8: torch.Tensor, pre: Preprocessing
) -> torch.Tensor:
    """Logits of a uint8 NCHW batch, normalised exactly as ``xception predict`` does."""
    return OnnxModel(session)(normalize(images_uint8.cpu(), pre, torch.float32))


def export_program(weights: Path, out: Path, raw: bool = False) -> Path:
    """Save a torch.export program with a dynamic batch; metadata rides in the archive."""
    model, metadata, size = _load(Path(weights), raw)
    program = _export(model, size, dynamic_size=False)
    extra = {PROGRAM_METADATA: json.dumps(metadata)}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: the temporary name does not end in .pt2
            torch.export.save(program, f, extra_files=extra)

    out = Path(out)
    atomic_write(out, write)
    return out


def load_program(path: Path) -> tuple[ExportedProgram, dict[str, Any]]:
    """A program saved by ``export_program`` and its metadata; call ``.module()`` to run it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported program not found: {path}")
    extra = {PROGRAM_METADATA: ""}
    program = torch.export.load(path, extra_files=extra)
    if not extra[PROGRAM_METADATA]:
        raise ValueError(f"{path} was not exported by xception (no {PROGRAM_METADATA})")
    return program, json.loads(extra[PROGRAM_METADATA])
