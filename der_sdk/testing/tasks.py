"""The leaked-task check: an async test must not leave asyncio tasks running.

After an async test **and all its fixtures** have finished, every task that is still
pending in the test's event loop and did not exist when the test started is a leak: the
test fails at teardown with one line per task naming the task, its coroutine, where it is
suspended, and (in asyncio debug mode) where it was created.

Why after the fixtures: a fixture that starts a server in setup and stops it in teardown
does nothing wrong, and tasks the test starts through such a fixture are stopped by it.
The check runs just before pytest-asyncio closes the loop, which would otherwise cancel
the leftovers silently.

Opt out per test (or module, or class) with ``@pytest.mark.der_allow_task_leaks("why")``,
or for a whole project with the ini option ``der_check_task_leaks = false``.

The check needs pytest-asyncio 1.x and applies to tests on a function-scoped loop (the
default): on a wider loop, tasks of wider-scoped fixtures legitimately outlive a test.
"""

from __future__ import annotations

import asyncio
import os
import sysconfig
from collections.abc import Collection, Generator, Iterable
from typing import Any

import pytest

__all__ = [
    "ALLOW_LEAKS_MARKER",
    "INI_OPTION",
    "LEAK_GRACE_S",
    "describe_task",
    "find_leaked_tasks",
    "leaked_tasks_message",
    "task_leak_check",
]

ALLOW_LEAKS_MARKER = "der_allow_task_leaks"
INI_OPTION = "der_check_task_leaks"
LEAK_GRACE_S = 0.1
"""How long tasks get to finish on their own after teardown before they count as leaked
(a task cancelled but not awaited needs a loop iteration or two to end)."""

_RUNNER_FIXTURE = "_function_scoped_runner"  # pytest-asyncio 1.x: the loop of a test
_CANCEL_WAIT_S = 1.0
_call_failed = pytest.StashKey[bool]()


def _library_roots() -> list[str]:
    roots = {sysconfig.get_path(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    return sorted((root for root in roots if root), key=len, reverse=True)


_LIBRARY_ROOTS = _library_roots()
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__) + os.sep


def _short_path(path: str) -> str:
    """Relative to the working directory, else to the standard library or site-packages."""
    for base in (os.getcwd(), *_LIBRARY_ROOTS):
        try:
            relative = os.path.relpath(path, base)
        except ValueError:  # another drive on Windows
            continue
        if not relative.startswith(".."):
            return relative
    return path


def _await_chain(coro: Any) -> list[str]:
    """``qualname() at file:line`` for the coroutine and each coroutine it awaits."""
    chain: list[str] = []
    while coro is not None and len(chain) < 20:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None and not hasattr(coro, "cr_code") and not hasattr(coro, "gi_code"):
            break  # a future or another awaitable: its coroutine is what matters
        name = getattr(coro, "__qualname__", None) or type(coro).__name__
        where = f"{_short_path(frame.f_code.co_filename)}:{frame.f_lineno}" if frame else "?"
        chain.append(f"{name}() at {where}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return chain


def describe_task(task: asyncio.Task[Any]) -> str:
    """One task for a failure message: name, coroutine, where it waits, where it began."""
    chain = _await_chain(task.get_coro())
    text = f"task {task.get_name()!r} running {chain[0] if chain else '?'}"
    if len(chain) > 1:
        text += f", waiting in {' -> '.join(chain[1:])}"
    if task.cancelling():
        text += " (cancel requested but not awaited)"
    created: Any = getattr(task, "_source_traceback", None)  # asyncio debug mode only
    callers = [f for f in created or () if not f.filename.startswith(_ASYNCIO_DIR)]
    if callers:
        frame = callers[-1]
        text += f"; created at {_short_path(frame.filename)}:{frame.lineno} in {frame.name}"
    return text


def leaked_tasks_message(nodeid: str, leaked: Iterable[asyncio.Task[Any]]) -> str:
    """The failure text for ``leaked`` tasks of test ``nodeid``."""
    tasks = sorted(leaked, key=lambda t: t.get_name())
    lines = [
        f"{nodeid} leaked {len(tasks)} asyncio task(s), still pending after the test and its "
        f"fixtures finished (waited {LEAK_GRACE_S:g} s):"
    ]
    lines += [f"  - {describe_task(task)}" for task in tasks]
    lines.append(
        "Cancel and await every task a test or fixture starts (stop the object that owns it "
        "in the fixture's teardown, or use asyncio.TaskGroup). Set asyncio_debug = true (or "
        "PYTHONASYNCIODEBUG=1) to see where each task was created. If the leak is intended, "
        f'mark the test @pytest.mark.{ALLOW_LEAKS_MARKER}("why").'
    )
    return "\n".join(lines)


async def find_leaked_tasks(
    before: Collection[asyncio.Task[Any]], grace_s: float = LEAK_GRACE_S
) -> list[asyncio.Task[Any]]:
    """Tasks of the running loop, not in ``before``, still pending after ``grace_s``.

    The calling task is never counted. Returns as soon as nothing is pending.
    """
    current = asyncio.current_task()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s

    def pending() -> list[asyncio.Task[Any]]:
        return [
            t for t in asyncio.all_tasks() if t is not current and t not in before and not t.done()
        ]

    leaked = pending()
    while leaked and loop.time() < deadline:
        await asyncio.sleep(0 if loop.time() + 0.01 > deadline else 0.01)
        leaked = pending()
    return leaked


async def _cancel_all(tasks: Collection[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks, timeout=_CANCEL_WAIT_S)


def _loop_scope(item: pytest.Item) -> str:
    marker = item.get_closest_marker("asyncio")
    scope = None
    if marker is not None:
        scope = marker.kwargs.get("loop_scope") or marker.kwargs.get("scope")
    if scope is None:
        try:
            scope = item.config.getini("asyncio_default_test_loop_scope")
        except ValueError:
            scope = None
    return str(scope or "function")


def _is_async_test(item: pytest.Item) -> bool:
    try:
        from pytest_asyncio import is_async_test
    except ImportError:  # pytest-asyncio not installed: no asyncio tests to check
        return False
    return bool(is_async_test(item))


def record_call_outcome(item: pytest.Item, report: pytest.TestReport) -> None:
    """Remember that the test body failed: its leaks are a consequence, not news."""
    if report.when == "call" and report.failed:
        item.stash[_call_failed] = True


def task_leak_check(request: pytest.FixtureRequest) -> Generator[None, None, None]:
    """The body of the autouse fixture (see the module docstring)."""
    item = request.node
    marker = item.get_closest_marker(ALLOW_LEAKS_MARKER)
    if marker is not None:
        reason = marker.args[0] if marker.args else marker.kwargs.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            pytest.fail(
                f'@pytest.mark.{ALLOW_LEAKS_MARKER} needs a reason: ("why the tasks may '
                f'outlive the test")',
                pytrace=False,
            )
    if (
        marker is not None
        or not isinstance(item, pytest.Function)
        or not request.config.getini(INI_OPTION)
        or not _is_async_test(item)
        or _loop_scope(item) != "function"
    ):
        yield
        return
    try:
        runner: asyncio.Runner = request.getfixturevalue(_RUNNER_FIXTURE)
    except pytest.FixtureLookupError:  # another pytest-asyncio: the check cannot see the loop
        yield
        return
    loop = runner.get_loop()
    before = frozenset(asyncio.all_tasks(loop))
    yield
    if loop.is_closed() or loop.is_running() or item.stash.get(_call_failed, False):
        return
    leaked = runner.run(find_leaked_tasks(before))
    if leaked:
        message = leaked_tasks_message(item.nodeid, leaked)
        runner.run(_cancel_all(leaked))
        pytest.fail(message, pytrace=False)
