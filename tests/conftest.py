"""Shared test setup: Keras (a test-only reference) runs on its torch backend."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
