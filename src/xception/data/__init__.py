"""Data sets for training and evaluation, the built-in synthetic shapes set included."""
