"""``xception eval`` and ``xception predict`` on self-describing weight files: the file
says which architecture, classes and preprocessing it needs, so users pass only paths."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from xception.data.folder import IMAGE_EXTENSIONS, discover
from xception.data.loaders import EvalBatchSampler, ImageDataset, make_loader, single_images
from xception.data.synthetic import SyntheticSpec, materialize
from xception.data.transforms import Preprocessing, normalize
from xception.evaluation import class_frequency_weights, evaluate
from xception.fusion import inference_model
from xception.training.distributed import World
from xception.training.loop import resolve_device
from xception.weights import atomic_write, load_model


def _preprocessing(metadata: dict[str, Any], source: Path) -> Preprocessing:
    values = metadata.get("preprocessing")
    if not isinstance(values, dict):
        raise ValueError(f"{source} carries no preprocessing metadata")
    known = {f.name for f in fields(Preprocessing)}
    return Preprocessing(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
    )


def _load(weights: Path, raw: bool, device: str):
    model, metadata = load_model(weights, raw=raw)
    if not metadata.get("classes"):
        raise ValueError(
            f"{weights} has no classifier or no class names (a --notop file "
            "gives features, not predictions)"
        )
    target = resolve_device(device)
    fast = inference_model(model.to(target), channels_last=True)  # BN folded, NHWC: same function
    return fast, metadata, _preprocessing(metadata, weights), target


def _data_root(data: str | None, metadata: dict[str, Any], weights: Path) -> Path:
    if data is not None:
        return Path(data)
    spec = metadata.get("builtin_data")
    if not isinstance(spec, dict):
        raise ValueError(f"{weights} was not trained on the built-in data set; pass --data")
    return materialize(SyntheticSpec(**spec), progress=False)


def evaluate_weights(
    weights: Path,
    data: str | None,
    raw: bool = False,
    batch_size: int = 128,
    device: str = "auto",
    workers: int = 2,
    output: str | None = None,
    overwrite: bool = False,
) -> tuple[dict[str, Any], Path]:
    """Metrics of a weights file on the val split of ``data``; written as JSON too (never
    over an existing file unless ``overwrite``)."""
    path = (
        Path(output)
        if output
        else weights.with_name(f"{weights.name.removesuffix('.safetensors')}.eval.json")
    )
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite or choose another --json path")
    model, metadata, pre, target = _load(weights, raw, device)
    splits = discover(_data_root(data, metadata, weights))
    classes = list(splits["val"].classes)
    if classes != metadata["classes"]:
        raise ValueError(
            f"{weights} was trained on {len(metadata['classes'])} classes "
            f"({', '.join(metadata['classes'][:3])}, ...), the data has "
            f"{len(classes)} ({', '.join(classes[:3])}, ...)"
        )
    multi_label = splits["val"].multi_label
    weights_per_class = (
        class_frequency_weights(splits["train"].label_matrix()) if multi_label else None
    )
    loader = make_loader(
        ImageDataset(splits["val"], pre, train=False),
        EvalBatchSampler(len(splits["val"]), batch_size),
        workers,
        target.type == "cuda",
    )
    metrics, skipped = evaluate(
        model, loader, target, pre, World(), multi_label, weights_per_class, channels_last=True
    )
    result: dict[str, Any] = {
        "weights": str(weights),
        "variant": "raw" if raw else "averaged",
        "images": len(splits["val"]) - len(skipped),
        **metrics,
        "skipped_files": skipped,
    }
    text = json.dumps(result, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return result, path


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such image or folder: {path}")
    if not files:
        raise ValueError(f"no images found in {', '.join(map(str, paths))}")
    return files


def _predictor(weights: Path, raw: bool, device: str) -> tuple[Any, dict[str, Any], Preprocessing]:
    """(uint8 batch -> logits, metadata, preprocessing) for our weights or an ONNX export."""
    if weights.suffix == ".onnx":
        from xception.export import load_onnx_session, predict_onnx_batch

        session, metadata = load_onnx_session(weights)
        pre = _preprocessing(metadata, weights)
        return (lambda images: predict_onnx_batch(session, images, pre)), metadata, pre
    model, metadata, pre, target = _load(weights, raw, device)

    def predict(images: torch.Tensor) -> torch.Tensor:
        x = normalize(images.to(target), pre, torch.float32)
        return model(x.contiguous(memory_format=torch.channels_last))

    return predict, metadata, pre


@torch.no_grad()
def predict_paths(
    weights: Path,
    paths: list[Path],
    top_k: int = 5,
    raw: bool = False,
    device: str = "auto",
    batch_size: int = 32,
) -> tuple[list[dict[str, Any]], int]:
    """Top-k (class, probability) per image; unreadable images get an ``error`` instead.

    ``weights`` is one of our weight files or an ONNX export (run with onnxruntime).
    """
    if top_k < 1:
        raise ValueError(f"--top-k must be positive, got {top_k}")
    predict, metadata, pre = _predictor(weights, raw, device)
    classes, multi_label = metadata["classes"], bool(metadata.get("multi_label"))
    rows: list[dict[str, Any]] = []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        logits = predict(torch.stack([image for _, image in pending])).float()
        probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)
        values, indices = probs.topk(min(top_k, len(classes)), dim=1)
        for (row, _), v, i in zip(pending, values.tolist(), indices.tolist(), strict=True):
            rows[row]["predictions"] = [
                {"class": classes[c], "probability": p} for c, p in zip(i, v, strict=True)
            ]
        pending.clear()

    for path, image in single_images(_expand(paths), pre):
        rows.append({"path": str(path)})
        if isinstance(image, str):
            rows[-1]["error"] = image
            continue
        pending.append((len(rows) - 1, image))
        if len(pending) == batch_size:
            flush()
    flush()
    return rows, sum("error" in row for row in rows)


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
    return "\n".join(lines)
