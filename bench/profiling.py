"""Sampling profiles of the headend while a benchmark loads it (py-spy, ``--profile``).

py-spy attaches to the running headend process from outside (no change to its code,
about 100 samples/s) and writes collapsed stacks. :func:`top_costs` turns them into the
functions that were on the CPU most (self) and the frames most often on the stack
(cumulative), which ``docs/performance.md`` quotes.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.common import Context

__all__ = ["maybe", "top_costs"]

PROFILES: dict[str, dict[str, Any]] = {}
"""Summaries of this run's profiles, by benchmark name."""


def _py_spy() -> str | None:
    candidate = Path(sys.executable).with_name("py-spy")
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


@contextlib.asynccontextmanager
async def maybe(ctx: Context, name: str, pid: int, seconds: float) -> AsyncIterator[None]:
    """Profile ``pid`` for ``seconds`` while the body runs, when ``ctx.profile`` is set."""
    if not ctx.profile:
        yield
        return
    tool = _py_spy()
    if tool is None:
        ctx.say("py-spy is not installed (pip install -e '.[bench]'); no profile")
        yield
        return
    assert ctx.profiles_dir is not None
    ctx.profiles_dir.mkdir(parents=True, exist_ok=True)
    out = ctx.profiles_dir / f"{name}.collapsed"
    process = await asyncio.create_subprocess_exec(
        tool,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(seconds))),
        "--rate",
        "200",
        "--format",
        "raw",
        "--nonblocking",
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield
    finally:
        _, err = await process.communicate()
        if process.returncode != 0 or not out.exists():
            ctx.say(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
        else:
            summary = top_costs(out)
            PROFILES[name] = summary
            (ctx.profiles_dir / f"{name}.txt").write_text(format_costs(name, summary))
            ctx.say(f"profile: {out}")


def _frame(frame: str) -> str:
    """``func (path/to/module.py:123)`` → ``func (module.py)``."""
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if parts else path
    for marker in ("site-packages/", "der_sdk", "plugins/"):
        if marker in path:
            short = path[path.index(marker) :].removeprefix("site-packages/")
            break
    return f"{func} ({short})"


def top_costs(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and cumulative shares of samples, from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    return {
        "samples": samples,
        "self": [(f, round(100 * c / samples, 1)) for f, c in own.most_common(top)],
        "cumulative": [(f, round(100 * c / samples, 1)) for f, c in total.most_common(top * 2)],
    }


def format_costs(name: str, summary: dict[str, Any]) -> str:
    lines = [f"{name}: {summary['samples']} samples", "", "self %  function"]
    lines += [f"{pct:6.1f}  {frame}" for frame, pct in summary["self"]]
    lines += ["", "total % function"]
    lines += [f"{pct:6.1f}  {frame}" for frame, pct in summary["cumulative"]]
    return "\n".join(lines) + "\n"
