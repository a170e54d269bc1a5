import json
from dataclasses import replace

import pytest

from xception import create_model
from xception.cli import main
from xception.reproduction import experiments, runner
from xception.reproduction.report import ArmStats, verdict

SMALL = [
    "--set",
    "max_steps=2",
    "builtin_train_per_class=4",
    "builtin_val_per_class=2",
    "batch_size=8",
    "workers=0",
    "log_every=1",
]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XCEPTION_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def reproduce(out, experiment, *extra):
    return main(
        ["reproduce", experiment, "--out", str(out), "--quiet", "--seeds", "1", *SMALL, *extra]
    )


def test_an_experiment_writes_its_report_plots_and_results(tmp_path):
    out = tmp_path / "residual"
    assert reproduce(out, "residual", "--seeds", "2") == 0
    for name in ("report.md", "results.json", "profiles.png", "speed.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert [(r["arm"], r["seed"]) for r in results["runs"]] == [
        ("residual", 0),
        ("no-residual", 0),
        ("residual", 1),
        ("no-residual", 1),
    ]
    model, base = experiments.SCALES["tiny"].xception
    for arm in results["arms"]:  # the trained models' sizes, counted independently
        overrides = {**base, "middle_blocks": 8, "residual": arm["arm"] == "residual"}
        expected = create_model(model, num_classes=10, **overrides)
        assert arm["parameters"] == sum(p.numel() for p in expected.parameters())
    (claim,) = results["claims"]
    assert claim["claim"] == "residual connections help" and "verdict" in claim
    report = (out / "report.md").read_text()
    assert "xception reproduce residual" in report and "![training profiles]" in report
    # Provenance: the set (the built-in one is drawn per seed), its splits, per class.
    assert len(results["data"]) == 2
    for facts in results["data"].values():
        assert facts["splits"]["train"]["images"] == 40 and facts["splits"]["val"]["images"] == 20
        assert set(facts["splits"]["train"]["per_class"].values()) == {4}
    assert "**Data:** built-in" in report and "train 40 images (4 per class, 10 classes)" in report


def test_an_interrupted_experiment_resumes_arm_by_arm(tmp_path, monkeypatch):
    out = tmp_path / "activation"
    assert reproduce(out, "activation") == 0
    first = json.loads((out / "results.json").read_text())
    (out / "runs" / "relu-seed0" / "summary.json").unlink()  # stopped after its checkpoint
    (out / "speed.json").unlink()
    resumed = []

    def no_training(*args, **kwargs):
        raise AssertionError("a finished or checkpointed arm was trained again")

    real_resume = runner.resume
    monkeypatch.setattr(runner, "train", no_training)
    monkeypatch.setattr(runner, "resume", lambda path, **kw: resumed.append(path.name) or
                        real_resume(path, **kw))  # fmt: skip
    assert reproduce(out, "activation") == 0
    assert resumed == ["relu-seed0"]
    # it continued from its checkpoint, the end of its training, rather than from step 0
    steps = next(r["summary"]["steps"] for r in first["runs"] if r["folder"].endswith("relu-seed0"))
    log = (out / "runs" / "relu-seed0" / "run.log").read_text().splitlines()
    assert [line.rsplit(" ", 1)[1] for line in log if "from step" in line] == ["0", str(steps)]
    again = json.loads((out / "results.json").read_text())
    assert [r["summary"]["metrics"] for r in again["runs"]] == [
        r["summary"]["metrics"] for r in first["runs"]
    ]


def test_a_folder_holding_another_reproduction_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert reproduce(out, "residual") == 0
    before = (out / "results.json").read_bytes()
    assert reproduce(out, "residual", "epochs=3") == 2
    assert "holds a different reproduction (train_overrides differ)" in capsys.readouterr().err
    assert reproduce(out, "activation") == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert reproduce(tmp_path / "other", "residual") == 2
    assert "holds no reproduction" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_table3_counts_the_papers_parameters_and_times_the_models(tmp_path, monkeypatch):
    tiny = experiments.SCALES["tiny"]
    monkeypatch.setitem(experiments.SCALES, "tiny", replace(tiny, bench_batch=1, bench_rounds=1))
    assert main(["reproduce", "table3", "--out", str(tmp_path), "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["model"]: row for row in results["table"]}
    assert rows["xception"]["parameters"] == rows["xception"]["paper_parameters"] == 22_855_952
    assert rows["inception_v3_paper"]["parameters"] == 23_626_728
    assert rows["inception_v3"]["parameters"] == 23_834_568
    assert 8.3e9 < rows["xception"]["macs"] < 8.5e9
    assert all(row["train_steps_per_s"] > 0 and row["inference_images_per_s"] > 0
               for row in rows.values())  # fmt: skip
    ratio = results["speed_ratio"]
    assert ratio["paper"] == pytest.approx(28 / 31)
    expected = (
        rows["xception"]["train_steps_per_s"] / rows["inception_v3_paper"]["train_steps_per_s"]
    )
    assert ratio["measured"] == pytest.approx(expected)
    assert (tmp_path / "speed.png").is_file()


def test_list_and_bad_options(capsys):
    assert main(["reproduce", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("table3", "residual", "activation", "spectrum", "head"))
    assert main(["reproduce", "fig11"]) == 2
    assert "unknown experiment 'fig11'" in capsys.readouterr().err
    assert main(["reproduce", "residual", "--seeds", "0"]) == 2
    assert main(["reproduce", "residual", "--scale", "huge"]) == 2
    assert main(["reproduce", "residual", "--set", "model_overrides={}"]) == 2
    assert "--set model_overrides=... would change what the experiment varies" in (
        capsys.readouterr().err
    )


def stats(arm, scores, prior=0.1):
    import statistics

    return ArmStats(
        arm=arm,
        label=arm,
        seeds=len(scores),
        final=statistics.fmean(scores),
        final_std=statistics.stdev(scores) if len(scores) > 1 else None,
        profile_mean=statistics.fmean(scores) - 0.1,
        profile_std=statistics.stdev(scores) if len(scores) > 1 else None,
        parameters=1,
        macs=1,
        train_images_per_s=None,
        prior=prior,
    )


def test_verdicts_weigh_the_effect_against_seed_spread():
    # means 0.80 vs 0.70, sd 0.01 each over 3 seeds: s.e. = 100 * sqrt(2 * 1e-4 / 3) = 0.816 pp
    clear = verdict(stats("a", [0.79, 0.80, 0.81]), stats("b", [0.69, 0.70, 0.71]))
    assert clear["effect_pp"] == pytest.approx(10.0)
    assert clear["standard_error_pp"] == pytest.approx(0.8165, abs=1e-4)
    assert clear["verdict"] == clear["convergence_verdict"] == "reproduced"
    assert clear["convergence_standard_error_pp"] == pytest.approx(0.8165, abs=1e-4)
    noisy = verdict(stats("a", [0.70, 0.80]), stats("b", [0.74, 0.74]))
    assert noisy["verdict"] == "same direction as the paper, within seed noise"
    reversed_ = verdict(stats("a", [0.69, 0.70, 0.71]), stats("b", [0.79, 0.80, 0.81]))
    assert reversed_["verdict"] == "not reproduced: reversed beyond seed noise"
    single = verdict(stats("a", [0.6]), stats("b", [0.7]))
    assert single["verdict"] == "opposite to the paper (1 seed: no spread to weigh it against)"
    assert single["standard_error_pp"] is None


def test_a_comparison_with_an_arm_that_did_not_learn_supports_no_conclusion():
    # MAP 0.66 with the class prior alone at 0.66: the 'worse' arm learned nothing, so
    # even a large effect says nothing about the paper's claim.
    learned = stats("xception", [0.89], prior=0.66)
    flat = stats("inception", [0.6605], prior=0.66)
    assert learned.learned and not flat.learned
    call = verdict(learned, flat)
    assert call["effect_pp"] == pytest.approx(22.95)
    assert call["verdict"] == (
        "no conclusion: inception did not learn (66.05% against 66.00% from the class prior alone)"
    )
    # 5% of the way from the prior (0.10) to perfect is 0.145: just above it has learned.
    assert stats("a", [0.146]).learned and not stats("b", [0.144]).learned


def test_spectrum_arms_train_with_the_fan_in_scaled_spatial_rate_and_others_without():
    plan = runner.Plan(experiment="spectrum")
    tiny, spectrum = experiments.get_scale("tiny"), experiments.get_experiment("spectrum")
    for arm in experiments.arms(spectrum, tiny):
        assert runner.arm_config(plan, tiny, spectrum, arm, 0).spatial_lr_fan_in
    residual = experiments.get_experiment("residual")
    (arm, _) = experiments.arms(residual, tiny)
    assert not runner.arm_config(plan, tiny, residual, arm, 0).spatial_lr_fan_in


def test_activation_arms_train_with_the_papers_recipe_and_families_at_their_size():
    """Fig. 10 was measured with SGD + momentum, staircase decay and Polyak averaging;
    Xception and Inception V3 are compared where Inception's grids do not collapse."""
    tiny = experiments.get_scale("tiny")
    activation = experiments.get_experiment("activation")
    plan = runner.Plan(experiment="activation")
    for arm in experiments.arms(activation, tiny):
        config = runner.arm_config(plan, tiny, activation, arm, 0)
        assert (config.optimizer, config.momentum, config.lr_decay_unit) == ("sgd", 0.9, "epoch")
        assert config.ema_decay > 0 and config.epochs == tiny.train["epochs"]
        assert config.image_size == tiny.image_size
    families = experiments.get_experiment("families")
    plan = runner.Plan(experiment="families")
    for arm in experiments.arms(families, tiny):
        config = runner.arm_config(plan, tiny, families, arm, 0)
        assert config.optimizer == "adamw" and config.image_size == tiny.family_image_size
        assert config.epochs == tiny.experiment_train["families"]["epochs"] < tiny.train["epochs"]


def test_every_experiment_runs_three_seeds_or_more_unless_told():
    """One seed gives an effect no spread to be judged against."""
    for name, experiment in experiments.EXPERIMENTS.items():
        assert runner.Plan(name).seeds == experiment.seeds >= 3
    assert runner.Plan("residual", seeds=1).seeds == 1


def test_plans_read_set_values_as_training_option_types():
    from xception.reproduction.runner import Plan

    typed = Plan("residual", train_overrides={"epochs": 4, "ema_decay": 0.0}).identity
    assert Plan("residual", train_overrides={"epochs": "04", "ema_decay": "0"}).identity == typed
    with pytest.raises(ValueError, match="unknown training option 'epoch'"):
        Plan("residual", train_overrides={"epoch": "4"})


def test_arm_stats_summarise_each_arms_seeds_from_the_runs():
    from xception.reproduction.report import arm_stats

    def run(arm, seed_scores, prior):
        summary = {"primary_metric": "val_top1", "metrics": {"val_top1": seed_scores[-1]}}
        rows = [{"val_top1": score} for score in seed_scores]
        return {"arm": arm, "label": arm.upper(), "summary": summary, "rows": rows,
                "parameters": 10, "macs": 20, "prior": prior}  # fmt: skip

    results = {
        "speed": {"batch_size": 32, "arms": {"a": {"train_median_s": 0.5}}},
        "runs": [
            run("a", [0.5, 0.7], 0.1),
            run("b", [0.2, 0.3], 0.2),
            run("a", [0.6, 0.9], 0.3),
        ],
    }
    a, b = arm_stats(results)
    assert (a.arm, a.label, a.seeds, b.seeds) == ("a", "A", 2, 1)
    assert a.final == pytest.approx(0.8) and a.final_std == pytest.approx(0.1414, abs=1e-4)
    assert a.profile_mean == pytest.approx((0.6 + 0.75) / 2)  # each seed's mean, averaged
    assert a.profile_std == pytest.approx(0.1061, abs=1e-4) and b.profile_std is None
    assert a.prior == pytest.approx(0.2) and a.train_images_per_s == pytest.approx(64)
    assert b.final == pytest.approx(0.3) and b.final_std is None and b.train_images_per_s is None
