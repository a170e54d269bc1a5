"""The Python API, one function per command of the ``xception`` tool and with its options:
the command line parses, calls these and prints.

    import xception
    run = xception.train(data="~/flowers", model="xception", recipe="paper-imagenet")
    xception.evaluate(run.run_dir / "best.safetensors", data="~/flowers")
    xception.predict("best.safetensors", ["photo.jpg", pil_image], top_k=3)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from xception.data.shards import write_shards as shard
from xception.files import refuse_folder
from xception.gradcam import gradcam
from xception.inference import CamRequest, ImageInput, Predictor, preprocessing
from xception.inference import evaluate_weights as evaluate
from xception.training.config import load_yaml, resolve
from xception.training.run import RunResult
from xception.training.run import resume as resume_run
from xception.training.run import train as train_run

__all__ = [
    "Predictor",
    "convert",
    "evaluate",
    "export",
    "gradcam",
    "predict",
    "preprocessing",
    "shard",
    "train",
]


def train(
    recipe: str | None = None,
    *,
    config: str | Path | Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: str | Path | None = None,
    progress: bool = True,
    **options: Any,
) -> RunResult:
    """``xception train``: train into a run folder and return its result.

    ``options`` are training options (``data``, ``model``, ``epochs``, ``lr``,
    ``model_overrides`` ...: ``xception train --help`` lists them all), layered as
    defaults < ``recipe`` (unless ``config`` names one: ``finetune`` with ``init_weights``,
    else ``quick``) < ``config`` (a YAML file or a mapping) < ``options``. ``resume``
    continues the run in that folder exactly; only how long and where it runs may change
    then (``epochs``, ``max_steps``, ``device``, ``workers``, ``save_every``,
    ``log_every``).
    """
    if resume is not None:
        if recipe or config or out or overwrite:
            raise ValueError(
                "--resume continues a run as configured; drop --config, "
                "--recipe, --out and --overwrite"
            )
        return resume_run(Path(resume), options, progress)
    values = load_yaml(config) if isinstance(config, str | Path) else dict(config or {})
    starts_from_weights = options.get("init_weights") or values.get("init_weights")
    default = "finetune" if starts_from_weights else "quick"
    recipe = recipe or values.pop("recipe", None) or default  # an explicit recipe wins
    values.pop("recipe", None)
    run_config = resolve(recipe, values, options)
    return train_run(run_config, recipe, Path(out) if out else None, overwrite, progress)


def predict(
    weights: str | Path,
    images: ImageInput | Iterable[ImageInput],
    *,
    top_k: int = 5,
    raw: bool = False,
    device: str = "auto",
    amp: str = "none",
    channels_last: bool = True,
    cam: str | Path | None = None,
    cam_class: str | None = None,
    cam_layer: str | None = None,
    allow_nonfinite: bool = False,
    precision: str = "fp32",
    calibrate: str | Path | None = None,
    backend: str = "auto",
) -> list[dict[str, Any]]:
    """``xception predict``: the top-k classes of each image, as rows
    ``{"path", "predictions": [{"class", "probability"}, ...]}`` (or ``"error"`` for an
    unreadable file). ``images`` is one or more image files, folders, PIL images or CHW
    tensors (a NCHW tensor is a batch of them); ``weights`` a weights file or an ONNX
    export. For many calls, keep a ``Predictor.load(weights)`` instead. ``cam`` is a folder
    for a Grad-CAM overlay of each image (of ``cam_class``, default the top class, at
    ``cam_layer``, default the model's last feature maps); rows name their file.
    ``precision``: fp32, bf16 or int8 (quantized on the images of the folder
    ``calibrate``; see ``xception.precision``); ``backend``: torch, onnxruntime or auto
    (``inference.resolve_backend``)."""
    if isinstance(images, str | Path | Image.Image):
        images = [images]
    elif isinstance(images, torch.Tensor):
        images = list(images) if images.ndim == 4 else [images]
    request = CamRequest(Path(cam), cam_class, cam_layer) if cam is not None else None
    predictor = Predictor.load(
        weights, raw, device, amp, channels_last, allow_nonfinite, precision, calibrate, backend
    )
    return predictor.predict(images, top_k, cam=request)


def export(
    weights: str | Path,
    out: str | Path,
    *,
    format: Literal["onnx", "torch-export"] = "onnx",
    dynamic_size: bool = False,
    raw: bool = False,
    overwrite: bool = False,
    quantize: Literal["int8"] | None = None,
    calibrate: str | Path | None = None,
) -> Path:
    """``xception export``: an ONNX graph or a ``torch.export`` program of a weights file,
    carrying its class names and preprocessing. ``quantize="int8"``: an ONNX graph
    quantized to int8 (QDQ) on the images of the folder ``calibrate``."""
    from xception.exporting import export_onnx, export_program

    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize {quantize!r}: only int8 is offered")
    if (quantize is None) != (calibrate is None):
        raise ValueError("--quantize int8 and --calibrate DIR go together")
    if quantize is not None and format != "onnx":
        raise ValueError("--quantize int8 writes ONNX: use --format onnx")
    out = _new_file(out, overwrite)
    if format == "torch-export":
        return export_program(Path(weights), out, raw=raw)
    if format != "onnx":
        raise ValueError(f"format={format!r} is not 'onnx' or 'torch-export'")
    return export_onnx(Path(weights), out, dynamic_size, raw, calibrate=calibrate)


def convert(
    source: str | Path,
    out: str | Path,
    *,
    model: str,
    source_format: Literal["keras", "timm"] | None = None,
    include_top: bool = True,
    overwrite: bool = False,
) -> Path:
    """``xception convert``: Keras (``.h5``, ``.weights.h5``) or timm/Cadene (``.pth``,
    ``.safetensors``) weights of ``model`` into one of this package's files.
    ``source_format`` defaults to what the file's name says."""
    source, out = Path(source), _new_file(out, overwrite)
    source_format = source_format or ("keras" if source.name.endswith(".h5") else "timm")
    if source_format == "keras":
        from xception.interop.keras import convert_keras as converter
    elif source_format == "timm":
        from xception.interop.timm import convert_timm as converter
    else:
        raise ValueError(f"source_format={source_format!r} is not 'keras' or 'timm'")
    converter(source, model, out, include_top=include_top)
    return out


def _new_file(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    refuse_folder(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    return out
