"""Config values read and checked one by one: typed readers, and the constraints the schema
attaches to its fields (nfnet.app.schema).

A bad override must cost the user one clear line naming the key, the value and what is allowed,
never a traceback from deep inside a training run twenty minutes later. Each constraint says
that line in one place, whether the value reaches it through the checks (a number out of range)
or is refused earlier by the schema's types when Hydra composes the config ('abc' for an
integer): nfnet.app.cli asks the same constraint for the message.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nfnet.errors import ConfigError


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


_ABSENT = object()


def read(cfg: DictConfig, key: str, default: Any = _ABSENT) -> Any:
    """The resolved value at a dotted key; `???` becomes an error that names the key."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    # `in` is False for a `???` value too, so that case is asked first.
    missing = isinstance(parent, DictConfig) and OmegaConf.is_missing(parent, leaf)
    if not missing and (not isinstance(parent, DictConfig) or leaf not in parent):
        if default is _ABSENT:
            raise ConfigError(f"{key} is missing from the config; add it with +{key}=<value>")
        return default
    if missing:
        raise ConfigError(f"{key} is required here (it is ??? in the config); set it on the command line: {key}=<value>")
    return parent[leaf]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def refused_file_error(key: str, path: Any, error: Exception) -> ConfigError:
    """The one line for a weights file whose pickle names more than tensors and plain values
    (`weights_only=True` or the Haiku loader refused it, so none of it ran)."""
    detail = next((line.strip() for line in str(error).splitlines() if "global" in line.lower()), "")
    return ConfigError(
        f"{key}={str(path)!r} was refused: it holds more than tensors and plain values, and loading it "
        f"would run code from the file{f' ({detail})' if detail else ''}; use weights written by this project, "
        "DeepMind or timm"
    )


def input_error(key: str, value: Any, error: Exception) -> ConfigError:
    """The one line for a file given as `key` that a lower floor found unusable (InputError)."""
    path = os.path.expanduser(str(value))
    return ConfigError(f"{key}={str(value)!r}: {str(error).removeprefix(path).removeprefix(': ').lstrip()}")


# Longer values are cut in messages: the line must stay one line a person reads.
SHOWN_CHARACTERS = 60


def shown(value: Any) -> str:
    """`repr(value)`, cut to its start and length when it is long (a 5,000-digit number)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARACTERS else f"{text[:SHOWN_CHARACTERS - 20]}... ({len(text)} characters)"


# --------------------------------------------------------------------------- constraints
class Constraint:
    """What a config value must be. `check` raises ConfigError with the one line; `message` is
    that line for any value, also one the schema's types refused before the check could run."""

    def ok(self, value: Any) -> bool:
        raise NotImplementedError

    def allowed(self) -> str:
        raise NotImplementedError

    def message(self, key: str, value: Any) -> str:
        return f"{key}={shown(value)} {self.allowed()}"

    def check(self, key: str, value: Any) -> Any:
        require(self.ok(value), self.message(key, value))
        return value


@dataclass(frozen=True)
class Integer(Constraint):
    minimum: int = 1
    maximum: int | None = None
    nullable: bool = False
    note: str = ""

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        return is_int(value) and value >= self.minimum and (self.maximum is None or value <= self.maximum)

    def allowed(self) -> str:
        bounds = f">= {self.minimum}" if self.maximum is None else f"in [{self.minimum}, {self.maximum}]"
        return f"must be an integer {bounds}{' or null' if self.nullable else ''}{self.note}"


@dataclass(frozen=True)
class Number(Constraint):
    """A number in [low, high] (ends open on request); `nullable` says what null means."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: str = ""
    note: str = ""

    def ok(self, value: Any) -> bool:
        if value is None:
            return bool(self.nullable)
        if not is_number(value) or not math.isfinite(value):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def allowed(self) -> str:
        low, high = self.low, self.high
        if low is not None and high is not None:
            bounds = f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif low is not None:
            bounds = f"{'>' if self.low_open else '>='} {low}"
        elif high is not None:
            bounds = f"{'<' if self.high_open else '<='} {high}"
        else:
            bounds = "(any)"
        null = f", or null {self.nullable}" if self.nullable else ""
        return f"must be a finite number {bounds}{self.note}{null}"


@dataclass(frozen=True)
class Choice(Constraint):
    options: tuple
    note: str = ""

    def ok(self, value: Any) -> bool:
        return value in self.options

    def allowed(self) -> str:
        return f"is not allowed{self.note}; choose one of: {', '.join(map(str, self.options))}"


@dataclass(frozen=True)
class Flag(Constraint):
    def ok(self, value: Any) -> bool:
        return isinstance(value, bool)

    def allowed(self) -> str:
        return "must be true or false"


@dataclass(frozen=True)
class Text(Constraint):
    """Any string (a path, a name), or null when `nullable` says what null means."""

    nullable: str = ""
    what: str = "a string"

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) or (value is None and bool(self.nullable))

    def allowed(self) -> str:
        return f"must be {self.what}{f', or null {self.nullable}' if self.nullable else ''}"


@dataclass(frozen=True)
class Name(Constraint):
    """A name that becomes one folder or file name (the task's run folder, its log file): never a
    path that leads elsewhere (`../x`), and short enough for any file system."""

    max_length: int = 100

    def ok(self, value: Any) -> bool:
        return (isinstance(value, str) and 0 < len(value) <= self.max_length and value not in (".", "..")
                and not any(c in value for c in "/\\\0"))

    def allowed(self) -> str:
        return (f"must be a name of 1 to {self.max_length} characters without / or \\, not . or .. "
                "(it names the run's folder and log file)")


# --------------------------------------------------------------------------- readers
def read_checked(cfg: DictConfig, key: str, constraint: Constraint, default: Any = _ABSENT) -> Any:
    return constraint.check(key, read(cfg, key, default))


def read_int(cfg: DictConfig, key: str, minimum: int = 1, nullable: bool = False, note: str = "") -> int | None:
    return read_checked(cfg, key, Integer(minimum, nullable=nullable, note=note), None if nullable else _ABSENT)


def read_choice(cfg: DictConfig, key: str, options, note: str = "") -> Any:
    return read_checked(cfg, key, Choice(tuple(options), note))
