"""Waits with a deadline for tests: every wait in the test kit fails with what it was
waiting for and what it saw last, never hangs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

__all__ = ["WAIT_S", "wait_until"]

T = TypeVar("T")

WAIT_S = 5.0
"""The default deadline of every wait in the test kit."""


async def wait_until(
    probe: Callable[[], Awaitable[T | None]],
    what: str,
    *,
    timeout_s: float = WAIT_S,
    interval: float = 0.02,
    last_seen: Callable[[], object] | None = None,
) -> T:
    """Await ``probe()`` until it returns something other than ``None``/``False``.

    :param what: completes "timed out after 5 s waiting for ...".
    :param last_seen: called on timeout to say what was seen last.
    :raises pytest.fail.Exception: on the deadline.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = await probe()
        if result is not None and result is not False:
            return result
        if loop.time() >= deadline:
            seen = f"; last seen: {last_seen()!r}" if last_seen is not None else ""
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}{seen}", pytrace=False)
        await asyncio.sleep(interval)
