"""The model zoo; importing a module registers its models."""

from xception.models import inception_v3, mobilenet_v1, xception  # noqa: F401
