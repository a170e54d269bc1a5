"""eval and predict on self-describing weight files, and their user errors."""

import json
import shutil

import pytest

from xception.cli import main
from xception.inference import evaluate_weights, predict_paths
from xception.training.loop import train
from xception.training.recipes import resolve


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_folder):
    root = image_folder
    run = tmp_path_factory.mktemp("run") / "r"
    config = resolve(
        "quick", overrides=dict(data=str(root), image_size=72, batch_size=8, epochs=1, workers=0)
    )
    train(config, out=run, progress=False)
    return root, run / "best.safetensors"


def test_eval_scores_the_val_split_and_writes_json(trained, tmp_path):
    root, weights = trained
    metrics, path = evaluate_weights(weights, str(root), workers=0, output=str(tmp_path / "e.json"))
    assert metrics["images"] == 18 and 0 <= metrics["top1"] <= 1 <= metrics["top5"] + 1e-9
    assert json.loads(path.read_text())["top1"] == metrics["top1"]
    raw, _ = evaluate_weights(
        weights, str(root), raw=True, workers=0, output=str(tmp_path / "r.json")
    )
    assert raw["variant"] == "raw"


def test_eval_refuses_data_with_other_classes(trained, tmp_path):
    root, weights = trained
    other = tmp_path / "other"
    shutil.copytree(root, other)
    for split in ("train", "val"):
        (other / split / "red").rename(other / split / "crimson")
    with pytest.raises(ValueError, match="trained on 3 classes"):
        evaluate_weights(weights, str(other), workers=0)


def test_predict_ranks_classes_and_reports_bad_files(trained, tmp_path, capsys):
    root, weights = trained
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    rows, failures = predict_paths(weights, [root / "val" / "red", bad], top_k=2)
    assert failures == 1 and len(rows) == 7
    good = [row for row in rows if "predictions" in row]
    assert all(len(row["predictions"]) == 2 for row in good)
    assert all(abs(sum(p["probability"] for p in row["predictions"]) - 1) < 0.5 for row in good)
    assert (
        main(
            [
                "predict",
                "--weights",
                str(weights),
                "--format",
                "json",
                str(root / "val" / "blue" / "0.png"),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out[0]["predictions"][0]["class"] in {"red", "green", "blue"}
    assert main(["predict", "--weights", str(weights), str(bad)]) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--weights", "nope.safetensors"], "weights file not found"),
        (["predict", "--weights", "nope.safetensors", "x.png"], "weights file not found"),
        (["train", "--data", "/nonexistent"], "data folder not found"),
        (["train", "--recipe", "fast"], "unknown recipe 'fast'"),
        (["train", "--set", "learning_rate=1"], "unknown training option 'learning_rate'"),
        (["train", "--epochs", "0"], "epochs=0 must be positive"),
        (["train", "--resume", "/nonexistent"], "nothing to resume"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_predict_on_a_missing_image_is_a_user_error(trained, capsys):
    _, weights = trained
    assert main(["predict", "--weights", str(weights), "missing.png"]) == 2
    assert "no such image or folder" in capsys.readouterr().err


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


def test_eval_never_overwrites_an_existing_file(trained, tmp_path):
    root, weights = trained
    keep = tmp_path / "keep.json"
    keep.write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate_weights(weights, str(root), workers=0, output=str(keep))
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
    import torch

    from xception.data.loaders import single_images
    from xception.data.transforms import normalize
    from xception.inference import _load, _preprocessing
    from xception.weights import load_model

    root, weights = trained
    fast = _load(weights, raw=False, device="cpu")[0]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)

    paths = sorted(p for p in (root / "val").rglob("*") if p.is_file())[:6]
    rows, failures = predict_paths(weights, paths, top_k=3)
    eager, metadata = load_model(weights)
    pre = _preprocessing(metadata, weights)
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
