"""Command-line options generated from a config dataclass, so every default and help text lives in the dataclass.

One `--kebab-name` per field. The field's type says how argparse reads it:

| field type | option |
|---|---|
| `bool` | `--name` / `--no-name` (`argparse.BooleanOptionalAction`) |
| `int`, `float`, `str`, `Path` | one value of that type |
| `X \\| None` | one value of type X; the default None means "not given" |
| `Literal["a", "b"]` | `choices=`: argparse refuses anything else |
| `tuple[X, ...]` | one or more values of type X (`nargs="+"`), handed back as a tuple |

Help is `field.metadata["help"]` followed by the default. A field without a default is a required option.
Torch-free: `moeflow --help` builds every subcommand's options from these.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")

_SCALARS: tuple[type, ...] = (int, float, str, Path)


def flag(name: str) -> str:
    """The option that sets field `name`: `max_new_tokens` -> `--max-new-tokens`."""
    return "--" + name.replace("_", "-")


def _unwrap_optional(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        rest = [a for a in get_args(hint) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def _is_tuple(hint: Any) -> bool:
    return get_origin(_unwrap_optional(hint)) is tuple


def _default_text(value: object) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def _argument(cls: type, f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """`add_argument` keywords for one field."""
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
    help_text = f.metadata.get("help", "")
    if not required and default is not None:
        help_text = f"{help_text} (default: {_default_text(default)})".lstrip()
    kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%"), "required": required}  # argparse %-formats help
    if not required:
        kwargs["default"] = default
    kind = _unwrap_optional(hint)
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif get_origin(kind) is Literal:
        values = get_args(kind)
        kwargs["choices"] = values
        kwargs["type"] = type(values[0])
    elif get_origin(kind) is tuple:
        item = get_args(kind)[0]
        if item not in _SCALARS:
            raise TypeError(f"{cls.__name__}.{f.name}: tuple items of type {item!r} have no command-line form")
        kwargs["type"] = item
        kwargs["nargs"] = "+"
    elif kind in _SCALARS:
        kwargs["type"] = kind
    else:
        raise TypeError(f"{cls.__name__}.{f.name}: type {hint!r} has no command-line form")
    return kwargs


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *, only: Collection[str] | None = None
) -> None:
    """One `--kebab-name` option per field of the dataclass `cls` (or per field named in `only`), with its
    default, help and choices."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init and (only is None or f.name in only):
            parser.add_argument(flag(f.name), **_argument(cls, f, hints[f.name]))


def options_from_args(cls: type[T], args: argparse.Namespace, *, only: Collection[str] | None = None) -> T:
    """The dataclass `cls` built from the options `add_options(parser, cls, only=only)` added (lists back to
    tuples; fields outside `only` keep their defaults)."""
    hints = get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init or (only is not None and f.name not in only):
            continue
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if _is_tuple(hints[f.name]) and value is not None else value
    return cls(**values)
