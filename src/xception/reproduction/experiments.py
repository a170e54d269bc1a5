"""The paper's experiments as data: scales, arms (one training run each) and the claims
the paper makes about them, so that running, resuming and reporting share one plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PAPER = "Chollet, Xception, CVPR 2017"


@dataclass(frozen=True)
class Scale:
    """How big every arm of an experiment is: models, images, data and recipe.

    ``xception`` / ``inception`` are registry names with config overrides; the training
    fields go to ``TrainConfig`` on top of ``recipe`` (``multi_recipe`` for the multi-label
    ``head`` experiment), then ``experiment_train[experiment]``: fewer epochs for the
    experiments whose arms cost more per image, so that each experiment's default command
    fits the scale's time budget. ``fc_units`` is the width of the two hidden FC layers of the
    ``head`` experiment (the paper's 4096 at full scale). ``family_image_size`` is the
    input of experiments that compare Xception with Inception V3 (``families``, ``head``):
    large enough that Inception's last grid is at least 3x3 (at 75-106 px it is 1x1 and
    its 17x17 stage 3x3, where its factorised 1x7/7x1 convolutions see mostly padding).
    """

    name: str
    description: str
    xception: tuple[str, dict[str, Any]]
    inception: tuple[str, dict[str, Any]]
    image_size: int
    family_image_size: int
    fc_units: int
    recipe: str
    multi_recipe: str
    train: dict[str, Any]
    bench_batch: int
    bench_rounds: int
    experiment_train: dict[str, dict[str, Any]] = field(default_factory=dict)


SCALES: dict[str, Scale] = {
    scale.name: scale
    for scale in (
        Scale(
            name="tiny",
            description="2-core CPU, about 30 minutes per experiment (3 seeds): width 0.25, "
            "72 px (139 px with Inception)",
            xception=("xception_tiny", {"bn_momentum": 0.1}),
            inception=("inception_v3_paper", {"width_multiplier": 0.25, "bn_momentum": 0.1}),
            image_size=72,
            family_image_size=139,
            fc_units=512,
            recipe="quick",
            multi_recipe="quick",
            train=dict(epochs=6, builtin_train_per_class=500, builtin_val_per_class=100),
            bench_batch=8,
            bench_rounds=5,
            # At 139 px an image costs 3.7x as much; regular convolution (spectrum's g = 1)
            # about 3x a depthwise arm.
            experiment_train={
                "families": {"epochs": 3},
                "head": {"epochs": 3},
                "spectrum": {"epochs": 3},
            },
        ),
        Scale(
            name="small",
            description="one GPU, about an hour per experiment: width-0.5 models at 128 px",
            xception=("xception_small", {"bn_momentum": 0.1}),
            inception=("inception_v3_paper", {"width_multiplier": 0.5, "bn_momentum": 0.1}),
            image_size=128,
            family_image_size=160,
            fc_units=1024,
            recipe="quick",
            multi_recipe="quick",
            train=dict(
                epochs=30,
                builtin_train_per_class=1000,
                builtin_val_per_class=200,
                batch_size=128,
                workers=8,
            ),
            bench_batch=32,
            bench_rounds=10,
        ),
        Scale(
            name="full",
            description="the paper's models at 299 px with its recipes (GPUs, or --data)",
            xception=("xception", {}),
            inception=("inception_v3_paper", {}),
            image_size=299,
            family_image_size=299,
            fc_units=4096,
            recipe="paper-imagenet",
            multi_recipe="paper-jft",
            train=dict(
                epochs=40,
                builtin_train_per_class=1300,
                builtin_val_per_class=100,
                workers=8,
            ),
            bench_batch=32,
            bench_rounds=10,
        ),
    )
}


@dataclass(frozen=True)
class Arm:
    """One training configuration of an experiment (repeated once per seed)."""

    name: str
    label: str
    model: str
    overrides: dict[str, Any] = field(default_factory=dict)
    multi_label: bool = False


@dataclass(frozen=True)
class Claim:
    """The paper says ``better`` beats ``worse`` on the experiment's score."""

    better: str
    worse: str
    statement: str


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    paper: str  # what the paper reports
    claims: tuple[Claim, ...] = ()
    trains: bool = True  # table3 measures, it does not train
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields for every arm
    families: bool = False  # compares Xception with Inception V3: at ``family_image_size``
    recipe: str | None = None  # every arm's recipe, where the claim needs the paper's
    seeds: int = 3  # runs of each arm by default: the fewest that give an effect a spread


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "table3",
            "Table 3: size and speed of Xception vs Inception V3",
            "Inception V3 23,626,728 parameters, 31 steps/s; Xception 22,855,952, 28 steps/s "
            "(ratio 0.90; 60 K80 GPUs, TensorFlow)",
            trains=False,
        ),
        Experiment(
            "residual",
            "Fig. 9: Xception with and without residual connections (8 middle blocks)",
            "without residual connections Xception converges more slowly and ends lower",
            (Claim("residual", "no-residual", "residual connections help"),),
        ),
        Experiment(
            "activation",
            "Fig. 10: activation between the depthwise and pointwise convolutions",
            "no activation converges fastest and ends best; ELU is worse, ReLU worst",
            (
                Claim("none", "elu", "no activation beats ELU"),
                Claim("elu", "relu", "ELU beats ReLU"),
                Claim("none", "relu", "no activation beats ReLU"),
            ),
            # Fig. 10 was measured with the ImageNet recipe: SGD with momentum, staircase
            # decay, Polyak averaging. The claim is about that optimisation, so every scale
            # uses it (the scale's epochs still apply).
            recipe="paper-imagenet",
        ),
        Experiment(
            "spectrum",
            "Future directions: spatial groups from regular (1) to depthwise (C) convolution",
            "left as future work: 'intermediate points on the spectrum ... may have "
            "advantages'; the paper only compares the depthwise end with Inception V3",
            # Adam at a depthwise network's rate does not train the regular end (optim.py).
            train={"spatial_lr_fan_in": True},
        ),
        Experiment(
            "head",
            "Table 2: FC layers on the multi-label (JFT-like) task, MAP@100",
            "JFT MAP@100: Inception V3 6.36 (no FC) / 6.50 (FC); Xception 6.70 / 6.78",
            (
                Claim("xception-fc", "xception", "FC layers help Xception"),
                Claim("inception-fc", "inception", "FC layers help Inception V3"),
                Claim("xception", "inception", "Xception beats Inception V3 (no FC)"),
                Claim("xception-fc", "inception-fc", "Xception beats Inception V3 (FC)"),
            ),
            families=True,
        ),
        Experiment(
            "families",
            "Table 1: Xception against Inception V3 at the same parameter count",
            "ImageNet top-1 / top-5: Xception 0.790 / 0.945, Inception V3 0.782 / 0.941, with "
            "22,855,952 and 23,626,728 parameters (Tables 1 and 3)",
            (
                Claim("xception", "inception-paper", "Xception beats Inception V3 (paper's)"),
                Claim("xception", "inception", "Xception beats Inception V3 (modern)"),
            ),
            families=True,
        ),
    )
}

#: Xception's middle flow at the paper's depth: 8 blocks. At every width this matches
#: Inception V3's parameter count as closely as the full models do (within 1% at widths
#: 0.25 and 0.5; 3.3% at full size), which is what makes ``families`` and ``head`` fair
#: comparisons.
PAPER_MIDDLE_BLOCKS = 8

SPECTRUM_GROUPS = (1, 2, 4, 8, None)  # None: depthwise (one group per channel)


def arms(experiment: Experiment, scale: Scale) -> list[Arm]:
    """The arms of ``experiment`` at ``scale`` (none for ``table3``)."""
    model, base = scale.xception
    deep = {**base, "middle_blocks": PAPER_MIDDLE_BLOCKS}  # the paper's middle flow
    if experiment.name == "residual":  # the claim is about depth
        return [
            Arm("residual", "with residual connections", model, deep),
            Arm("no-residual", "without", model, {**deep, "residual": False}),
        ]
    if experiment.name == "activation":
        return [
            Arm(act, label, model, {**base, "mid_activation": act})
            for act, label in (("none", "no activation"), ("elu", "ELU"), ("relu", "ReLU"))
        ]
    if experiment.name == "spectrum":
        return [
            Arm(
                f"groups-{groups or 'C'}",
                "depthwise (g = C)" if groups is None else f"g = {groups}",
                model,
                {**base, "spatial_groups": groups},
            )
            for groups in SPECTRUM_GROUPS
        ]
    if experiment.name == "families":
        inception, inception_base = scale.inception
        return [
            Arm("xception", "Xception", model, deep),
            Arm("inception-paper", "Inception V3 (paper's topology)", inception, inception_base),
            Arm("inception", "Inception V3 (modern topology)", "inception_v3", inception_base),
        ]
    if experiment.name == "head":
        fc = {"fc_layers": (scale.fc_units, scale.fc_units)}
        inception, inception_base = scale.inception
        return [
            Arm("xception", "Xception", model, deep, multi_label=True),
            Arm("xception-fc", "Xception + FC", model, {**deep, **fc}, multi_label=True),
            Arm("inception", "Inception V3", inception, inception_base, multi_label=True),
            Arm(
                "inception-fc",
                "Inception V3 + FC",
                inception,
                {**inception_base, **fc},
                multi_label=True,
            ),
        ]
    return []


TABLE3_MODELS = ("xception", "inception_v3_paper", "inception_v3")
PAPER_PARAMETERS = {"xception": 22_855_952, "inception_v3_paper": 23_626_728}
PAPER_STEPS_PER_SECOND = {"xception": 28.0, "inception_v3_paper": 31.0}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; experiments: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; scales: {', '.join(SCALES)}")
    return SCALES[name]
