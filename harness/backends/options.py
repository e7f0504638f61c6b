"""Typed backend options: one generic parser from ``key=value`` strings to a dataclass.

Every backend declares its knobs as a frozen dataclass (field types: str, int, float, bool, Path,
``Literal[...]`` choices, each possibly ``| None``); a target's ``name:key=value`` strings are
parsed into it once, when the target is built, so a typo or a bad number is refused before
anything is computed and every error names the key, the backend, the value and the known keys.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from harness.core.errors import InputError

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A backend with no knobs (anything given is refused)."""


def known_keys(cls: type) -> tuple[str, ...]:
    """The option keys an options dataclass accepts, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def parse_options(cls: type[T], values: Mapping[str, str], where: str) -> T:
    """``cls`` built from string ``values``; InputError names ``where``, the key, the value and
    the known keys (unknown key, bad int/float/bool, a value outside a Literal's choices)."""
    known = known_keys(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"{where}: unknown option(s) {unknown}; "
                         f"known: {', '.join(known) or '(none)'}")
    hints = get_type_hints(cls)
    kwargs = {key: _convert(hints[key], key, str(value), where, known)
              for key, value in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # the dataclass's own cross-field checks
        raise InputError(f"{where}: {e}") from None


def to_strings(options: Any) -> dict[str, str]:
    """The options that differ from their defaults, as the strings a user would write."""
    out = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.init and value != f.default:
            out[f.name] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return out


def _convert(hint: Any, key: str, value: str, where: str, known: tuple[str, ...]) -> Any:
    """One string as ``hint`` (``X | None`` takes X's conversion)."""
    if get_origin(hint) in (Union, types.UnionType):
        if not value.strip():  # ``key=`` leaves an optional knob at its default
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))

    def bad(expected: str) -> InputError:
        return InputError(f"{where}: option {key}={value!r}: expected {expected} "
                          f"(known keys: {', '.join(known)})")

    if get_origin(hint) is Literal:
        choices = tuple(str(c) for c in get_args(hint))
        if value.strip() not in choices:
            raise bad(f"one of {', '.join(choices)}")
        return value.strip()
    if hint is bool:
        v = value.strip().lower()
        if v in _TRUE or v in _FALSE:
            return v in _TRUE
        raise bad("0/1 (or true/false)")
    if hint is int:
        try:
            return int(value.strip())
        except ValueError:
            raise bad("an integer") from None
    if hint is float:
        try:
            return float(value.strip())
        except ValueError:
            raise bad("a number") from None
    if hint is Path:
        return Path(value.strip()).expanduser()
    if hint is str:
        return value.strip()
    raise TypeError(f"{where}: option {key} has an unsupported type {hint!r}")


__all__ = ["NoOptions", "known_keys", "parse_options", "to_strings"]
