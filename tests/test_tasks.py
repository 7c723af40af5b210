"""der_sdk.tasks.cancel_and_wait: stopping a task whose loop can lose a cancel."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from der_sdk.tasks import cancel_and_wait


async def _loop_that_loses_one_cancel(seen: list[str]) -> None:
    """A refresh loop as the cluster presence runs it: each pass makes a request and
    carries on after an error; its first cancel is lost (as Python 3.11's ``wait_for``
    loses one that lands with the request's answer)."""
    lost = False
    while True:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if not lost:
                lost = True
                seen.append("lost")
                continue
            seen.append("stopped")
            raise


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="Python 3.12's wait_for keeps it")
async def test_python_3_11_wait_for_loses_a_cancel_that_lands_with_the_answer() -> None:
    """Why the helper exists: the cancel is gone, the loop would go on forever."""
    answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    passes: list[str] = []

    async def one_request() -> None:
        passes.append(await asyncio.wait_for(answer, 5))

    task = asyncio.create_task(one_request())
    await asyncio.sleep(0)  # the task waits for the answer
    answer.set_result("answer")
    task.cancel()  # lands in the same loop pass as the answer
    await asyncio.sleep(0.05)
    assert task.done() and not task.cancelled()
    assert passes == ["answer"]


async def test_a_task_that_lost_its_first_cancel_is_cancelled_again_and_stops() -> None:
    seen: list[str] = []
    task = asyncio.create_task(_loop_that_loses_one_cancel(seen), name="refresh")
    await asyncio.sleep(0)
    assert await cancel_and_wait([task, None], settle_s=0.05) == []
    assert seen == ["lost", "stopped"]
    assert task.cancelled()


async def test_a_task_that_never_stops_is_returned_and_logged_not_waited_for_forever(
    caplog: pytest.LogCaptureFixture,
) -> None:
    released = asyncio.Event()

    async def stubborn() -> None:
        while not released.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn(), name="stubborn-loop")
    await asyncio.sleep(0)  # it is running
    with caplog.at_level(logging.WARNING, logger="der_sdk.tasks"):
        left = await cancel_and_wait([task], settle_s=0.02, attempts=3)
    assert left == [task]
    assert "task stubborn-loop did not stop after 3 cancels" in caplog.text
    released.set()  # let the test end
    task.cancel()
    await asyncio.wait([task], timeout=1)
    assert task.done()


async def test_a_task_that_failed_is_not_raised_and_finished_tasks_are_left_alone() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(fails())
    finished = asyncio.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    assert await cancel_and_wait([failed, finished]) == []
    assert not finished.cancelled()


async def test_attempts_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="attempts must be at least 1, got 0"):
        await cancel_and_wait([], attempts=0)
