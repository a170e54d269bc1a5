"""The Python API mirrors the command line: a function per command, the same options."""

import inspect

import pytest
import torch

import xception
from xception.cli import build_parser


def test_every_command_has_a_function_at_the_top_level():
    for name in ("train", "evaluate", "predict", "export", "convert", "preprocessing"):
        assert callable(getattr(xception, name)), name
    assert xception.__version__ == "0.1.0"


@pytest.mark.parametrize(
    ("command", "function", "renamed"),
    [
        ("eval", xception.evaluate, {"json": "json_path", "report": "report_dir"}),
        ("export", xception.export, {}),
        ("convert", xception.convert, {"source_format": "source_format", "notop": None}),
    ],
)
def test_command_options_are_function_parameters(command, function, renamed):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    parameters = inspect.signature(function).parameters
    for action in sub._actions:
        if action.dest in ("help",):
            continue
        name = renamed.get(action.dest, action.dest)
        if name is not None:
            assert name in parameters, f"{command} --{action.dest}"


def test_train_resume_and_evaluate_from_python(image_folder, tmp_path):
    options = dict(data=image_folder, image_size=72, batch_size=8, workers=0, progress=False)
    run = xception.train(out=tmp_path / "run", max_steps=2, epochs=1, **options)
    assert run.run_dir == tmp_path / "run" and run.metrics["step"] == 2
    assert run.primary_metric == "val_top1"
    resumed = xception.train(resume=run.run_dir, max_steps=4, progress=False)
    assert resumed.metrics["step"] == 4
    with pytest.raises(ValueError, match="drop --config, --recipe"):
        xception.train("quick", resume=run.run_dir)
    metrics = xception.evaluate(run.run_dir / "last.safetensors", image_folder, workers=0)
    assert metrics["images"] == 18 and metrics["variant"] == "averaged"


def test_train_takes_a_config_mapping_with_its_recipe(image_folder, tmp_path):
    config = {"recipe": "quick", "epochs": 1, "model_overrides": {"residual": False}}
    run = xception.train(
        config=config,
        out=tmp_path / "run",
        data=str(image_folder),
        image_size=72,
        batch_size=8,
        max_steps=1,
        workers=0,
        progress=False,
    )
    model, _ = xception.load_model(run.run_dir / "last.safetensors")
    assert model.config.residual is False and model.config.bn_momentum == 0.1  # quick's


def test_export_and_convert_never_overwrite(tmp_path):
    target = tmp_path / "exists.onnx"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        xception.export(tmp_path / "w.safetensors", target)
    with pytest.raises(FileExistsError, match="--overwrite"):
        xception.convert(tmp_path / "w.h5", target, model="xception")
    assert target.read_text() == "mine"


def test_convert_reads_the_format_from_the_file_name(tmp_path):
    timm = pytest.importorskip("timm")
    source = timm.create_model("legacy_xception", num_classes=4).eval()
    path = tmp_path / "legacy.pth"
    torch.save(source.state_dict(), path)
    out = xception.convert(path, tmp_path / "ours.safetensors", model="xception")
    model = xception.create_model("xception", weights=out).eval()
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=1e-4, atol=1e-4)
