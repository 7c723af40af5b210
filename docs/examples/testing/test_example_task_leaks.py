"""The leaked-task check, and its opt-out marker."""

import asyncio

import pytest

BACKGROUND: list[asyncio.Task[None]] = []


async def test_tasks_are_cancelled_and_awaited() -> None:
    task = asyncio.create_task(asyncio.sleep(3600))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.der_allow_task_leaks("the loop is closed after the test and cancels it")
async def test_a_deliberate_leak() -> None:
    BACKGROUND.append(asyncio.create_task(asyncio.sleep(3600), name="fire-and-forget"))
