"""One validation layer: the rules every setting obeys, and configs turned into validated settings objects.

The settings dataclasses (`SamplingParams`, `AgentBudgets`, `AgentSettings`, `LossConfig`, `OptimizerConfig`,
`LearnerConfig`) check themselves in `__post_init__` with the rule functions below, and raise a `SettingError`
that carries the field's name. Entry points never repeat those checks: they build the dataclasses from a config
section with `build`, which re-raises the error as a `ConfigError` naming the config path
(`config.agent.temperature must be a finite number >= 0 (0 = greedy), got nan`).

    sampling = build(SamplingParams, cfg.agent, "config.agent", fields=("temperature", "top_p"))

This module imports nothing from the JAX side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from memagent_jax.errors import UserError

T = TypeVar("T")


class SettingError(UserError):
    """A setting holds a bad value. `field` names it as the message does (e.g. 'optimizer.learning_rate'; '' when
    the error is not about one field), `name` is its last part (the config name); the message starts with
    `field`."""

    field: str = ""
    reason: str = ""

    @property
    def name(self) -> str:
        return self.field.rpartition(".")[2]

    @classmethod
    def at(cls, field: str, reason: str) -> SettingError:
        error = cls(f"{field} {reason}")
        error.field, error.reason = field, reason
        return error


class ConfigError(UserError):
    """A config (file, flags, JSON) holds a bad value; the message names the config path, file or flag at fault.
    A `UserError` (a ValueError): entry points print it as one line and exit with status 2 (`memagent_jax.errors`)."""


# ----------------------------------------------------------------------------------------------- rules


def is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(
    field: str,
    value,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allowed: str = "",
    none_ok: bool = False,
    error: type[SettingError] = SettingError,
) -> int | None:
    """`value` as an int, or `error` naming `field`: booleans and non-integral numbers are refused."""
    if value is None and none_ok:
        return None
    ok = is_integer(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        if not allowed:
            bounds = [f">= {minimum}" if minimum is not None else "", f"<= {maximum}" if maximum is not None else ""]
            allowed = " and ".join(b for b in bounds if b)
        raise error.at(field, f"must be an integer{' ' + allowed if allowed else ''}, got {value!r}")
    return int(value)


def real(
    field: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allowed: str = "",
    none_ok: bool = False,
    error: type[SettingError] = SettingError,
) -> float | None:
    """`value` as a float in the range, or `error` naming `field`: NaN, infinities and booleans are refused."""
    if value is None and none_ok:
        return None
    ok = is_real(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if not allowed:
            if low is not None and high is not None:
                allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            elif low is not None:
                allowed = f"{'>' if low_open else '>='} {low}"
            elif high is not None:
                allowed = f"{'<' if high_open else '<='} {high}"
        raise error.at(field, f"must be a finite number{' ' + allowed if allowed else ''}, got {value!r}")
    return float(value)


def choice(field: str, value, choices: Iterable, *, error: type[SettingError] = SettingError):
    """`value` if it is one of `choices`, else `error` naming `field` and listing them."""
    choices = tuple(choices)
    if isinstance(value, bool) or value not in choices:
        raise error.at(field, f"must be one of {list(choices)}, got {value!r}")
    return value


def boolean(field: str, value, *, error: type[SettingError] = SettingError) -> bool:
    """`value` if it is True or False (NumPy booleans too), else `error` naming `field`."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise error.at(field, f"must be True or False, got {value!r}")
    return bool(value)


# Shared by SamplingParams and the settings file: the one definition of a valid temperature, top-p and top-k.
def temperature(value, *, field: str = "temperature", error: type[SettingError] = SettingError) -> float:
    return real(field, value, low=0, allowed=">= 0 (0 = greedy)", error=error)


def top_p(value, *, field: str = "top_p", error: type[SettingError] = SettingError) -> float:
    return real(field, value, low=0, high=1, low_open=True, allowed="in (0, 1] (1 = off)", error=error)


def top_k(value, *, field: str = "top_k", error: type[SettingError] = SettingError) -> int:
    return integer(field, value, minimum=0, allowed=">= 0 (0 = off)", error=error)


# ------------------------------------------------------------------------------------- configs -> settings


def section_values(
    section: Mapping[str, Any] | Any, fields: Sequence[str], *, skip_none: bool = False
) -> dict[str, Any]:
    """{field: section[field]} for the `fields` present in `section` (a ConfigDict, dict or argparse Namespace)."""
    get = section.get if hasattr(section, "get") else (lambda name, default=None: getattr(section, name, default))
    out = {}
    for name in fields:
        value = get(name, _MISSING)
        if value is _MISSING or (skip_none and value is None):
            continue
        out[name] = value
    return out


_MISSING = object()


def build(
    cls: Callable[..., T],
    section,
    path: str,
    *,
    fields: Sequence[str] | None = None,
    error: type[ValueError] = ConfigError,
    rename: Mapping[str, str] | None = None,
    **fixed,
) -> T:
    """`cls(**section's fields, **fixed)`, with a `SettingError` re-raised as `error` naming `path.field`.

    fields: which of `section`'s fields to pass (default: every dataclass field of `cls` present in `section`).
    rename: dataclass field -> config name, where the two differ (for the error's path).
    """
    if fields is None:
        fields = [f.name for f in dataclasses.fields(cls)]
    values = section_values(section, fields)
    with named(path, error=error, rename=rename):
        return cls(**values, **fixed)


@contextlib.contextmanager
def named(
    path: str, *, error: type[ValueError] = ConfigError, rename: Mapping[str, str] | None = None, separator: str = "."
):
    """Re-raises a `SettingError` raised inside as `error` whose message names `path` + the field."""
    try:
        yield
    except SettingError as e:
        field = (rename or {}).get(e.name, e.name)
        if field:
            raise error(f"{path}{separator}{field} {e.reason}") from None
        raise error(f"{path}: {e}") from None
