"""Xception (Chollet, CVPR 2017) in PyTorch, with Inception V3 and MobileNet V1."""

from xception import models as _models  # noqa: F401  (registers the models)
from xception.layers import SeparableConv2d
from xception.registry import create_model, list_models, model_config

__all__ = ["SeparableConv2d", "create_model", "list_models", "model_config"]
__version__ = "0.1.0"
