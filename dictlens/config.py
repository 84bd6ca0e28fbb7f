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
          default_factory: Any = dataclasses.MISSING, cli: bool = True, positional: bool = False,
          choices: tuple[Any, ...] | None = None, metavar: str | None = None, short: str | None = None,
          skip: tuple[str, ...] = (), overrides: type | None = None) -> Any:
    """A dataclass field with help text and how it appears on the command line.

    ``positional``: an argument without a flag (a list takes one or more); ``short``: a
    one-letter alias such as ``-n``; a field whose type is a config dataclass contributes
    that dataclass's flags (less ``skip``); ``overrides`` makes a ``dict`` field collect
    only the flags of that dataclass that were given (for presets that flags refine).
    """
    meta = {"help": help, "flag": flag, "cli": cli, "positional": positional, "choices": choices,
            "metavar": metavar, "short": short, "skip": skip, "overrides": overrides}
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
        if dataclasses.is_dataclass(base) and isinstance(value, dict):
            value = from_dict(base, value, source=f"{source}: {key}")  # type: ignore[arg-type]
        elif is_list and isinstance(value, list):
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


def _nested(tp: Any) -> type | None:
    """The config dataclass a field holds, if it holds one."""
    base, is_list = _base_type(tp)
    return base if not is_list and isinstance(base, type) and dataclasses.is_dataclass(base) else None


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                  unset: bool = False) -> None:
    """Add one argument per field of ``cls``: ``--flag`` (lists repeat it; bools get --x/--no-x),
    or a positional argument; a nested config dataclass adds its own. ``unset``: defaults are
    None, so that :func:`from_namespace` sees only what was given."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or not meta.get("cli", True):
            continue
        sub = _nested(hints[f.name])
        if sub is not None or meta.get("overrides"):
            group = parser.add_argument_group(meta.get("help")) if isinstance(parser, argparse.ArgumentParser) \
                else parser
            add_arguments(group, sub or meta["overrides"], skip=meta.get("skip", ()),  # type: ignore[arg-type]
                          unset=unset or sub is None)
            continue
        base, is_list = _base_type(hints[f.name])
        default = None if f.default is dataclasses.MISSING or unset else f.default
        help_text = meta.get("help", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        extra: dict[str, Any] = {k: meta[k] for k in ("choices", "metavar") if meta.get(k) is not None}
        if meta.get("positional"):
            nargs = ("+" if required else "*") if is_list else (None if required else "?")
            parser.add_argument(f.name, nargs=nargs, type=base, default=default, help=help_text, **extra)
            continue
        flags = [meta.get("flag") or "--" + f.name.replace("_", "-")]
        if meta.get("flag") and "metavar" not in extra and base is not bool:
            extra["metavar"] = flags[0].lstrip("-").replace("-", "_").upper()   # --hook HOOK, not HOOKS
        if meta.get("short"):
            flags.insert(0, meta["short"])
        if base is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif is_list:
            parser.add_argument(*flags, dest=f.name, action="append", type=base,
                                required=required, help=help_text + " (repeatable)", **extra)
        else:
            if default is not None:
                help_text += f" (default: {default})"
            parser.add_argument(*flags, dest=f.name, type=base, default=default,
                                required=required, help=help_text, **extra)


def from_namespace(cls: type[T], ns: argparse.Namespace, *, skip: tuple[str, ...] = ()) -> T:
    """Build ``cls`` from parsed flags, leaving fields the command line did not set at their
    defaults; nested config dataclasses are built from the same flags."""
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        sub, partial = _nested(hints[f.name]), f.metadata.get("overrides")
        if sub is not None:
            values[f.name] = from_namespace(sub, ns, skip=f.metadata.get("skip", ()))
        elif partial is not None:
            values[f.name] = {g.name: getattr(ns, g.name) for g in dataclasses.fields(partial)
                              if g.name not in f.metadata.get("skip", ()) and getattr(ns, g.name, None) is not None}
        elif getattr(ns, f.name, None) is not None:
            values[f.name] = getattr(ns, f.name)
    return from_dict(cls, values, source="command line")
