"""The bench harness: interleaved rounds, ratios to the baseline, clear errors."""

import json

import pytest

from xception.benchmarking import BenchConfig, cpu_peak_memory_mb, format_table, run, to_json
from xception.cli import main

SMALL = BenchConfig(batch_size=2, image_size=71, warmup=1, rounds=3, iterations=1)


def test_contenders_are_timed_every_round_and_compared_to_the_baseline():
    results = run(["ours", "ours-fast", "ours-default"], "xception_tiny", SMALL)
    assert [r.name for r in results] == ["ours", "ours-fast", "ours-default"]
    assert all(len(r.seconds) == SMALL.rounds and r.median > 0 for r in results)
    report = to_json(results, SMALL, "xception_tiny")
    assert report["results"][0]["ratio_to_baseline"] == 1.0
    assert "x ours" in format_table(results, SMALL)
    json.dumps(report)


def test_training_mode_times_full_steps():
    config = BenchConfig(
        mode="train", batch_size=2, image_size=71, warmup=1, rounds=2, iterations=1
    )
    (result,) = run(["ours"], "xception_tiny", config)
    assert result.images_per_second(2) > 0


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["nope"], "unknown contender"),
        (["onnxruntime"], "inference contender"),
        (["ours-fused"], "inference contender"),
        (["ours-default"], "inference contender"),
    ],
)
def test_bad_contenders_fail_clearly(specs, message):
    with pytest.raises(ValueError, match=message):
        run(specs, "xception_tiny", BenchConfig(mode="train", rounds=1))


def test_bench_command_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = [
        "bench",
        "xception_tiny",
        "--batch-size",
        "2",
        "--image-size",
        "71",
        "--rounds",
        "2",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    assert "images/s" in capsys.readouterr().out
    assert json.loads(out.read_text())["model"] == "xception_tiny"


def test_cpu_peak_memory_grows_with_the_batch():
    # A training step's activations scale with the batch: 16x the images must raise the
    # peak by clearly more (each figure from its own fresh process, as --memory takes them).
    def peak(batch):
        config = BenchConfig(mode="train", batch_size=batch, image_size=71, rounds=1, memory=True)
        return cpu_peak_memory_mb("ours", "xception_tiny", config)

    small, large = peak(2), peak(32)
    assert small >= 0 and large > small + 20
