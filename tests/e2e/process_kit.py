"""Commands run in the background as a user runs them: started, waited for, stopped."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path


@contextlib.contextmanager
def started(
    cmd: Sequence[str | Path],
    *,
    log: Path,
    ready: str,
    cwd: Path,
    env: Mapping[str, str],
    timeout_s: float = 30,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` with its output (both streams) in ``log``; yield the process once the
    log shows ``ready``, failing with the log when it exits or ``timeout_s`` passes first.
    Afterwards a process still running is terminated (killed when it ignores that)."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env
        )
        try:
            deadline = time.monotonic() + timeout_s
            while ready not in log.read_text():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
