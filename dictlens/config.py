"""One dataclass per concept drives the Python API, the CLI flags and the saved JSON.

Fields carry their help text in ``metadata["help"]``; :func:`add_arguments` turns a
dataclass into argparse flags and :func:`from_dict` rebuilds one from JSON, rejecting
unknown keys with the closest valid name so that a typo never passes silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar

from dictlens.errors import ConfigError

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,
          default_factory: Any = dataclasses.MISSING, cli: bool = True) -> Any:
    """A dataclass field with help text (and optionally a custom CLI flag name)."""
    meta = {"help": help, "flag": flag, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """The scalar type of a field annotation and whether it is a list."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return typing.get_args(tp)[0], True
    return tp, False


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check(ok: bool, name: str, expected: str, found: object) -> None:
    """Raise ConfigError('name: expected X, found Y') unless ``ok``."""
    if not ok:
        raise ConfigError(f"{name}: expected {expected}, found {found!r}")


def suggest(name: str, valid: list[str]) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "config") -> T:
    """Build ``cls`` from a mapping; unknown keys are an error naming the closest field."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            raise ConfigError(f"{source}: unknown field {key!r}{suggest(key, names)}")
    hints = _hints(cls)
    values = {}
    for key, value in data.items():
        base, is_list = _base_type(hints[key])
        if is_list and isinstance(value, list):
            value = list(value)
        elif base is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        values[key] = value
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(obj)


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of ``cls`` (lists repeat the flag; bools get --x/--no-x)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        base, is_list = _base_type(hints[f.name])
        default = None if f.default is dataclasses.MISSING else f.default
        help_text = f.metadata.get("help", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif is_list:
            parser.add_argument(flag, dest=f.name, action="append", type=base,
                                required=required, help=help_text + " (repeatable)")
        else:
            if default is not None:
                help_text += f" (default: {default})"
            parser.add_argument(flag, dest=f.name, type=base, default=default,
                                required=required, help=help_text)


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    """Build ``cls`` from parsed flags, leaving fields the CLI did not set at their defaults."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if hasattr(ns, f.name) and getattr(ns, f.name) is not None:
            values[f.name] = getattr(ns, f.name)
    return from_dict(cls, values, source="command line")
