"""Configs are frozen dataclasses whose annotations are their schema.

Values reach a config from Python calls, YAML files, the JSON metadata of weight files and
command-line text. ``normalize`` turns each into the annotated type in one place, so a value
means the same wherever it came from (YAML's ``[64, 64]`` and the command line's ``64,64``
are the tuple ``(64, 64)``; ``"4e-5"`` is a float), then checks every field, naming the
choices of a ``Literal``. Every config calls it first in ``__post_init__``, so an invalid
config cannot be constructed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml

_NONE_WORDS = ("none", "null", "~")
_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True}
_BOOLEANS |= {"false": False, "no": False, "off": False, "0": False}


def check_choice(field: str, value: object, choices: tuple[object, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {', '.join(map(repr, choices))}")


def _options(hint: object) -> tuple[object, ...]:
    """The members of a union (``X | None`` -> ``(X, NoneType)``), or the hint alone."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def choices(hint: object) -> tuple[object, ...] | None:
    """The allowed values of a ``Literal`` annotation (None for other annotations)."""
    for option in _options(hint):
        if typing.get_origin(option) is typing.Literal:
            return typing.get_args(option)
    return None


def _item_hints(hint: object, count: int) -> tuple[object, ...] | None:
    """The annotations of a ``count``-item tuple's items (None if it cannot have that many)."""
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
        return (args[0],) * count
    return args if len(args) == count else None


def _as_tuple(hint: object, items: list[Any] | tuple[Any, ...]) -> Any:
    hints = _item_hints(hint, len(items))
    if hints is None:
        return tuple(items)
    return tuple(coerce(h, item) for h, item in zip(hints, items, strict=True))


def _parse_text(hint: object, text: str) -> Any:
    """Text (from a command line or a YAML string) as a value of ``hint``; unchanged when
    it does not read as one, so that the type check names it."""
    word = text.strip()
    nullable = type(None) in _options(hint) and str not in _options(hint)
    if nullable and word.lower() in _NONE_WORDS:
        return None
    for option in _options(hint):
        literal = choices(option)
        if literal is not None:
            return next((value for value in literal if str(value) == word), text)
        if option is bool and word.lower() in _BOOLEANS:
            return _BOOLEANS[word.lower()]
        if option in (int, float) and word:
            try:
                return option(word)
            except ValueError:
                continue
        if typing.get_origin(option) is tuple:
            inner = word.strip("()[]").strip()
            return _as_tuple(option, [item.strip() for item in inner.split(",") if item.strip()])
        if typing.get_origin(option) is dict:
            try:
                loaded = yaml.safe_load(text)
            except yaml.YAMLError:
                return text
            return loaded if isinstance(loaded, dict) else text
    return text


def coerce(hint: object, value: Any) -> Any:
    """``value`` as the annotated type where that is unambiguous: lists as tuples, text as
    numbers, booleans, None or tuples, paths as text; anything else unchanged."""
    if hint is Any:
        return value
    if isinstance(value, os.PathLike) and str in _options(hint):
        return os.fspath(value)
    if isinstance(value, str) and str not in _options(hint):
        return _parse_text(hint, value)
    if isinstance(value, list | tuple):
        for option in _options(hint):
            if typing.get_origin(option) is tuple:
                return _as_tuple(option, value)
    whole = isinstance(value, float) and value.is_integer()
    if whole and float not in _options(hint):
        literal = choices(hint) or ()
        if int in _options(hint) or int(value) in literal:
            return int(value)  # JSON and YAML may write 8 as 8.0
    return value


def _accepts(hint: object, value: object) -> bool:
    """Whether ``value`` fits the annotation ``hint``."""
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin is typing.Literal:
        return any(
            value == choice and isinstance(value, bool) == isinstance(choice, bool)
            for choice in typing.get_args(hint)
        )
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if origin is tuple:
        hints = _item_hints(hint, len(value)) if isinstance(value, tuple) else None
        return hints is not None and all(map(_accepts, hints, value))
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: object) -> str:
    literal = choices(hint)
    if literal is not None:
        names = ", ".join(map(repr, literal))
        return f"one of {names}" + (" or None" if type(None) in _options(hint) else "")
    text = str(hint).replace("typing.", "")
    return text.removeprefix("<class '").removesuffix("'>")


def normalize(config: object) -> None:
    """Coerce every field of a frozen dataclass to its annotation, then check it; for
    ``__post_init__``. Raises ``ValueError`` naming the field, the value and the type."""
    hints = typing.get_type_hints(type(config))
    name = type(config).__name__
    for field in dataclasses.fields(config):  # type: ignore[arg-type]
        hint = hints[field.name]
        value = coerce(hint, getattr(config, field.name))
        if not _accepts(hint, value):
            raise ValueError(f"{name}.{field.name}={value!r} is not {_describe(hint)}")
        if any(isinstance(v, float) and not math.isfinite(v) for v in _numbers(value)):
            raise ValueError(f"{name}.{field.name}={value!r} must be finite")
        object.__setattr__(config, field.name, value)


def _numbers(value: Any) -> tuple[Any, ...]:
    return value if isinstance(value, tuple) else (value,)


def check_numbers(config: object, allow_zero: tuple[str, ...] = ()) -> None:
    """Reject negative numbers, and zeros outside ``allow_zero``, naming the field."""
    for field in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, field.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if value < 0 or (value == 0 and field.name not in allow_zero):
            raise ValueError(f"{type(config).__name__}.{field.name}={value} must be positive")


def field_names(cls: type) -> list[str]:
    return [field.name for field in dataclasses.fields(cls)]


def check_known(cls: type, values: Mapping[str, Any], what: str) -> None:
    """Fail on the first key that is not a field of ``cls``, listing the fields."""
    known = field_names(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} {unknown[0]!r}; valid: {', '.join(sorted(known))}")


def from_values(cls: type, values: Mapping[str, Any], what: str) -> Any:
    """A config from stored or parsed values (YAML, JSON metadata, flags), unknown keys named."""
    check_known(cls, values, what)
    return cls(**values)


def coerce_values(cls: type, values: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Some fields of ``cls`` (overrides to apply later) as their annotated types."""
    check_known(cls, values, what)
    hints = typing.get_type_hints(cls)
    return {key: coerce(hints[key], value) for key, value in values.items()}
