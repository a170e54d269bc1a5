"""Grad-CAM (Selvaraju et al., ICCV 2017): where in the image a class's evidence lies.

The heatmap is ``ReLU(sum_k w_k A_k)`` over the channels ``A_k`` of a late feature map,
each weighted by the spatial mean of the class score's gradient with respect to it, then
scaled to [0, 1] and resized to the input. Every model names a default layer
(``cam_layer``): for Xception the last separable unit of the exit flow, after its ReLU
(Keras' own Grad-CAM example uses ``block14_sepconv2_act``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from xception.plots import pyplot


@dataclass(frozen=True)
class ClassActivation:
    heatmap: torch.Tensor  # (H, W) in [0, 1], the input's size
    class_index: int
    score: float  # the class's logit


def target_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    """The layer Grad-CAM weighs: ``layer``, else the model's ``cam_layer``."""
    name = layer or getattr(model, "cam_layer", None)
    if name is None:
        raise ValueError(f"{type(model).__name__} names no Grad-CAM layer; pass one")
    try:
        return name, model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no layer {name!r}") from None


def gradcam(
    model: nn.Module,
    image: torch.Tensor,
    class_index: int | None = None,
    layer: str | None = None,
) -> ClassActivation:
    """Grad-CAM of ``image`` (the model's input: CHW or 1CHW, as ``preprocessing(weights)``
    gives it) for ``class_index`` (default: the predicted class) at ``layer`` (a module
    name, default: the model's ``cam_layer``). The model is run in eval mode; its
    parameters get no gradients."""
    x = image.unsqueeze(0) if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image (C, H, W), got {tuple(image.shape)}")
    name, target = target_layer(model, layer)
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: object, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise ValueError(f"layer {name!r} gives no feature maps to weigh")
        # the rest of the network reads a copy: an in-place op after the layer (a ReLU
        # that overwrites its input) cannot change the maps kept here
        captured["maps"] = output
        return output.clone()

    was_training = model.training
    model.eval()
    handle = target.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))
            if "maps" not in captured:
                raise ValueError(f"layer {name!r} does not run in the model's forward pass")
            chosen = int(logits.argmax(1)) if class_index is None else class_index
            if not 0 <= chosen < logits.shape[1]:
                raise ValueError(f"class {chosen} is not one of the {logits.shape[1]} classes")
            (grads,) = torch.autograd.grad(logits[0, chosen], captured["maps"])
    finally:
        handle.remove()
        model.train(was_training)
    maps = captured["maps"].detach()[0]
    weights = grads[0].mean(dim=(1, 2))
    heatmap = F.relu((weights[:, None, None] * maps).sum(0))
    heatmap = heatmap / heatmap.max().clamp(min=1e-12)
    size = x.shape[-2:]
    heatmap = F.interpolate(heatmap[None, None], size=size, mode="bilinear", align_corners=False)
    return ClassActivation(heatmap[0, 0].clamp(0, 1), chosen, logits[0, chosen].item())


def overlay(image: Image.Image, heatmap: torch.Tensor, alpha: float = 0.45) -> Image.Image:
    """The heatmap in matplotlib's ``jet`` colours over the photo, at least 256 px wide
    so that small inputs stay visible."""
    scale = max(1, -(-256 // image.width))
    size = (image.width * scale, image.height * scale)
    photo = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    heat = Image.fromarray((heatmap.numpy() * 255).astype(np.uint8)).resize(
        size, Image.Resampling.BILINEAR
    )
    colours = pyplot().get_cmap("jet")(np.asarray(heat) / 255.0)[..., :3]
    tint = Image.fromarray((colours * 255).astype(np.uint8))
    return Image.blend(photo, tint, alpha)
