"""The model zoo; importing a module registers its models."""

from xception.models import xception  # noqa: F401
