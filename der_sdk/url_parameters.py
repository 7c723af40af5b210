"""Parsers for the query parameters a backend reads from its URL (``DATABASE_URL``, a bus
URL): each takes ``(name, raw)`` and returns the value, or raises a
:class:`~der_sdk.errors.DerSdkError` naming the URL, the parameter and what was wrong.

A backend lists its parameters as ``{name: parser}``, for example
``{"pool_max": whole_number("DATABASE_URL", 1), "connect_timeout": seconds("DATABASE_URL")}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from der_sdk.errors import DerSdkError

__all__ = ["ParameterParser", "seconds", "text", "whole_number"]

ParameterParser = Callable[[str, str], Any]
"""``parse(name, raw)``: the value of query parameter ``name`` given as ``raw``."""


def whole_number(where: str, minimum: int) -> Callable[[str, str], int]:
    """A parser of whole numbers of at least ``minimum``; ``where`` names the URL."""

    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise DerSdkError(f"{where}: {name}={raw!r} is not a whole number") from None
        if value < minimum:
            raise DerSdkError(f"{where}: {name}={value} must be at least {minimum}")
        return value

    return parse


def seconds(where: str, *, allow_zero: bool = False) -> Callable[[str, str], float]:
    """A parser of finite numbers more than 0 (or 0 too, with ``allow_zero``)."""

    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise DerSdkError(f"{where}: {name}={raw!r} is not a number") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            bound = "0 or more" if allow_zero else "more than 0"
            raise DerSdkError(f"{where}: {name}={raw!r} must be {bound}")
        return value

    return parse


def text(where: str) -> Callable[[str, str], str]:
    """A parser of text that must not be empty."""

    def parse(name: str, raw: str) -> str:
        if not raw:
            raise DerSdkError(f"{where}: {name} is empty")
        return raw

    return parse
