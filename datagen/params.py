"""Strict construction of typed config dataclasses from plain YAML data.

A typo or a wrong type in a config is an error that names the key (with the
closest valid name), raised before any work starts, never a silently ignored key
or a crash deep inside a worker.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

from common.overrides import did_you_mean

T = TypeVar("T")


class ParamError(ValueError):
    """A config value that does not fit its schema; the message starts with the key."""


def unknown_message(key: str, valid: typing.Iterable[str]) -> str:
    valid = list(valid)
    return f"unknown key {key!r}{did_you_mean(key, valid)} (valid: {', '.join(valid) or 'none'})"


def unknown_keys(raw: Mapping[str, Any], valid: typing.Iterable[str], where: str) -> None:
    valid = list(valid)
    for key in raw:
        if key not in valid:
            raise ParamError(f"{_join(where, str(key))}: {unknown_message(str(key), valid)}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple and typing.get_args(tp) and typing.get_args(tp)[-1] is not Ellipsis:
        return f"a list of {len(typing.get_args(tp))} values"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (tuple, list):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` (and lists made tuples where the
    annotation says tuple); a :class:`ParamError` naming ``where`` otherwise."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return convert(value, arg, where)
            except ParamError:
                continue
    elif tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, Mapping):
            return build(tp, value, where)
    elif origin in (tuple, list):
        args = typing.get_args(tp)
        fixed = origin is tuple and bool(args) and args[-1] is not Ellipsis
        if isinstance(value, (list, tuple)) and (not fixed or len(value) == len(args)):
            types_ = args if fixed else [args[0] if args else Any] * len(value)
            items = [
                convert(v, t, f"{where}[{i}]")
                for i, (v, t) in enumerate(zip(value, types_, strict=True))
            ]
            return tuple(items) if origin is tuple else items
    elif origin is dict or tp is dict:
        if isinstance(value, Mapping):
            return dict(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ParamError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def build(cls: type[T], raw: Mapping[str, Any] | None, where: str = "") -> T:
    """An instance of the dataclass ``cls`` from ``raw``: unknown keys, wrong types and
    missing required values are errors naming the key; absent keys take defaults."""
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise ParamError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown_keys(raw, fields, where)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name in raw:
            values[name] = convert(raw[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamError(f"{key}: required")
    try:
        return cls(**values)
    except (ParamError, ValueError, TypeError) as exc:  # a __post_init__ range check
        raise ParamError(f"{where or cls.__name__}: {exc}") from None


def as_dict(instance: Any) -> dict[str, Any]:
    """Plain data of a params instance (tuples as lists), for digests and logs."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {f.name: plain(getattr(instance, f.name)) for f in dataclasses.fields(instance)}
