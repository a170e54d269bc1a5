"""Keras weights (``keras.applications`` Xception, InceptionV3, MobileNet) into our models.

Files read (h5py only: Keras itself is not needed):

- legacy HDF5, as ``keras.applications`` distributes (``xception_weights_tf_dim_ordering_
  tf_kernels[_notop].h5`` ...) and Keras 2 ``save_weights("x.h5")`` writes: root attribute
  ``layer_names`` (or chunks ``layer_names0``, ``layer_names1`` ...), one group per layer
  with attribute ``weight_names`` (``block1_conv1/kernel:0``; Keras 3's legacy writer drops
  the ``:0``) naming its datasets. A legacy full-model file (``model.save("x.h5")``) keeps
  this under ``model_weights`` and its ``model_config`` gives each BatchNorm's epsilon, which
  is then checked; the other files carry no config and are taken to use Keras' default 1e-3.
- Keras 3 ``.weights.h5``: ``layers/<class>[_<n>]/vars/0..k``, keyed by the layer's class
  and rank, with the layer's name in the ``vars`` group's ``name`` attribute (Keras >= 3.6;
  older files lack it and are refused). Variables are unnamed, so roles follow from the
  class and count; a 3-variable BatchNorm is read as ``scale=False`` (InceptionV3's, the
  only such layer in ``keras.applications``).

Layers pair by name where Keras names them. Where it does not (Xception's four shortcut
Conv2D/BN pairs, every conv2d_bn of InceptionV3), the auto names ``conv2d[_N]`` /
``batch_normalization[_N]`` number layers in creation order, offset by whatever the saving
session built before; so they pair, per class, in suffix order with our modules listed in
Keras' creation order. The order layers appear in a file is no guide: ``model.layers`` is
sorted by graph depth, which interleaves an Inception module's towers.

Models (``ARCHITECTURES``): ``xception``, whose names are Keras' (``block2_sepconv1`` is
``entry_flow.block2.convs.sepconv1.conv``), TF padding and BN epsilon 1e-3 by default;
``inception_v3`` (Keras 2+ topology; Keras 1.x's ``inception_v3_paper`` is refused), built
with ``avg_pool_count_include_pad=False`` because TF SAME average pools leave the padding
out of the mean, which the converted file's config records; ``mobilenet_v1[_075|_050|_025]``
through ``keras_layer_order()``, at the model name's width: a file of another ``alpha``
fails naming ``conv1`` and both shapes. ``include_top=False`` (``_notop``) files load into
``num_classes=0`` models; a classifier missing or left over fails, naming it.

Layouts: Conv2D kernel HWIO -> OIHW; depthwise kernel (k, k, C, m) -> (C*m, 1, k, k);
Dense (in, out) and MobileNet's 1x1 ``conv_preds`` -> Linear (out, in); BatchNorm gamma,
beta, moving mean, moving variance -> weight, bias, running_mean, running_var, with ones /
zeros where Keras has ``scale=False`` / ``center=False``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xception.interop import save_converted
from xception.layers import SeparableConv2d
from xception.models.inception_v3 import InceptionV3
from xception.models.mobilenet_v1 import MobileNetV1, keras_layer_order
from xception.models.xception import Xception
from xception.registry import create_model, get_entry
from xception.weights import check_state_dict

KERAS_BN_EPS = 1e-3
CLASSIFIER = "head.classifier"


@dataclass(frozen=True)
class KerasLayer:
    """One weighted Keras layer: its arrays in Keras' order and their roles (``kernel``,
    ``gamma`` ...), from the file's weight names or, in ``.weights.h5``, from the class."""

    name: str
    roles: tuple[str, ...]
    arrays: tuple[np.ndarray, ...]

    def describe(self) -> str:
        shapes = ", ".join(f"{r} {a.shape}" for r, a in zip(self.roles, self.arrays, strict=True))
        return f"Keras layer {self.name!r} ({shapes})"


@dataclass(frozen=True)
class KerasFile:
    layers: dict[str, KerasLayer]  # weighted layers by name, in file order
    epsilons: dict[str, float]  # BatchNorm epsilon by layer name, when the file has a config


# ---------------------------------------------------------------------------- reading


def _strings(values: Any) -> list[str]:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _attr_list(group: Any, name: str) -> list[str]:
    """A list attribute, reassembled from the ``name0``, ``name1`` ... chunks Keras writes
    when it exceeds HDF5's 64 KiB header limit."""
    if name in group.attrs:
        return _strings(group.attrs[name])
    values: list[str] = []
    chunk = 0
    while f"{name}{chunk}" in group.attrs:
        values += _strings(group.attrs[f"{name}{chunk}"])
        chunk += 1
    return values


def _role(weight_name: str) -> str:
    """``block1_conv1/kernel:0`` -> ``kernel``."""
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _legacy_layers(root: Any, layer_names: list[str]) -> list[KerasLayer]:
    layers = []
    for name in layer_names:
        group = root[name]
        weight_names = _attr_list(group, "weight_names")
        if weight_names:
            arrays = tuple(np.asarray(group[w][()]) for w in weight_names)
            layers.append(KerasLayer(name, tuple(map(_role, weight_names)), arrays))
    return layers


_V3_ROLES: dict[str, tuple[str, ...]] = {
    "conv2d": ("kernel", "bias"),
    "depthwise_conv2d": ("depthwise_kernel", "bias"),
    "separable_conv2d": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "dense": ("kernel", "bias"),
    "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
}


def _v3_roles(key: str, count: int) -> tuple[str, ...]:
    """Roles of a ``.weights.h5`` layer's variables, from its class (the key) and count."""
    roles = _V3_ROLES.get(re.sub(r"_\d+$", "", key), ())
    if roles[:1] == ("gamma",) and count == 3:
        return roles[1:]  # scale=False; center=False would look the same and is unused
    return roles[:count] if count <= len(roles) else tuple(map(str, range(count)))


def _v3_layers(group: Any) -> tuple[list[KerasLayer], list[str]]:
    """(named weighted layers, keys of weighted layers that carry no name)."""
    layers, unnamed = [], []
    for key, entry in group.items():
        variables = entry.get("vars")
        if variables is None or not len(variables):
            continue
        if "name" not in variables.attrs:
            unnamed.append(key)
            continue
        arrays = tuple(np.asarray(variables[str(i)][()]) for i in range(len(variables)))
        (name,) = _strings([variables.attrs["name"]])
        layers.append(KerasLayer(name, _v3_roles(key, len(arrays)), arrays))
    return layers, unnamed


def _epsilons(model_config: Any) -> dict[str, float]:
    """BatchNorm epsilons from a full-model file's JSON config (a Functional model's)."""
    config = json.loads(_strings([model_config])[0]).get("config", {})
    layers = config.get("layers", []) if isinstance(config, dict) else config
    return {
        layer["config"]["name"]: float(layer["config"]["epsilon"])
        for layer in layers
        if layer.get("class_name") == "BatchNormalization"
    }


def read_keras_file(path: str | Path) -> KerasFile:
    """The weighted layers of a Keras HDF5 file (legacy ``.h5`` or Keras 3 ``.weights.h5``)."""
    try:
        import h5py
    except ImportError as error:
        raise ImportError("Keras files need h5py: pip install 'xception[keras]'") from error

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Keras weights file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            root = f.get("model_weights", f)
            layer_names = _attr_list(root, "layer_names")
            layers, unnamed = None, []
            if layer_names:
                layers = _legacy_layers(root, layer_names)
            elif "layers" in root:
                layers, unnamed = _v3_layers(root["layers"])
            config = f.attrs.get("model_config")
            epsilons = _epsilons(config) if config is not None else {}
    except (OSError, KeyError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path} is not a readable Keras HDF5 file ({reason})") from None
    if layers is None:
        raise ValueError(
            f"{path} is an HDF5 file but not Keras weights: it has neither the legacy "
            "'layer_names' attribute nor Keras 3's 'layers' group"
        )
    if unnamed:
        raise ValueError(
            f"{path} was written by Keras < 3.6, whose .weights.h5 files do not store layer "
            f"names (first unnamed: layers/{unnamed[0]}); re-save it with Keras >= 3.6"
        )
    return KerasFile({layer.name: layer for layer in layers}, epsilons)


# ------------------------------------------------------------------------- conversion


def _tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _hwio(kernel: np.ndarray) -> Tensor:
    return _tensor(kernel.transpose(3, 2, 0, 1))


def _depthwise(kernel: np.ndarray) -> Tensor:
    """(k, k, C, m) -> (C*m, 1, k, k): output channel c*m + j, as both frameworks order it."""
    kh, kw, channels, multiplier = kernel.shape
    return _tensor(kernel.transpose(2, 3, 0, 1).reshape(channels * multiplier, 1, kh, kw))


def _bias(weights: dict[str, np.ndarray], key: str = "bias") -> dict[str, Tensor]:
    return {key: _tensor(weights["bias"])} if "bias" in weights else {}


def _batch_norm(w: dict[str, np.ndarray], module: nn.Module) -> dict[str, Tensor]:
    mean = w["moving_mean"]
    return {
        "weight": _tensor(w.get("gamma", np.ones_like(mean))),
        "bias": _tensor(w.get("beta", np.zeros_like(mean))),
        "running_mean": _tensor(mean),
        "running_var": _tensor(w["moving_variance"]),
        "num_batches_tracked": torch.tensor(0),
    }


def _separable(w: dict[str, np.ndarray], module: nn.Module) -> dict[str, Tensor]:
    return {
        "spatial.weight": _depthwise(w["depthwise_kernel"]),
        "pointwise.weight": _hwio(w["pointwise_kernel"]),
        **_bias(w, "pointwise.bias"),
    }


def _conv(w: dict[str, np.ndarray], module: nn.Module) -> dict[str, Tensor]:
    """Conv2D or DepthwiseConv2D (MobileNet's ``conv_dw_N``). Keras 3's legacy writer names
    both kernels ``kernel``; the depthwise one is (k, k, C, m), with the input channels
    where a (grouped) Conv2D kernel has C / groups."""
    kernel = w["kernel"] if "kernel" in w else w["depthwise_kernel"]
    depthwise = module.groups > 1 and kernel.shape[2] == module.in_channels
    return {"weight": _depthwise(kernel) if depthwise else _hwio(kernel), **_bias(w)}


def _linear(w: dict[str, np.ndarray], module: nn.Module) -> dict[str, Tensor]:
    kernel = w["kernel"]  # Dense (in, out) or a 1x1 Conv2D (1, 1, in, out)
    return {"weight": _tensor(kernel.reshape(-1, kernel.shape[-1]).T), **_bias(w)}


# Our module types that each hold one Keras layer, and how its weights become ours.
Converter = Callable[[dict[str, np.ndarray], nn.Module], dict[str, Tensor]]
CONVERTERS: tuple[tuple[type[nn.Module], Converter], ...] = (
    (nn.BatchNorm2d, _batch_norm),
    (SeparableConv2d, _separable),
    (nn.Conv2d, _conv),
    (nn.Linear, _linear),
)
# Keras' auto-name prefix for the layer types it leaves unnamed in these models.
AUTO_NAMES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.BatchNorm2d, "batch_normalization"),
    (nn.Conv2d, "conv2d"),
)


def _first(table: tuple[tuple[type[nn.Module], Any], ...], module: nn.Module) -> Any:
    return next((value for kind, value in table if isinstance(module, kind)), None)


# ----------------------------------------------------------------------- architectures

# A unit is (Keras layer name, or None where Keras auto-names it; our module path), listed
# in Keras' creation order, the classifier excluded.
Unit = tuple[str | None, str]

_XCEPTION_NAMES: tuple[tuple[str, str | None], ...] = (
    (r"\w+_flow\.block(\d+)\.(conv\d)\.conv", r"block\1_\2"),
    (r"\w+_flow\.block(\d+)\.(conv\d)\.bn", r"block\1_\2_bn"),
    (r"\w+_flow\.block(\d+)\.(?:convs\.)?(sepconv\d)\.conv", r"block\1_\2"),
    (r"\w+_flow\.block(\d+)\.(?:convs\.)?(sepconv\d)\.bn", r"block\1_\2_bn"),
    (r"\w+_flow\.block\d+\.shortcut\.(?:conv|bn)", None),  # Keras leaves these unnamed
)


def _xception_name(path: str) -> str | None:
    for pattern, name in _XCEPTION_NAMES:
        match = re.fullmatch(pattern, path)
        if match:
            return None if name is None else match.expand(name)
    raise ValueError(f"Keras' Xception has no layer for {path} (a non-Keras configuration)")


def _xception_units(model: nn.Module) -> list[Unit]:
    """Every weighted module by our names, which are Keras' (``block2_sepconv1`` is
    ``entry_flow.block2.convs.sepconv1.conv``); module order is Keras' creation order."""
    units: list[Unit] = []
    separable: set[str] = set()
    for path, module in model.named_modules():
        if path == CLASSIFIER or path.rpartition(".")[0] in separable:
            continue
        if isinstance(module, SeparableConv2d):
            separable.add(path)
        if _first(CONVERTERS, module):
            units.append((_xception_name(path), path))
    return units


# Keras' conv2d_bn calls per Inception module, in its creation order (branch by branch,
# each tower top to bottom, the pool projection last; mixed9/10 make 1x3 before 3x1).
# fmt: off
_A = ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
      "branch3x3dbl_3", "branch_pool")
_B = ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")
_C = ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
      "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool")
_D = ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3",
      "branch7x7x3_4")
_E = ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
      "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool")
# fmt: on
# Keras' mixed0 ... mixed10 are Mixed_5b ... Mixed_7c.
INCEPTION_V3_KERAS_ORDER: tuple[str, ...] = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    *(f"Mixed_5{m}.{b}" for m in "bcd" for b in _A),
    *(f"Mixed_6a.{b}" for b in _B),
    *(f"Mixed_6{m}.{b}" for m in "bcde" for b in _C),
    *(f"Mixed_7a.{b}" for b in _D),
    *(f"Mixed_7{m}.{b}" for m in "bc" for b in _E),
)


def _inception_units(model: nn.Module) -> list[Unit]:
    """All 94 conv2d_bn units are auto-named in Keras: conv and BN pair by creation order."""
    if model.config.paper_topology:
        raise ValueError(
            "inception_v3_paper is Keras 1.x's model; only Keras 2+ InceptionV3 files "
            "(the inception_v3 topology) are supported"
        )
    parts = ("conv", "bn")
    return [(None, f"{unit}.{part}") for unit in INCEPTION_V3_KERAS_ORDER for part in parts]


def _mobilenet_units(model: nn.Module) -> list[Unit]:
    return [(name, path) for name, path in keras_layer_order() if path != CLASSIFIER]


@dataclass(frozen=True)
class Architecture:
    """How one of our model classes maps onto its ``keras.applications`` counterpart."""

    model_class: type[nn.Module]
    classifier: str  # Keras' name for the logistic regression layer
    config: dict[str, Any]  # our config fields that make the computation Keras'
    units: Callable[[nn.Module], list[Unit]]


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        Xception,
        "predictions",
        {"padding": "tf", "bn_eps": KERAS_BN_EPS, "mid_activation": "none"},
        _xception_units,
    ),
    Architecture(
        InceptionV3,
        "predictions",
        # Keras' 3x3/1 branch pools are TF SAME: the padding is not counted in the average.
        {"avg_pool_count_include_pad": False, "bn_eps": KERAS_BN_EPS},
        _inception_units,
    ),
    Architecture(
        MobileNetV1,
        "conv_preds",
        {"padding": "tf", "bn_eps": KERAS_BN_EPS, "activation": "relu6"},
        _mobilenet_units,
    ),
)


def architecture(model_class: type[nn.Module]) -> Architecture:
    for arch in ARCHITECTURES:
        if issubclass(model_class, arch.model_class):
            return arch
    names = ", ".join(a.model_class.__name__ for a in ARCHITECTURES)
    raise ValueError(f"no Keras mapping for {model_class.__name__} (supported: {names})")


# ----------------------------------------------------------------------------- matching


def _creation_key(name: str) -> tuple[str, int]:
    """``conv2d_12`` -> ("conv2d", 12), ``conv2d`` -> ("conv2d", 0): Keras' auto names."""
    match = re.fullmatch(r"(.*?)(?:_(\d+))?", name)
    assert match is not None  # the pattern matches every string
    return match[1], int(match[2] or 0)


def _auto_named(file: KerasFile, named: set[str]) -> dict[str, list[KerasLayer]]:
    """The layers no unit names, per auto-name prefix, in creation order."""
    queues: dict[str, list[KerasLayer]] = {}
    for layer in sorted(
        (layer for name, layer in file.layers.items() if name not in named),
        key=lambda layer: _creation_key(layer.name),
    ):
        queues.setdefault(_creation_key(layer.name)[0], []).append(layer)
    return queues


def _take(
    unit: Unit, module: nn.Module, file: KerasFile, queues: dict[str, list[KerasLayer]], source: str
) -> KerasLayer:
    """The Keras layer for ``unit``: by name, or the next auto-named one of its class."""
    name, path = unit
    if name is not None:
        if name not in file.layers:
            notop = path == CLASSIFIER
            hint = ": an include_top=False (notop) file? pass include_top=False" if notop else ""
            raise ValueError(f"{source} lacks Keras layer {name!r} (for {path}){hint}")
        return file.layers[name]
    prefix = _first(AUTO_NAMES, module)
    if not queues.get(prefix):
        raise ValueError(f"{source} has too few auto-named Keras {prefix} layers: none for {path}")
    return queues[prefix].pop(0)


def _convert_unit(
    layer: KerasLayer, path: str, module: nn.Module, expected: dict[str, Tensor], source: str
) -> dict[str, Tensor]:
    """Our tensors for one Keras layer, each checked against the model's shape."""
    try:
        weights = dict(zip(layer.roles, layer.arrays, strict=True))
        converted = _first(CONVERTERS, module)(weights, module)
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"{source}: {layer.describe()} does not fit {path} ({type(module).__name__})"
        ) from error
    state = {f"{path}.{suffix}": tensor for suffix, tensor in converted.items()}
    for key, tensor in state.items():
        want = expected.get(key)
        if want is None or want.shape != tensor.shape:
            expects = "has no such tensor" if want is None else f"expects {tuple(want.shape)}"
            raise ValueError(
                f"{source}: Keras layer {layer.name!r} gives {key} of shape "
                f"{tuple(tensor.shape)}, the model {expects}"
            )
    return state


def _check_epsilon(layer: KerasLayer, module: nn.Module, file: KerasFile, source: str) -> None:
    eps = file.epsilons.get(layer.name)
    if isinstance(module, nn.BatchNorm2d) and eps is not None and not math.isclose(eps, module.eps):
        raise ValueError(
            f"{source}: Keras layer {layer.name!r} uses BatchNorm epsilon {eps:g}, "
            f"the model {module.eps:g}"
        )


def convert_state(
    file: KerasFile, model: nn.Module, include_top: bool, source: str
) -> dict[str, Tensor]:
    """Our state dict from a read Keras file; every layer used once, every tensor checked."""
    arch = architecture(type(model))
    for field, value in arch.config.items():
        if getattr(model.config, field) != value:
            raise ValueError(
                f"Keras' weights need {field}={value!r}; the model has "
                f"{getattr(model.config, field)!r}"
            )
    has_classifier = isinstance(model.get_submodule(CLASSIFIER), nn.Linear)
    if include_top != has_classifier:
        raise ValueError(
            f"include_top={include_top} needs a model with{'' if include_top else 'out'} a "
            f"classifier; this one has num_classes={model.num_classes}"
        )
    units = arch.units(model) + ([(arch.classifier, CLASSIFIER)] if include_top else [])
    queues = _auto_named(file, {name for name, _ in units if name is not None})
    expected = model.state_dict()
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    for unit in units:
        module = model.get_submodule(unit[1])
        layer = _take(unit, module, file, queues, source)
        _check_epsilon(layer, module, file, source)
        state |= _convert_unit(layer, unit[1], module, expected, source)
        used.add(layer.name)
    extra = [layer for name, layer in file.layers.items() if name not in used]
    if extra:
        top = extra[0].name == arch.classifier
        hint = ": a file with a classifier? pass include_top=True" if top else ""
        raise ValueError(
            f"{source} has {len(extra)} Keras layer(s) the model lacks, first "
            f"{extra[0].describe()}{hint}"
        )
    check_state_dict(model, state, source)
    return state


# --------------------------------------------------------------------------- public API


def load_keras_state(path: Path, model: nn.Module, include_top: bool = True) -> dict[str, Tensor]:
    """Our state dict converted from a Keras weights file, checked against ``model``."""
    return convert_state(read_keras_file(path), model, include_top, str(path))


def convert_keras(path: Path, model_name: str, out: Path, include_top: bool = True) -> None:
    """Convert a Keras weights file into our format, config and metadata included.

    The model is built with Keras' numerics (``Architecture.config``) and, with
    ``include_top``, as many classes as the file's classifier has (the model's default
    when the file has none, which then fails naming it).
    """
    path = Path(path)
    arch = architecture(get_entry(model_name).model_class)
    file = read_keras_file(path)
    num_classes: int | None = 0
    if include_top:
        # Without a classifier in the file the default width stands in, and matching then
        # reports whichever comes first: an architecture mismatch or the missing classifier.
        classifier = file.layers.get(arch.classifier)
        num_classes = classifier.arrays[0].shape[-1] if classifier else None
    model = create_model(model_name, num_classes=num_classes, **arch.config)
    model.load_state_dict(convert_state(file, model, include_top, str(path)))
    save_converted(model, model_name, Path(out), "keras", path)
