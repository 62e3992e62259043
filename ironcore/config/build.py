"""Raw nested dict -> typed, frozen dataclasses, checking names, types, choices and ranges on the way.

Every error names the dotted field (`trainer.micro_batch_size`) and what was expected, so a user
never sees a traceback for a typo.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import types
import typing
from difflib import get_close_matches
from typing import Any, Literal

from ironcore.errors import ConfigError

_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a schema dataclass (the schema uses postponed annotations)."""
    return typing.get_type_hints(cls)


def build(cls: type, raw: Any, where: str) -> Any:
    """Instantiate schema dataclass `cls` from a mapping, validating every given field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {describe(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
    hints = field_types(cls)
    values = {}
    for name, value in raw.items():
        if name not in fields:
            close = get_close_matches(str(name), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where or 'config'}: unknown {'field' if where else 'group'} {name!r}{hint}")
        path = f"{where}.{name}" if where else str(name)
        values[name] = check_range(coerce(hints[name], value, path), fields[name].metadata, path)
    return cls(**values)


def coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against type `tp`, converting only where YAML is ambiguous (`1e-5` is a str in YAML 1.1)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return coerce(inner[0], value, where)
        return coerce_alternatives(inner, value, where)
    if origin is Literal:
        if value in args:
            return value
        close = get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}{hint}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {describe(value)}")
        return tuple(coerce(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {describe(value)}")
    raise TypeError(f"schema type {tp!r} of {where} is not handled")


def coerce_alternatives(alternatives: list[Any], value: Any, where: str) -> Any:
    """A union of several types (`tuple[str, ...] | str`): the first alternative whose shape the value has, so a
    YAML list is the list and a scalar the scalar; the error names every alternative."""
    for tp in alternatives:
        is_list = typing.get_origin(tp) is tuple
        if (is_list and isinstance(value, (list, tuple))) or (not is_list and not isinstance(value, (list, tuple, dict))):
            return coerce(tp, value, where)
    expected = " or ".join("a list" if typing.get_origin(tp) is tuple else f"a {tp.__name__}" for tp in alternatives)
    raise ConfigError(f"{where}: expected {expected}, got {describe(value)}")


def check_range(value: Any, meta: typing.Mapping[str, Any], where: str) -> Any:
    """Apply the field's ge/gt/le/lt bounds (element-wise for lists)."""
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            check_range(item, meta, f"{where}[{i}]")
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    for key, (symbol, holds) in _BOUNDS.items():
        bound = meta.get(key)
        if bound is not None and not holds(value, bound):
            raise ConfigError(f"{where}: {value!r} is out of range; expected {symbol} {bound}")
    return value


def describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"
