"""``xception eval`` and ``xception predict`` on self-describing weight files: the file
says which architecture, classes and preprocessing it needs, so users pass only paths.

Both run the fast inference path of ``fusion.py`` (BatchNorm folded, channels_last),
which computes the same function as the eager model.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from xception.class_report import REPORT_FILES, write_class_report
from xception.config import from_values
from xception.data.folder import image_files
from xception.data.loaders import (
    EvalBatchSampler,
    make_dataset,
    make_loader,
    open_data,
    single_images,
)
from xception.data.synthetic import SyntheticSpec, materialize
from xception.data.transforms import (
    EvalTransform,
    Preprocessing,
    as_pil,
    eval_transform,
    normalize,
)
from xception.devices import autocast, model_input, resolve_device
from xception.distributed import World
from xception.evaluation import class_frequencies, evaluate, per_class
from xception.exporting import OnnxModel, cached_onnx, load_onnx_session
from xception.files import atomic_write, write_json
from xception.fusion import inference_model
from xception.gradcam import gradcam, overlay, target_layer
from xception.precision import check_precision, int8_session
from xception.registry import load_model
from xception.weights import read_metadata

ImageInput = str | Path | Image.Image | torch.Tensor


def read_preprocessing(metadata: dict[str, Any], source: Path) -> Preprocessing:
    """The preprocessing a weights file (or an export of one) records."""
    values = metadata.get("preprocessing")
    if not isinstance(values, dict):
        raise ValueError(f"{source} carries no preprocessing metadata")
    try:
        return from_values(Preprocessing, values, "preprocessing option")
    except ValueError as error:
        raise ValueError(f"{source} records invalid preprocessing: {error}") from None


def preprocessing(weights: str | Path) -> EvalTransform:
    """The transform a weights file (or its ONNX export) expects its images through, like
    torchvision's ``weights.transforms()``: image -> normalised CHW float tensor."""
    path = Path(weights)
    if path.suffix == ".onnx":
        from xception.exporting import load_onnx_session

        _, metadata = load_onnx_session(path)
    else:
        metadata = read_metadata(path)
    return EvalTransform(read_preprocessing(metadata, path))


def variant(metadata: dict[str, Any], raw: bool) -> str:
    """Which weights of a file are used: the Polyak ``averaged`` ones, the ``raw`` ones
    saved beside them, or the ``single`` set of a file without averaging."""
    if raw:
        return "raw"
    return "averaged" if metadata.get("averaged") else "single"


BACKENDS = ("auto", "torch", "onnxruntime")


def resolve_backend(
    backend: str, device: torch.device, precision: str, amp: str, onnx_only: bool = False
) -> str:
    """What runs a model: ``torch`` (the fast path of ``fusion``) or ``onnxruntime`` (our
    ONNX export of the same function, exported once per file: ``cached_onnx``).

    ``auto`` (the default; ``$XCEPTION_BACKEND`` can change it) takes onnxruntime for fp32
    on a CPU when the export extra is installed: there onnxruntime ran our graph
    1.2-1.6x faster than PyTorch's best path on every CPU measured (benchmarks/RESULTS.md).
    Everywhere else, and for bf16 and --amp, PyTorch. ONNX files and int8 always run in
    onnxruntime (``onnx_only``)."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if onnx_only:
        if backend == "torch":
            raise ValueError("ONNX exports and --precision int8 run in onnxruntime, not torch")
        return "onnxruntime"
    if backend == "auto":
        backend = os.environ.get("XCEPTION_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"XCEPTION_BACKEND={backend!r}: choose one of {', '.join(BACKENDS)}")
    eligible = device.type == "cpu" and precision == "fp32" and amp == "none"
    if backend == "onnxruntime" and not eligible:
        raise ValueError(
            "--backend onnxruntime runs fp32 on CPUs; bf16, --amp and GPUs run in torch"
        )
    if backend == "auto":
        installed = all(find_spec(name) for name in ("onnx", "onnxruntime", "onnxscript"))
        return "onnxruntime" if eligible and installed else "torch"
    return backend


@dataclass(frozen=True)
class CamRequest:
    """Grad-CAM overlays for ``predict``: one PNG an image in ``folder``, for the class
    named ``class_name`` (default: the predicted one) at ``layer`` (default: the model's)."""

    folder: Path
    class_name: str | None = None
    layer: str | None = None


@dataclass
class Predictor:
    """A weights file (ours or an ONNX export) ready to classify images.

    ``logits(uint8 NCHW batch)``; ``predict(images)`` takes paths, folders, PIL images
    and CHW tensors."""

    weights: Path
    metadata: dict[str, Any]
    pre: Preprocessing
    model: Any  # the fast torch model, or an onnxruntime session
    device: torch.device
    amp: str = "none"
    channels_last: bool = True
    raw: bool = False
    allow_nonfinite: bool = False
    precision: str = "fp32"
    backend: str = "torch"  # what runs ``model``: torch or onnxruntime

    @classmethod
    def load(
        cls,
        weights: str | Path,
        raw: bool = False,
        device: str = "auto",
        amp: str = "none",
        channels_last: bool = True,
        allow_nonfinite: bool = False,
        precision: str = "fp32",
        calibrate: str | Path | None = None,
        backend: str = "auto",
    ) -> Predictor:
        """``precision``: fp32, bf16 (autocast, as ``amp="bf16"``) or int8 (onnxruntime,
        quantized on the images of the folder ``calibrate``): see ``xception.precision``.
        ``backend``: see ``resolve_backend``."""
        weights = Path(weights).expanduser()
        target = resolve_device(device) if weights.suffix != ".onnx" else torch.device("cpu")
        check_precision(precision, target, calibrate)
        if precision == "bf16":
            if amp not in ("none", "bf16"):
                raise ValueError(f"--precision bf16 and --amp {amp} disagree: give one")
            amp = "bf16"
        onnx_only = weights.suffix == ".onnx" or precision == "int8"
        backend = resolve_backend(backend, target, precision, amp, onnx_only)
        if onnx_only:
            if (raw and weights.suffix == ".onnx") or amp != "none":
                raise ValueError(
                    "--raw and --amp apply to weight files run by PyTorch, not to ONNX exports "
                    "or --precision int8"
                )
            if weights.suffix == ".onnx" and precision != "fp32":
                raise ValueError(
                    "an ONNX export runs as it was exported; quantize with "
                    "`xception export --format onnx --quantize int8 --calibrate DIR`"
                )
            if precision == "int8":
                session, metadata = int8_session(weights, calibrate or "", raw)
            else:
                session, metadata = load_onnx_session(weights)
            pre = read_preprocessing(metadata, weights)
            model = OnnxModel(session)
            return cls(
                weights, metadata, pre, model, target, channels_last=False, raw=raw,
                precision=precision, backend=backend,
            )  # fmt: skip
        model, metadata = load_model(weights, raw, allow_nonfinite)
        if not metadata.get("classes") or model.num_classes == 0:
            raise ValueError(
                f"{weights} has no classifier or no class names (a --notop file "
                "gives features, not predictions)"
            )
        pre = read_preprocessing(metadata, weights)
        if backend == "onnxruntime":
            session, _ = load_onnx_session(cached_onnx(weights, raw))
            fast, channels_last = OnnxModel(session), False
        else:
            fast = inference_model(model.to(target), channels_last=channels_last)
        return cls(
            weights, metadata, pre, fast, target, amp, channels_last, raw, allow_nonfinite,
            precision, backend,
        )  # fmt: skip

    @property
    def classes(self) -> list[str]:
        return self.metadata["classes"]

    @property
    def multi_label(self) -> bool:
        return bool(self.metadata.get("multi_label"))

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """float32 logits of a uint8 NCHW batch at the preprocessing's size."""
        x = model_input(images, self.pre, self.device, self.channels_last)
        with autocast(self.device, self.amp):
            return self.model(x).float()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)

    def predict(
        self,
        images: Iterable[ImageInput],
        top_k: int = 5,
        batch_size: int = 32,
        cam: CamRequest | None = None,
    ) -> list[dict[str, Any]]:
        """Top-k (class, probability) per image; unreadable files get an ``error``. With
        ``cam``, each row also names its Grad-CAM overlay (``cam``)."""
        if top_k < 1:
            raise ValueError(f"--top-k must be positive, got {top_k}")
        explain = self._explainer(cam) if cam is not None else None
        rows: list[dict[str, Any]] = []
        pending: list[tuple[int, torch.Tensor]] = []
        for name, image in self._prepared(images):
            rows.append({"path": name})
            if isinstance(image, str):
                rows[-1]["error"] = image
                continue
            if explain is not None:
                rows[-1]["cam"] = str(explain(name, image))
            pending.append((len(rows) - 1, image))
            if len(pending) == batch_size:
                self._fill(rows, pending, top_k)
        self._fill(rows, pending, top_k)
        return rows

    def _explainer(self, cam: CamRequest) -> Callable[[str, torch.Tensor], Path]:
        """A function (name, uint8 image) -> the overlay written for it. Grad-CAM runs the
        eager model (the fast path's folded layers have no separate maps to weigh)."""
        if self.weights.suffix == ".onnx" or self.precision == "int8":
            raise ValueError("--cam explains weight files, not ONNX exports or int8 models")
        index = None
        if cam.class_name is not None:
            if cam.class_name not in self.classes:
                shown = ", ".join(self.classes[:10])
                raise ValueError(f"--cam-class {cam.class_name!r} is not a class ({shown}, ...)")
            index = self.classes.index(cam.class_name)
        model, _ = load_model(self.weights, self.raw, self.allow_nonfinite)
        model = model.to(self.device).eval()
        layer, _ = target_layer(model, cam.layer)  # checked before any image is read
        used: set[str] = set()

        def explain(name: str, image: torch.Tensor) -> Path:
            x = normalize(image[None].to(self.device), self.pre, torch.float32)
            found = gradcam(model, x, index, layer)
            picture = overlay(as_pil(image), found.heatmap.cpu())
            stem = Path(name).stem.strip("<>").replace(" ", "-") or "image"
            unique, n = stem, 1
            while unique in used:
                n += 1
                unique = f"{stem}-{n}"
            used.add(unique)
            path = cam.folder / f"{unique}.png"
            atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
            return path

        return explain

    def _prepared(self, images: Iterable[ImageInput]) -> Iterator[tuple[str, object]]:
        """(name, uint8 image or error message) for every input, the images of folders
        included; missing files and empty folders fail before any image is read."""
        inputs: list[Path | tuple[str, Image.Image | torch.Tensor]] = []
        paths: list[Path] = []
        for index, item in enumerate(images):
            if isinstance(item, str | Path):
                paths.append(Path(item))
                inputs += images_in(paths[-1])
            else:
                inputs.append((f"<image {index}>", item))
        if paths and not any(isinstance(entry, Path) for entry in inputs):
            raise ValueError(f"no images found in {', '.join(map(str, paths))}")
        for entry in inputs:
            if isinstance(entry, Path):
                path, image = next(single_images([entry], self.pre))
                yield str(path), image
            else:
                yield entry[0], eval_transform(as_pil(entry[1]), self.pre)

    def _fill(self, rows: list[dict], pending: list[tuple[int, torch.Tensor]], top_k: int) -> None:
        if not pending:
            return
        logits = self.logits(torch.stack([image for _, image in pending]))
        finite = logits.isfinite().all(dim=1).tolist()
        values, indices = self.probabilities(logits).topk(min(top_k, len(self.classes)), dim=1)
        for (row, _), v, i, ok in zip(
            pending, values.tolist(), indices.tolist(), finite, strict=True
        ):
            if not ok:  # finite weights that overflow: a diverged run's, most likely
                rows[row]["error"] = "the model's outputs are not finite (diverged weights?)"
                continue
            rows[row]["predictions"] = [
                {"class": self.classes[c], "probability": p} for c, p in zip(i, v, strict=True)
            ]
        pending.clear()


def _data_root(data: str | Path | None, metadata: dict[str, Any], weights: Path) -> str | Path:
    if data is not None:
        return data
    spec = metadata.get("builtin_data")
    if not isinstance(spec, dict):
        raise ValueError(f"{weights} was not trained on the built-in data set; pass --data")
    return materialize(from_values(SyntheticSpec, spec, "built-in data option"), progress=False)


def evaluate_weights(
    weights: str | Path,
    data: str | Path | None = None,
    *,
    raw: bool = False,
    batch_size: int = 128,
    device: str = "auto",
    workers: int = 2,
    amp: str = "none",
    channels_last: bool = True,
    json_path: str | Path | None = None,
    report_dir: str | Path | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    precision: str = "fp32",
    calibrate: str | Path | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """``xception eval``: top-1/top-5 and per-class precision, recall and F1 (or MAP@100 on
    multi-label data) of a weights file on the val split of ``data`` (default: the
    built-in data set it was trained on), at ``precision`` (``Predictor.load``). Also
    written to ``json_path`` when given (never over an existing file unless
    ``overwrite``); ``report_dir`` receives the per-class results and the confusion matrix
    as CSV and PNG."""
    if json_path is not None and Path(json_path).exists() and not overwrite:
        raise FileExistsError(f"{json_path} exists; pass --overwrite or choose another --json path")
    if report_dir is not None and not overwrite:
        taken = [name for name in REPORT_FILES if (Path(report_dir) / name).exists()]
        if taken:
            raise FileExistsError(f"{Path(report_dir) / taken[0]} exists; pass --overwrite")
    weights = Path(weights)
    if weights.suffix == ".onnx":
        raise ValueError(f"eval scores weight files; run the ONNX export {weights} with predict")
    predictor = Predictor.load(
        weights, raw, device, amp, channels_last, allow_nonfinite, precision, calibrate, backend
    )
    metadata = predictor.metadata
    splits = open_data(_data_root(data, metadata, weights))
    classes = list(splits["val"].classes)
    if classes != predictor.classes:
        raise ValueError(
            f"{weights} was trained on {len(predictor.classes)} classes "
            f"({', '.join(predictor.classes[:3])}, ...), the data has "
            f"{len(classes)} ({', '.join(classes[:3])}, ...)"
        )
    multi_label = splits["val"].multi_label
    if multi_label and report_dir is not None:
        raise ValueError("--report writes single-label results; this data is multi-label")
    train = splits["train"]
    weights_per_class = class_frequencies(train.class_counts(), len(train)) if multi_label else None
    loader = make_loader(
        make_dataset(splits["val"], predictor.pre, train=False),
        EvalBatchSampler(len(splits["val"]), batch_size),
        workers,
        predictor.device.type == "cuda",
    )
    found = evaluate(
        predictor.model,
        loader,
        predictor.device,
        predictor.pre,
        World(),
        multi_label,
        weights_per_class,
        predictor.channels_last,
        predictor.amp,
        len(classes),
    )
    scored = len(splits["val"]) > len(found.skipped)  # else the loss is NaN for want of images
    if scored and not math.isfinite(found.metrics["loss"]) and not allow_nonfinite:
        raise ValueError(
            f"{weights} gives non-finite outputs on the validation images (diverged "
            "weights?), so its scores mean nothing; --allow-nonfinite reports them anyway"
        )
    result: dict[str, Any] = {
        "weights": str(weights),
        "variant": variant(metadata, raw),
        "precision": precision,
        "backend": predictor.backend,
        "images": len(splits["val"]) - len(found.skipped),
        **found.metrics,
        "skipped_files": found.skipped,
    }
    if found.confusion is not None:
        result["per_class"] = per_class(found.confusion, classes)
        if report_dir is not None:
            write_class_report(Path(report_dir), found.confusion, classes)
    if json_path is not None:
        write_json(json_path, result)
    return result


def images_in(path: Path) -> list[Path]:
    """A file as given, or the images in a folder (recursively, sorted)."""
    if path.is_dir():
        return image_files(path)
    if not path.exists():
        raise FileNotFoundError(f"no such image or folder: {path}")
    return [path]


def format_predictions(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "rank", "class", "probability", "error"])
        for row in rows:
            if "error" in row:
                writer.writerow([row["path"], "", "", "", row["error"]])
            for rank, p in enumerate(row.get("predictions", []), 1):
                writer.writerow([row["path"], rank, p["class"], f"{p['probability']:.6f}", ""])
        return buffer.getvalue().rstrip("\n")
    lines = []
    for row in rows:
        lines.append(row["path"])
        if "error" in row:
            lines.append(f"  error: {row['error']}")
        for rank, p in enumerate(row.get("predictions", []), 1):
            lines.append(f"  {rank}. {p['class']:<24} {p['probability']:.4f}")
        if "cam" in row:
            lines.append(f"  Grad-CAM: {row['cam']}")
    return "\n".join(lines)
