"""Is the FC head's initialisation why FC layers hurt Xception in ``reproduce head``?

Writes the `head` experiment's Xception + FC model (tiny scale) with its hidden FC layers
re-initialised as Keras, the paper's framework, does it (Glorot uniform, zero bias), one
file per seed, for ``xception train --init-weights`` with the arm's own configuration:

    python benchmarks/head_fc_init_probe.py reproductions/head-tiny-fmnist probe 0 1
    xception train --config reproductions/head-tiny-fmnist/runs/xception-fc-seed0/config.yaml \
        --init-weights probe/glorot-0.safetensors --set seed=0 --out probe/run-0

The files carry the experiment's classes, so every layer loads, the head included.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from xception.registry import create_model
from xception.reproduction.experiments import arms, get_experiment, get_scale
from xception.weights import read_metadata, save_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", type=Path, help="a finished `reproduce head` folder")
    parser.add_argument("out", type=Path)
    parser.add_argument("seeds", type=int, nargs="+")
    args = parser.parse_args()
    arm = {a.name: a for a in arms(get_experiment("head"), get_scale("tiny"))}["xception-fc"]
    classes = read_metadata(args.experiment / "runs/xception-fc-seed0/best.safetensors")["classes"]
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = create_model(arm.model, num_classes=len(classes), **arm.overrides)
        for layer in model.head.fc:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        path = args.out / f"glorot-{seed}.safetensors"
        save_weights(model, path, arm.model, {"classes": classes})
        print(path)


if __name__ == "__main__":
    main()
