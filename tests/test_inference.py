"""eval and predict on self-describing weight files, and their user errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xception.cli import main
from xception.data.transforms import normalize
from xception.inference import Predictor, evaluate_weights, read_preprocessing
from xception.registry import load_model
from xception.training.config import resolve
from xception.training.run import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_folder):
    root = image_folder
    run = tmp_path_factory.mktemp("run") / "r"
    config = resolve(
        "quick", overrides=dict(data=str(root), image_size=72, batch_size=8, epochs=1, workers=0)
    )
    train(config, out=run, progress=False)
    return root, run / "best.safetensors"


def test_eval_scores_the_val_split_and_writes_json_only_when_asked(trained, tmp_path):
    root, weights = trained
    before = sorted(weights.parent.iterdir())
    metrics = evaluate_weights(weights, str(root), workers=0)
    again = evaluate_weights(weights, str(root), workers=0)  # a second run is no error
    assert sorted(weights.parent.iterdir()) == before  # nothing written beside the weights
    assert metrics["images"] == 18 and metrics["top5"] == 1.0  # 3 classes: top-5 is all
    # top-1 as counted independently: predict's first class against each image's folder
    images = sorted((root / "val").rglob("*.png"))
    rows = Predictor.load(weights).predict(images, top_k=1)
    pairs = zip(rows, images, strict=True)
    right = sum(row["predictions"][0]["class"] == path.parent.name for row, path in pairs)
    assert metrics["top1"] == pytest.approx(right / 18)
    assert again["top1"] == metrics["top1"] and metrics["variant"] == "averaged"
    out = tmp_path / "e.json"
    written = evaluate_weights(weights, str(root), workers=0, json_path=out)
    assert json.loads(out.read_text())["top1"] == written["top1"]
    raw = evaluate_weights(weights, str(root), raw=True, workers=0)
    assert raw["variant"] == "raw"


def test_eval_names_the_variant_of_a_file_without_averaging(trained, tmp_path):
    root, weights = trained
    model, metadata = load_model(weights)
    from xception.weights import save_weights

    single = tmp_path / "single.safetensors"
    save_weights(model, single, metadata["model"], {**metadata, "averaged": False})
    assert evaluate_weights(single, str(root), workers=0)["variant"] == "single"
    with pytest.raises(ValueError, match="holds no raw weights"):
        evaluate_weights(single, str(root), raw=True, workers=0)


def test_eval_command_runs_twice_and_writes_json_only_with_the_flag(trained, tmp_path, capsys):
    root, weights = trained
    argv = ["eval", "--weights", str(weights), "--data", str(root), "--workers", "0"]
    before = sorted(weights.parent.iterdir())
    assert main(argv) == 0 and main(argv) == 0
    assert sorted(weights.parent.iterdir()) == before
    assert "top1" in capsys.readouterr().out
    out = tmp_path / "metrics.json"
    assert main([*argv, "--json", str(out)]) == 0
    assert main([*argv, "--json", str(out)]) == 2  # never over a file unless --overwrite
    assert main([*argv, "--json", str(out), "--overwrite", "--amp", "bf16"]) == 0
    assert json.loads(out.read_text())["images"] == 18


def test_bf16_autocast_agrees_with_float32(trained):
    root, weights = trained
    images = sorted((root / "val").rglob("*.png"))
    full = Predictor.load(weights, device="cpu").predict(images, top_k=1)
    half = Predictor.load(weights, device="cpu", amp="bf16").predict(images, top_k=1)
    agree = sum(
        a["predictions"][0]["class"] == b["predictions"][0]["class"]
        for a, b in zip(full, half, strict=True)
    )
    assert agree >= len(images) - 1
    for a, b in zip(full, half, strict=True):
        assert abs(a["predictions"][0]["probability"] - b["predictions"][0]["probability"]) < 0.05


def test_eval_refuses_data_with_other_classes(trained, tmp_path):
    root, weights = trained
    other = tmp_path / "other"
    shutil.copytree(root, other)
    for split in ("train", "val"):
        (other / split / "red").rename(other / split / "crimson")
    with pytest.raises(ValueError, match="trained on 3 classes"):
        evaluate_weights(weights, str(other), workers=0)


def predict_paths(weights, paths, top_k=5):
    rows = Predictor.load(weights).predict(paths, top_k)
    return rows, sum("error" in row for row in rows)


def test_predict_ranks_classes_and_reports_bad_files(trained, tmp_path, capsys):
    root, weights = trained
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    (tmp_path / "empty").mkdir()
    rows, failures = predict_paths(weights, [root / "val" / "red", bad, tmp_path / "empty"], 2)
    assert failures == 1 and len(rows) == 7
    good = [row for row in rows if "predictions" in row]
    assert all(len(row["predictions"]) == 2 for row in good)
    every = {
        row["path"]: row["predictions"]
        for row in predict_paths(weights, [root / "val" / "red"], 3)[0]
    }
    for row in good:  # the top 2 of all 3, in order: the 3 probabilities sum to 1
        full = every[row["path"]]
        assert row["predictions"] == full[:2]
        assert full[0]["probability"] >= full[1]["probability"] >= full[2]["probability"]
        assert sum(p["probability"] for p in full) == pytest.approx(1, abs=1e-5)
    image = str(root / "val" / "blue" / "0.png")
    assert main(["predict", "--weights", str(weights), "--format", "json", image]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["predictions"][0]["class"] in {"red", "green", "blue"}
    assert main(["predict", "--weights", str(weights), str(bad)]) == 1


def test_predict_takes_pil_images_and_tensors_like_files(trained):
    import xception

    root, weights = trained
    path = root / "val" / "green" / "1.png"
    from_file = xception.predict(weights, path, top_k=3)[0]["predictions"]
    pil = Image.open(path)
    from_pil = xception.predict(weights, pil.convert("RGBA"), top_k=3)[0]["predictions"]
    pixels = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)
    batch = xception.predict(weights, torch.stack([pixels, pixels]), top_k=3)
    assert len(batch) == 2 and batch[0]["path"] == "<image 0>"
    as_float = xception.predict(weights, pixels.float() / 255, top_k=3)[0]["predictions"]
    for rows in (from_pil, batch[1]["predictions"], as_float):
        assert [p["class"] for p in rows] == [p["class"] for p in from_file]
        for p, q in zip(rows, from_file, strict=True):
            assert p["probability"] == pytest.approx(q["probability"], abs=1e-5)
    with pytest.raises(ValueError, match=r"shape \(C, H, W\)"):
        xception.predict(weights, torch.zeros(5, 8, 8))


def test_preprocessing_gives_the_transform_the_model_expects(trained):
    import xception

    root, weights = trained
    transform = xception.preprocessing(weights)
    model, _ = load_model(weights)
    path = root / "val" / "red" / "2.png"
    x = transform(Image.open(path))
    assert x.shape == (3, 72, 72) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1
    with torch.no_grad():
        probs = torch.softmax(model.eval()(x.unsqueeze(0)), dim=1)[0]
    top = xception.predict(weights, path, top_k=1)[0]["predictions"][0]
    assert probs.max().item() == pytest.approx(top["probability"], abs=1e-5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--weights", "nope.safetensors"], "weights file not found"),
        (["predict", "--weights", "nope.safetensors", "x.png"], "weights file not found"),
        (["train", "--data", "/nonexistent"], "data folder not found"),
        (["train", "--recipe", "fast"], "invalid choice: 'fast'"),
        (["train", "--set", "learning_rate=1"], "unknown training option 'learning_rate'"),
        (["train", "--epochs", "0"], "epochs=0 must be positive"),
        (["train", "--epochs", "ten"], "TrainConfig.epochs='ten' is not int"),
        (["train", "--device", "gpu"], "device='gpu' is not auto"),
        (["eval", "--weights", "w.safetensors", "--device", "cuda:x"], "device='cuda:x'"),
        (["train", "--override", "mid_activation=tanh"], "mid_activation='tanh' is not one"),
        (["train", "--resume", "/nonexistent"], "nothing to resume"),
        (["bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_predict_on_a_missing_image_or_no_images_is_a_user_error(trained, tmp_path, capsys):
    _, weights = trained
    assert main(["predict", "--weights", str(weights), "missing.png"]) == 2
    assert "no such image or folder" in capsys.readouterr().err
    assert main(["predict", "--weights", str(weights), str(tmp_path)]) == 2
    assert "no images found in" in capsys.readouterr().err


def test_predict_runs_an_onnx_export_like_the_weights(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    root, weights = trained
    onnx_file = tmp_path / "model.onnx"
    assert main(["export", "--weights", str(weights), "--out", str(onnx_file)]) == 0
    images = [root / "val" / "green"]
    torch_rows, _ = predict_paths(weights, images, top_k=3)
    onnx_rows, _ = predict_paths(onnx_file, images, top_k=3)
    for a, b in zip(torch_rows, onnx_rows, strict=True):
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        for p, q in zip(a["predictions"], b["predictions"], strict=True):
            assert abs(p["probability"] - q["probability"]) < 1e-4
    assert main(["export", "--weights", str(weights), "--out", str(onnx_file)]) == 2  # exists
    import xception

    assert xception.preprocessing(onnx_file).pre == xception.preprocessing(weights).pre


def test_eval_never_overwrites_an_existing_file(trained, tmp_path):
    root, weights = trained
    keep = tmp_path / "keep.json"
    keep.write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate_weights(weights, str(root), workers=0, json_path=str(keep))
    assert keep.read_text() == "mine"


def test_notop_files_give_no_predictions(tmp_path):
    import xception
    from xception.weights import save_weights

    path = tmp_path / "notop.safetensors"
    save_weights(
        xception.create_model("xception_tiny", num_classes=0),
        path,
        "xception_tiny",
        {"classes": [], "preprocessing": {"image_size": 96}},
    )
    with pytest.raises(ValueError, match="notop"):
        predict_paths(path, [path])


def test_predict_and_eval_use_the_folded_channels_last_model_and_match_eager(trained):
    from xception.data.loaders import single_images

    root, weights = trained
    fast = Predictor.load(weights, device="cpu").model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)

    paths = sorted(p for p in (root / "val").rglob("*") if p.is_file())[:6]
    rows, failures = predict_paths(weights, paths, top_k=3)
    eager, metadata = load_model(weights)
    pre = read_preprocessing(metadata, weights)
    images = torch.stack([image for _, image in single_images(paths, pre)])
    with torch.no_grad():
        probs = torch.softmax(eager.eval()(normalize(images, pre, torch.float32)), dim=1)
    assert failures == 0 and len(rows) == len(paths)
    for row, expected in zip(rows, probs, strict=True):  # order-free: near-ties may swap
        for prediction in row["predictions"]:
            index = metadata["classes"].index(prediction["class"])
            assert prediction["probability"] == pytest.approx(expected[index].item(), abs=1e-5)
        assert row["predictions"][0]["probability"] == pytest.approx(
            expected.max().item(), abs=1e-5
        )


def test_predict_writes_a_grad_cam_overlay_per_image(trained, tmp_path, capsys):
    root, weights = trained
    images = [root / "val" / "red" / "0.png", root / "val" / "blue" / "0.png"]
    cams = tmp_path / "cams"
    argv = ["predict", "--weights", str(weights), "--format", "json", "--cam", str(cams)]
    assert main([*argv, *map(str, images)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [Path(row["cam"]).name for row in rows] == ["0.png", "0-2.png"]  # names kept apart
    for row in rows:
        with Image.open(row["cam"]) as picture:
            assert picture.size == (288, 288) and picture.mode == "RGB"
    assert main([*argv, "--cam-class", "green", str(images[0])]) == 0
    capsys.readouterr()
    assert main([*argv, "--cam-class", "purple", str(images[0])]) == 2
    assert "--cam-class 'purple' is not a class" in capsys.readouterr().err
    assert main(["predict", "--weights", str(weights), "--cam-layer", "x", str(images[0])]) == 2
    assert "go with --cam DIR" in capsys.readouterr().err


def test_eval_reports_per_class_results_and_writes_the_confusion_matrix(trained, tmp_path, capsys):
    root, weights = trained
    report = tmp_path / "report"
    argv = ["eval", "--weights", str(weights), "--data", str(root), "--workers", "0"]
    assert main([*argv, "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "precision" in out and "blue" in out
    assert {p.name for p in report.iterdir()} == {"per_class.csv", "confusion.csv", "confusion.png"}
    counts = [row.split(",")[1:] for row in (report / "confusion.csv").read_text().splitlines()[1:]]
    assert sum(int(c) for row in counts for c in row) == 18


def test_predict_names_what_it_cannot_read_and_never_blocks_on_a_fifo(trained, tmp_path):
    import os
    import subprocess
    import sys

    _, weights = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    os.mkfifo(folder / "fifo.png")
    (folder / "folder.jpg").mkdir()
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a signature and nothing more
    result = subprocess.run(
        [sys.executable, "-m", "xception", "predict", "--weights", str(weights), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in result.stderr
    for name in ("fifo.png", "folder.jpg", "bomb.png"):
        assert f"{folder / name}" in result.stdout + result.stderr, name


def test_finite_weights_that_overflow_give_errors_not_nan_answers(trained, tmp_path):
    from xception.weights import save_weights

    root, weights = trained
    model, metadata = load_model(weights)
    with torch.no_grad():
        model.head.classifier.weight.fill_(3e38)  # finite, but the logits overflow
        model.head.classifier.bias.fill_(3e38)
    diverged = tmp_path / "diverged.safetensors"
    save_weights(model, diverged, metadata["model"], metadata)
    rows = Predictor.load(diverged).predict([root / "val" / "red"], top_k=2)
    assert rows and all(
        row["error"].startswith("the model's outputs are not finite") for row in rows
    )
    with pytest.raises(ValueError, match="gives non-finite outputs on the validation images"):
        evaluate_weights(diverged, str(root), workers=0)
    assert evaluate_weights(diverged, str(root), workers=0, allow_nonfinite=True)["images"] == 18


def test_auto_backend_runs_a_cached_onnx_export_of_the_same_function(
    trained, tmp_path, monkeypatch
):
    """On a CPU with the export extra, fp32 eval/predict run our ONNX export in onnxruntime
    (faster there), exported once per file content; the logits are PyTorch's."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import xception.exporting
    from xception.data.loaders import single_images

    monkeypatch.delenv("XCEPTION_BACKEND")
    monkeypatch.setenv("XCEPTION_CACHE", str(tmp_path / "cache"))
    root, weights = trained
    auto = Predictor.load(weights, device="cpu")
    torch_path = Predictor.load(weights, device="cpu", backend="torch")
    assert (auto.backend, torch_path.backend) == ("onnxruntime", "torch")
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1

    paths = sorted(p for p in (root / "val").rglob("*.png"))
    images = torch.stack([image for _, image in single_images(paths, auto.pre)])
    torch.testing.assert_close(auto.logits(images), torch_path.logits(images), atol=1e-4, rtol=0)

    # The same content under another name reuses the export; bf16 and GPUs stay in torch.
    def no_export(*_args, **_kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(xception.exporting, "export_onnx", no_export)
    copy = tmp_path / "copy.safetensors"
    shutil.copy(weights, copy)
    assert Predictor.load(copy, device="cpu").backend == "onnxruntime"
    assert Predictor.load(weights, device="cpu", precision="bf16").backend == "torch"
    with pytest.raises(ValueError, match="runs fp32 on CPUs"):
        Predictor.load(weights, device="cpu", amp="bf16", backend="onnxruntime")
    result = evaluate_weights(weights, root, workers=0, device="cpu")
    assert result["backend"] == "onnxruntime" and result["images"] == 18
