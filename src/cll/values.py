"""What a run-config value may be: a number in a range, one of a few words, a flag, text, a list
of numbers. Each rule checks and converts a value (``check``: one-line ConfigError naming the key
and what is allowed), says what it allows in words (``allowed``: error messages, the README table,
``cll list``) and as JSON schema (``schema``: the grid schema). cll.config declares every key with
one of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

# The radii of the poster's tables, in [0,1]-pixel l2 units: the default of every eps list (run
# config certify_eps, cll.certify, cll.api) and the radii the tables write as n/255.
PAPER_EPS = (36 / 255, 72 / 255, 108 / 255)
# Power iterations per masked norm of Local-Lip-B's estimate-based certificate (the paper's code):
# the default of run config local_estimate_iters and of cll.certify.
LOCAL_ESTIMATE_ITERS = 2000
# The audit's budget where a caller names none (cll audit, cll.api.audit, cll.audit.audit): test
# points sampled, iterations per attack, PGD restarts. A grid's audit jobs have their own, smaller
# default (cll.schema.AUDIT).
AUDIT_POINTS, AUDIT_STEPS, AUDIT_RESTARTS = 1000, 100, 5


def parse_number(key: str, value: Any) -> float:
    """A float, also from a fraction string such as '36/255'."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not a number")
    if isinstance(value, str) and "/" in value:
        num, _, den = value.partition("/")
        try:
            result = float(num) / float(den)
        except (ValueError, ZeroDivisionError, OverflowError):
            raise ConfigError(f"{key}: {value!r} is not a number or fraction like 36/255") from None
    else:
        try:
            result = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: {value!r} is not a number") from None
    if not math.isfinite(result):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    return result


def _integer(key: str, value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not math.isfinite(value))
        or int(value) != value
    ):
        raise ConfigError(f"{key}: {value!r} is not an integer")
    return int(value)


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {allowed}")


# A number written as text: a fraction such as 36/255, or 1e-3 (which YAML 1.1 reads as text).
NUMBER_TEXT = {
    "type": "string",
    "pattern": r"^[-+]?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?(/[0-9]*\.?[0-9]+)?$",
    "description": "A number written as text, e.g. a fraction such as 36/255 or 1e-3 (which YAML reads as text).",
}


def _nullable(schema: dict, null: str | None) -> dict:
    return schema if null is None else {"anyOf": [{"type": "null"}, schema]}


@dataclass(frozen=True)
class Number:
    """A finite number (text such as '36/255' allowed) or, with ``integer``, a whole number, in a
    range: ``low``/``high`` bounds, ``open_low``/``open_high`` excluding them. ``null``: null is
    allowed too and means that."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    integer: bool = False
    null: str | None = None

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"{'<' if self.open_high else '<='} {self.high:g}" if self.high is not None else ""

    @property
    def allowed(self) -> str:
        text = f"{'an integer' if self.integer else 'a number'} {self._range()}".strip()
        return text if self.null is None else f"{text} or null (= {self.null})"

    @property
    def plural(self) -> str:
        """'integers >= 1', 'numbers in [0, 1)': the items of a list."""
        return f"{'integers' if self.integer else 'numbers'} {self._range()}".strip()

    def convert(self, key: str, value: Any) -> float | int:
        return _integer(key, value) if self.integer else parse_number(key, value)

    def contains(self, v: float) -> bool:
        above = self.low is None or (v > self.low if self.open_low else v >= self.low)
        below = self.high is None or (v < self.high if self.open_high else v <= self.high)
        return above and below

    def check(self, key: str, value: Any) -> Any:
        if value is None and self.null is not None:
            return None
        v = self.convert(key, value)
        _check(self.contains(v), key, value, self.allowed)
        return v

    def schema(self) -> dict:
        bounds = {}
        if self.low is not None:
            bounds["exclusiveMinimum" if self.open_low else "minimum"] = self.low
        if self.high is not None:
            bounds["exclusiveMaximum" if self.open_high else "maximum"] = self.high
        if self.integer:
            return _nullable({"type": "integer", **bounds}, self.null)
        # the schema cannot check the range of a fraction written as text: check() does
        options = [{"type": "number", **bounds}, {"$ref": "#/$defs/number_text"}]
        return {"anyOf": [{"type": "null"}, *options] if self.null is not None else options}


@dataclass(frozen=True)
class Choice:
    """One of a few words."""

    choices: tuple[str, ...]

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(self.choices)

    def check(self, key: str, value: Any) -> Any:
        _check(value in self.choices, key, value, self.allowed)
        return value

    def schema(self) -> dict:
        return {"enum": list(self.choices)}


@dataclass(frozen=True)
class Flag:
    """true or false."""

    allowed = "true or false"

    def check(self, key: str, value: Any) -> Any:
        _check(isinstance(value, bool), key, value, self.allowed)
        return value

    def schema(self) -> dict:
        return {"type": "boolean"}


@dataclass(frozen=True)
class Text:
    """A string (``what`` says which); ``null``: null is allowed too and means that."""

    what: str
    null: str | None = None

    @property
    def allowed(self) -> str:
        return self.what if self.null is None else f"{self.what} or null (= {self.null})"

    def check(self, key: str, value: Any) -> Any:
        _check(isinstance(value, str) or (value is None and self.null is not None), key, value, self.allowed)
        return value

    def schema(self) -> dict:
        return {"type": "string" if self.null is None else ["string", "null"]}


@dataclass(frozen=True)
class Numbers:
    """A list of numbers: exactly ``size`` of them, else at least ``least``; ``increasing``: in
    non-decreasing order; ``null``: null is allowed too and means that."""

    item: Number
    size: int | None = None
    least: int = 0
    increasing: bool = False
    null: str | None = None

    @property
    def allowed(self) -> str:
        count = {2: "a list of two"}[self.size] if self.size else ("a non-empty list of" if self.least else "a list of")
        text = f"{count} {'increasing ' if self.increasing else ''}{self.item.plural}"
        return text if self.null is None else f"{text}, or null (= {self.null})"

    def check(self, key: str, value: Any) -> Any:
        if value is None and self.null is not None:
            return None
        size_ok = isinstance(value, list) and (len(value) == self.size if self.size else len(value) >= self.least)
        _check(size_ok, key, value, self.allowed)
        v = [self.item.convert(key, x) for x in value]
        ordered = not self.increasing or v == sorted(v)
        _check(ordered and all(self.item.contains(x) for x in v), key, value, self.allowed)
        return v

    def schema(self) -> dict:
        sizes = {"minItems": self.size, "maxItems": self.size} if self.size else {"minItems": self.least}
        return _nullable({"type": "array", **sizes, "items": self.item.schema()}, self.null)


@dataclass(frozen=True)
class OneOrMore:
    """One number, or a non-empty list of them (one per layer, say)."""

    item: Number

    @property
    def allowed(self) -> str:
        return f"{self.item.allowed} or a non-empty list of {self.item.plural}"

    def check(self, key: str, value: Any) -> Any:
        if not isinstance(value, list):
            return self.item.check(key, value)
        _check(len(value) > 0, key, value, self.allowed)
        v = [self.item.convert(key, x) for x in value]
        _check(all(self.item.contains(x) for x in v), key, value, self.allowed)
        return v

    def schema(self) -> dict:
        return {"anyOf": [self.item.schema(), {"type": "array", "minItems": 1, "items": self.item.schema()}]}


Rule = Number | Choice | Flag | Text | Numbers | OneOrMore
