"""timm and Cadene (pretrainedmodels) weights: name mappings and conversion.

Rules, not lookups of the other library: importing weights must not need it installed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from xception.interop import save_converted
from xception.registry import create_model
from xception.weights import check_state_dict, load_state_dict, load_torch_file

# timm's legacy_xception (Cadene's port): numbered blocks shifted by one, a flat
# ``rep`` Sequential of [ReLU], SeparableConv, BN triples, and stem/exit layers at the top.
_TIMM_XCEPTION_RULES: tuple[tuple[str, str], ...] = (
    (r"^entry_flow\.block1\.conv(\d)\.conv\.", r"conv\1."),
    (r"^entry_flow\.block1\.conv(\d)\.bn\.", r"bn\1."),
    (r"^exit_flow\.block\d+\.sepconv(\d)\.conv\.spatial\.", "conv{+2}.conv1."),
    (r"^exit_flow\.block\d+\.sepconv(\d)\.conv\.pointwise\.", "conv{+2}.pointwise."),
    (r"^exit_flow\.block\d+\.sepconv(\d)\.bn\.", "bn{+2}."),
    (r"^head\.classifier\.", "fc."),
)


def _timm_block_key(key: str, relu_first_blocks: set[int]) -> str | None:
    match = re.match(r"^\w+_flow\.block(\d+)\.(.*)$", key)
    if not match:
        return None
    block, rest = int(match[1]), match[2]
    prefix = f"block{block - 1}."
    rest = rest.replace("shortcut.conv.", "skip.").replace("shortcut.bn.", "skipbn.")
    conv = re.match(r"^convs\.sepconv(\d)\.(conv\.spatial|conv\.pointwise|bn)\.(.*)$", rest)
    if conv:
        index = 3 * (int(conv[1]) - 1) + (block in relu_first_blocks)
        part = {
            "conv.spatial": f"{index}.conv1",
            "conv.pointwise": f"{index}.pointwise",
            "bn": f"{index + 1}",
        }[conv[2]]
        rest = f"rep.{part}.{conv[3]}"
    return prefix + rest


def timm_xception_key(key: str) -> str:
    """Our Xception state-dict key -> timm ``legacy_xception``'s (paper topology)."""
    for pattern, replacement in _TIMM_XCEPTION_RULES:
        match = re.match(pattern, key)
        if match:
            if "{+2}" in replacement:
                replacement = replacement.replace("{+2}", str(int(match[1]) + 2))
                return replacement + key[match.end() :]
            return re.sub(pattern, replacement, key)
    # Only the first entry-flow module (block2) starts without a ReLU.
    mapped = _timm_block_key(key, relu_first_blocks=set(range(3, 100)))
    if mapped is None:
        raise KeyError(f"no timm legacy_xception name for {key!r}")
    return mapped


# timm's (and Cadene's) ports differ from the Keras original in two ways our config
# expresses: PyTorch-style symmetric padding and BatchNorm epsilon 1e-5.
TIMM_CONFIGS: dict[str, dict[str, object]] = {
    "xception": {"padding": "symmetric", "bn_eps": 1e-5},
    "inception_v3": {},  # torchvision layout, eps 1e-3, count_include_pad=True: our defaults
}
CLASSIFIER_NAMES = ("fc.", "last_linear.")  # timm, Cadene's pretrainedmodels


def read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a ``.pth``/``.pt`` file, never running pickled code."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_state_dict(path)
    state = load_torch_file(path, "PyTorch state dict")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _their_key(model_name: str, ours: str) -> str:
    if model_name == "xception":
        return timm_xception_key(ours)
    return "fc." + ours.removeprefix("head.classifier.") if ours.startswith("head.") else ours


def map_timm_state(
    theirs: dict[str, torch.Tensor], model_name: str, model: nn.Module, source: str
) -> dict[str, torch.Tensor]:
    """Our state dict for ``model`` from timm/Cadene names, checked tensor by tensor."""
    theirs = {
        "fc." + k.removeprefix("last_linear.") if k.startswith("last_linear.") else k: v
        for k, v in theirs.items()
    }
    state = {}
    for ours in model.state_dict():
        key = _their_key(model_name, ours)
        if key in theirs:
            state[ours] = theirs.pop(key)
    state.update(theirs)  # leftovers are reported as unexpected by the check
    check_state_dict(model, state, source)
    return state


def convert_timm(path: Path, model_name: str, out: Path, include_top: bool = True) -> None:
    """timm ``legacy_xception`` / ``inception_v3`` (or Cadene's) weights -> our file."""
    if model_name not in TIMM_CONFIGS:
        raise ValueError(f"timm conversion supports {', '.join(TIMM_CONFIGS)}, not {model_name!r}")
    state = read_torch_state(path)
    head = {k: v for k, v in state.items() if k.startswith(CLASSIFIER_NAMES)}
    if include_top and not head:
        raise ValueError(
            f"{path} has no classifier (fc / last_linear); convert it with "
            "--notop for the backbone alone"
        )
    if not include_top:
        state = {k: v for k, v in state.items() if k not in head}
    classes = next((v.shape[0] for k, v in head.items() if k.endswith("weight")), 0)
    model = create_model(
        model_name, num_classes=classes if include_top else 0, **TIMM_CONFIGS[model_name]
    )
    model.load_state_dict(map_timm_state(state, model_name, model, str(path)))
    save_converted(model, model_name, out, "timm", path)
