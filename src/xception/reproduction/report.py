"""From measured runs to ``results.json``, ``report.md`` and plots, with a verdict on each
of the paper's claims that states the effect size and weighs it against seed-to-seed
spread rather than calling any difference a reproduction."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xception.files import write_text
from xception.plots import pyplot, save_figure
from xception.reproduction.experiments import PAPER_STEPS_PER_SECOND, get_experiment


def score_key(run: dict[str, Any]) -> str:
    """The metric a run was ranked by (``primary_metric`` of the data it trained on)."""
    return run["summary"]["primary_metric"]


#: An arm "learned" when it closed at least this share of the gap between the score of
#: the class prior alone and a perfect score; comparisons with an arm that did not say so.
LEARNED_SHARE = 0.05


@dataclass(frozen=True)
class ArmStats:
    arm: str
    label: str
    seeds: int
    final: float  # mean over seeds of the last evaluation's score
    final_std: float | None  # sample standard deviation over seeds (None for one seed)
    profile_mean: float  # mean score over all evaluations: the convergence speed
    profile_std: float | None  # its sample standard deviation over seeds
    parameters: int
    macs: int
    train_images_per_s: float | None
    prior: float  # the score of answering with the training class frequencies

    @property
    def learned(self) -> bool:
        return self.final - self.prior >= LEARNED_SHARE * (1 - self.prior)


def runs_by_arm(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each arm's runs (one per seed), arms in the order they were run."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault(run["arm"], []).append(run)
    return grouped


def arm_stats(results: dict[str, Any]) -> list[ArmStats]:
    speed = results["speed"]
    stats = []
    for arm, mine in runs_by_arm(results["runs"]).items():
        key = score_key(mine[0])
        finals = [run["summary"]["metrics"][key] for run in mine]
        profiles = [statistics.fmean(row[key] for row in run["rows"]) for run in mine]
        timed = speed["arms"].get(arm)
        stats.append(
            ArmStats(
                arm=arm,
                label=mine[0]["label"],
                seeds=len(mine),
                final=statistics.fmean(finals),
                final_std=statistics.stdev(finals) if len(finals) > 1 else None,
                profile_mean=statistics.fmean(profiles),
                profile_std=statistics.stdev(profiles) if len(profiles) > 1 else None,
                parameters=mine[0]["parameters"],
                macs=mine[0]["macs"],
                train_images_per_s=speed["batch_size"] / timed["train_median_s"] if timed else None,
                prior=statistics.fmean(run["prior"] for run in mine),
            )
        )
    return stats


def verdict(better: ArmStats, worse: ArmStats) -> dict[str, Any]:
    """Effect (percentage points) of ``better`` over ``worse`` and what it supports, on
    the final score and on convergence (the score averaged over all evaluations).

    Beyond noise means the difference of the means exceeds twice its standard error
    (from the seeds' spread); with one seed there is no spread and the verdict says so. An
    arm that did not learn (``ArmStats.learned``) supports no conclusion either way.
    """

    def compare(a: float, a_std: float | None, b: float, b_std: float | None) -> tuple:
        error = None
        if a_std is not None and b_std is not None:
            error = 100 * math.sqrt(a_std**2 / better.seeds + b_std**2 / worse.seeds)
        return 100 * (a - b), error, _weigh(100 * (a - b), error)

    effect, error, call = compare(better.final, better.final_std, worse.final, worse.final_std)
    convergence, convergence_error, convergence_call = compare(
        better.profile_mean, better.profile_std, worse.profile_mean, worse.profile_std
    )
    untrained = [arm for arm in (better, worse) if not arm.learned]
    if untrained:
        call = convergence_call = "no conclusion: " + "; ".join(
            f"{arm.label} did not learn ({_pct(arm.final)}% against {_pct(arm.prior)}% "
            "from the class prior alone)"
            for arm in untrained
        )
    return {
        "effect_pp": effect,
        "standard_error_pp": error,
        "verdict": call,
        "convergence_pp": convergence,
        "convergence_standard_error_pp": convergence_error,
        "convergence_verdict": convergence_call,
    }


def _weigh(effect: float, error: float | None) -> str:
    direction = (
        "same direction as the paper"
        if effect > 0
        else "opposite to the paper"
        if effect < 0
        else "no difference"
    )
    if error is None:
        return f"{direction} (1 seed: no spread to weigh it against)"
    if abs(effect) <= 2 * error:
        return f"{direction}, within seed noise"
    return "reproduced" if effect > 0 else "not reproduced: reversed beyond seed noise"


def plot_profiles(out: Path, results: dict[str, Any]) -> str:
    """Validation score against steps, one line per arm (mean over seeds, min-max band)."""
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(7, 4.5))
    runs = results["runs"]
    key = score_key(runs[0])
    for arm_runs in runs_by_arm(runs).values():
        mine = [run["rows"] for run in arm_runs]
        length = min(len(rows) for rows in mine)
        steps = [row["step"] for row in mine[0][:length]]
        values = [[rows[i][key] for rows in mine] for i in range(length)]
        label = arm_runs[0]["label"]
        (line,) = axis.plot(steps, [statistics.fmean(v) for v in values], marker="o", label=label)
        if len(mine) > 1:
            axis.fill_between(
                steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2,
                color=line.get_color(),
            )  # fmt: skip
    prior = statistics.fmean(run["prior"] for run in runs)
    axis.axhline(prior, color="grey", linestyle="--", linewidth=1, label="class prior alone")
    name = "MAP@100" if key == "val_map100" else "top-1"
    axis.set(xlabel="training step", ylabel=f"validation {name} (averaged weights)")
    axis.set_title(results["title"], fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    save_figure(fig, out / "profiles.png", dpi=110)
    return "profiles.png"


def plot_cost(out: Path, stats: list[ArmStats], results: dict[str, Any]) -> str:
    """The spectrum: final score against multiply-adds and against measured speed."""
    plt = pyplot()
    fig, (by_macs, by_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, xs, xlabel in (
        (by_macs, [s.macs / 1e6 for s in stats], "multiply-adds per image (M)"),
        (by_speed, [s.train_images_per_s or math.nan for s in stats], "training images/s"),
    ):
        ys = [100 * s.final for s in stats]
        axis.plot(*zip(*sorted(zip(xs, ys, strict=True)), strict=True), marker="o")  # by cost
        for x, y, s in zip(xs, ys, stats, strict=True):
            axis.annotate(s.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set(xlabel=xlabel, ylabel="final validation score (%)")
        axis.grid(alpha=0.3)
    by_macs.set_xscale("log")
    fig.suptitle(results["title"], fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / "cost.png", dpi=110)
    return "cost.png"


def table3_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    measured = results["table3"]
    rows = []
    for name, row in measured["models"].items():
        rows.append(
            {
                "model": name,
                "parameters": row["parameters"],
                "paper_parameters": row["paper_parameters"],
                "macs": row["macs"],
                "train_steps_per_s": 1 / row["train_median_s"],
                "inference_images_per_s": measured["batch_size"] / row["inference_median_s"],
                "paper_steps_per_s": PAPER_STEPS_PER_SECOND.get(name),
            }
        )
    return rows


def plot_table3(out: Path, rows: list[dict[str, Any]], results: dict[str, Any]) -> str:
    plt = pyplot()
    fig, (train, infer) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [row["model"] for row in rows]
    train.bar(names, [row["train_steps_per_s"] for row in rows])
    train.set(ylabel="training steps/s", title="training")
    infer.bar(names, [row["inference_images_per_s"] for row in rows])
    infer.set(ylabel="images/s", title="inference")
    for axis in (train, infer):
        axis.tick_params(axis="x", labelsize=8)
        axis.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{results['title']} ({results['environment']['device']})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "speed.png", dpi=110)
    return "speed.png"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def _se(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def training_sections(out: Path, results: dict[str, Any]) -> list[str]:
    stats = arm_stats(results)
    key = score_key(results["runs"][0])
    name = "MAP@100" if key == "val_map100" else "top-1"
    speed = results["speed"]
    arms_table = markdown_table(
        [
            "arm",
            "seeds",
            f"final {name} (%)",
            "spread (sd, pp)",
            f"mean {name} over training (%)",
            "class prior alone (%)",
            "parameters",
            "multiply-adds",
            f"train images/s (batch {speed['batch_size']})",
        ],
        [
            [
                s.label,
                str(s.seeds),
                _pct(s.final),
                "-" if s.final_std is None else f"{100 * s.final_std:.2f}",
                _pct(s.profile_mean),
                _pct(s.prior) + ("" if s.learned else " (did not learn)"),
                f"{s.parameters:,}",
                f"{s.macs / 1e6:.1f} M",
                "-" if s.train_images_per_s is None else f"{s.train_images_per_s:.0f}",
            ]
            for s in stats
        ],
    )
    by_arm = {s.arm: s for s in stats}
    claims = [
        {"claim": c.statement, **verdict(by_arm[c.better], by_arm[c.worse])}
        for c in get_experiment(results["experiment"]).claims
    ]
    results["arms"] = [asdict(s) for s in stats]
    results["claims"] = claims
    sections = [f"## Arms\n\n{arms_table}", f"![training profiles]({plot_profiles(out, results)})"]
    if claims:
        rows = [
            [
                c["claim"],
                f"{c['effect_pp']:+.2f}",
                _se(c["standard_error_pp"]),
                c["verdict"],
                f"{c['convergence_pp']:+.2f}",
                _se(c["convergence_standard_error_pp"]),
                c["convergence_verdict"],
            ]
            for c in claims
        ]
        header = [
            "the paper's claim",
            "final (pp)",
            "s.e.",
            "verdict on the final score",
            "convergence (pp)",
            "s.e.",
            "verdict on convergence",
        ]
        sections.append(
            "## The paper's claims\n\nFinal: difference of the last evaluations' scores in "
            "percentage points; convergence: difference of the scores averaged over all "
            "evaluations (the area under the training profile). Positive is the paper's "
            "direction; each is weighed against its own seed spread (s.e., pp).\n\n"
            + markdown_table(header, rows)
        )
    if results["experiment"] == "spectrum":
        sections.append(f"![accuracy against cost]({plot_cost(out, stats, results)})")
    return sections


def table3_sections(out: Path, results: dict[str, Any]) -> list[str]:
    rows = table3_rows(results)
    results["table"] = rows
    measured = results["table3"]
    table = markdown_table(
        [
            "model",
            "parameters",
            "paper",
            "multiply-adds (299 px)",
            "train steps/s",
            "paper steps/s",
            "inference images/s",
        ],
        [
            [
                r["model"],
                f"{r['parameters']:,}",
                "-" if r["paper_parameters"] is None else f"{r['paper_parameters']:,}",
                f"{r['macs'] / 1e9:.2f} G",
                f"{r['train_steps_per_s']:.2f}",
                "-" if r["paper_steps_per_s"] is None else f"{r['paper_steps_per_s']:.0f}",
                f"{r['inference_images_per_s']:.1f}",
            ]
            for r in rows
        ],
    )
    by_model = {r["model"]: r for r in rows}
    ratio = (
        by_model["xception"]["train_steps_per_s"]
        / by_model["inception_v3_paper"]["train_steps_per_s"]
    )
    paper = PAPER_STEPS_PER_SECOND["xception"] / PAPER_STEPS_PER_SECOND["inception_v3_paper"]
    results["speed_ratio"] = {"measured": ratio, "paper": paper}
    return [
        f"## Size and speed\n\nBatch {measured['batch_size']}, 299x299, amp "
        f"{measured['amp']}, channels_last {measured['channels_last']}; timings interleaved "
        f"(medians of {len(measured['models']['xception']['train_seconds'])} rounds)."
        f"\n\n{table}",
        f"Xception / Inception V3 (paper's) training speed: **{ratio:.2f}** measured, "
        f"{paper:.2f} in the paper (28 / 31 steps/s).",
        f"![speed]({plot_table3(out, rows, results)})",
    ]


def data_lines(results: dict[str, Any]) -> list[str]:
    """Where the images came from: set, splits, images per class (``data_facts``)."""
    lines = []
    for source, facts in results.get("data", {}).items():
        splits = "; ".join(
            f"{name} {split['images']:,} images ({_per_class(split['per_class'])})"
            for name, split in facts["splits"].items()
        )
        kind = "multi-label" if facts["multi_label"] else "single-label"
        lines.append(f"**Data:** {source}, {kind}: {splits}")
    return lines


def _per_class(counts: dict[str, int]) -> str:
    values = set(counts.values())
    if len(values) == 1:
        return f"{values.pop():,} per class, {len(counts)} classes"
    return f"{min(values):,}-{max(values):,} per class, {len(counts)} classes"


def write_report(out: Path, results: dict[str, Any]) -> None:
    sections = (
        training_sections(out, results) if "runs" in results else table3_sections(out, results)
    )
    env = results["environment"]
    scale = results["scale"]
    head = [
        f"# {results['title']}",
        f"**The paper:** {results['paper']}.",
        f"**Command:** `{results['command'] or 'xception reproduce ' + results['experiment']}`  \n"
        f"**Scale:** {scale['name']} ({scale['description']}); seeds: "
        f"{results['plan']['seeds']}; data: {results['plan']['data'] or 'built-in'}  \n"
        f"**Device:** {env['device']}, {env['threads']} threads; Python {env['python']}, "
        f"torch {env['torch']}, torchvision {env['torchvision']}, xception {env['xception']}  \n"
        f"**Wall time of this invocation:** {results['wall_time_s'] / 60:.1f} min"
        + (
            f" (training, summed over runs: "
            f"{sum(r['summary']['wall_time_s'] for r in results['runs']) / 60:.1f} min)"
            if "runs" in results
            else ""
        ),
    ]
    write_text(out / "report.md", "\n\n".join([*head, *data_lines(results), *sections]) + "\n")
    write_text(out / "results.json", json.dumps(results, indent=2, default=str))
