"""Xception (Chollet, CVPR 2017) in PyTorch, with Inception V3 and MobileNet V1.

The Python API mirrors the ``xception`` command: ``train``, ``evaluate``, ``predict``,
``export``, ``convert``, ``shard`` (WebDataset shards of a data set),
``preprocessing(weights)`` for a file's input transform and ``gradcam(model, image)``;
``create_model`` builds any registered model, from a weights file too.
"""

__version__ = "0.1.0"

from xception import models as _models  # noqa: F401  (registers the models)
from xception.api import (
    Predictor,
    convert,
    evaluate,
    export,
    gradcam,
    predict,
    preprocessing,
    shard,
    train,
)
from xception.layers import SeparableConv2d
from xception.registry import create_model, list_models, load_model, model_config

__all__ = [
    "Predictor",
    "SeparableConv2d",
    "__version__",
    "convert",
    "create_model",
    "evaluate",
    "export",
    "gradcam",
    "list_models",
    "load_model",
    "model_config",
    "predict",
    "preprocessing",
    "shard",
    "train",
]
