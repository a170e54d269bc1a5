"""``xception reproduce``: the paper's tables and ablations as resumable experiments."""

from xception.reproduction.experiments import EXPERIMENTS, SCALES
from xception.reproduction.runner import Plan, run_experiment

__all__ = ["EXPERIMENTS", "SCALES", "Plan", "run_experiment"]
