"""Stopping background tasks when a cancel can be lost.

On Python 3.11, ``asyncio.wait_for`` returns the inner result and drops a cancel that
lands in the same loop pass as that result (fixed in 3.12, where ``wait_for`` is built on
``asyncio.timeout``). nats-py, asyncpg and grpc use ``wait_for`` inside their requests, so
a loop whose body makes such a request can swallow the one cancel sent to stop it and go
on forever; an ``await task`` after that cancel then never returns. CI saw a headend's
stop hang this way in the cluster presence refresh loop (issue 19's session 7).

:func:`cancel_and_wait` cancels, gives the task time to run its clean-up, and cancels
again while it is still running, so a lost cancel costs one ``settle_s``, not the stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_and_wait"]

log = logging.getLogger(__name__)

SETTLE_S = 1.0
"""How long a cancelled task has to finish before it is cancelled again."""
ATTEMPTS = 5
"""Cancels per task before :func:`cancel_and_wait` gives up on it."""


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any] | None],
    *,
    settle_s: float = SETTLE_S,
    attempts: int = ATTEMPTS,
) -> list[asyncio.Task[Any]]:
    """Cancel ``tasks`` (``None`` entries are skipped) and wait until they are done,
    cancelling again those still running after each ``settle_s``, at most ``attempts``
    times in all.

    A task that ends with an exception other than the cancel is logged at debug level
    (the task's owner reports failures while it runs). Cancelling the caller cancels the
    wait, not the cancelling: the tasks have been cancelled once already.

    :returns: the tasks still running after the last attempt (each logged as a warning
        with its name); empty when every task stopped.
    """
    if attempts < 1:
        raise ValueError(f"cancel_and_wait: attempts must be at least 1, got {attempts}")
    given = [task for task in tasks if task is not None]
    pending = {task for task in given if not task.done()}
    for _ in range(attempts):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, still = await asyncio.wait(pending, timeout=settle_s)
        pending = still
    for task in given:
        if task in pending:
            log.warning("task %s did not stop after %d cancels", task.get_name(), attempts)
        elif not task.cancelled() and task.exception() is not None:
            log.debug("task %s ended with %r", task.get_name(), task.exception())
    return sorted(pending, key=lambda task: task.get_name())
