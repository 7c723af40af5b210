"""Run the commands of a Markdown page in order, so that a page of instructions stays true.

A page's fenced blocks tagged ``console`` or ``bash`` are run; a ``console`` block runs
each line that starts with ``$ `` (a line ending in ``\\`` continues on the next), and its
other lines are example output, not checked; a ``bash`` block runs whole. Every command
must exit 0 unless a directive says otherwise. Directives sit in an HTML comment on the
line right above the fence (invisible when the page is rendered)::

    <!-- docs-test: file assets.yaml -->       write the block to this file (any tag)
    <!-- docs-test: background -->             start each command, leave it running
    <!-- docs-test: retry 30 -->               re-run until it passes, up to 30 s
    <!-- docs-test: exit 1 -->                 it must exit 1
    <!-- docs-test: contains RESULT: PASS -->  its output must contain this text
    <!-- docs-test: skip needs a real device -->  not run (the reason is required)

Several directives go in one comment, separated by ``;``. ``exit``, ``contains`` and
``retry`` are about the block's last command; the commands before it must exit 0.
Commands run with ``bash`` in a working folder, one after another; what a command exports
and the folder it ``cd``s into carry over to the next, as in a terminal. ``replace``
rewrites text in commands and files before they run (the tests use it to move fixed ports
onto free ones). Background processes are stopped (SIGTERM to their process group, then
SIGKILL) when the runner closes; one that ends before that fails the next command that
does not pass at once. Their output is in ``.docs-test/`` under the working folder and is
shown when a later command fails.

Usage in a test::

    with SnippetRunner(ROOT / "docs" / "page.md", tmp_path, env=env) as runner:
        runner.run()
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["Snippet", "SnippetFailed", "SnippetRunner", "parse_snippets"]

_FENCE = re.compile(r"^```(\w*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
_RUN_TAGS = frozenset({"console", "bash"})
_KNOWN = frozenset({"file", "background", "retry", "exit", "contains", "skip"})


class SnippetFailed(AssertionError):
    """A command of the page did not do what the page says."""


@dataclass(frozen=True)
class Snippet:
    """One fenced block: where it is, its tag, its text and its directives."""

    path: Path
    line: int
    """The line of the opening fence (1-based)."""
    tag: str
    body: str
    directives: Mapping[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def commands(self) -> list[str]:
        """The commands to run: each ``$`` line of a console block (continuations
        joined), or the whole of a bash block."""
        if self.tag == "bash":
            return [self.body]
        commands: list[str] = []
        current: list[str] | None = None
        for line in self.body.splitlines():
            if current is None:
                if not line.startswith("$ "):
                    continue
                current = [line[2:]]
            else:
                current.append(line)
            if current[-1].rstrip().endswith("\\"):
                continue
            commands.append("\n".join(current))
            current = None
        if current is not None:
            commands.append("\n".join(current))
        return commands


def _directives(text: str, where: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, value = part.partition(" ")
        if key not in _KNOWN:
            raise ValueError(
                f"{where}: unknown docs-test directive {key!r}; known: {sorted(_KNOWN)}"
            )
        found[key] = value.strip()
    if "skip" in found and not found["skip"]:
        raise ValueError(f"{where}: docs-test skip needs a reason")
    return found


def parse_snippets(path: Path) -> list[Snippet]:
    """The blocks of ``path`` the runner acts on: ``console`` and ``bash`` blocks, and any
    block with a ``file`` directive, in page order."""
    lines = path.read_text().splitlines()
    snippets: list[Snippet] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start, tag = i, match.group(1)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ValueError(f"{path.name}:{start + 1}: a fenced block is never closed")
        above = _DIRECTIVE.match(lines[start - 1]) if start > 0 else None
        where = f"{path.name}:{start + 1}"
        directives = _directives(above.group(1), where) if above else {}
        if tag in _RUN_TAGS or "file" in directives:
            body = "\n".join(lines[start + 1 : end]) + "\n"
            snippets.append(Snippet(path, start + 1, tag, body, directives))
        i = end + 1
    return snippets


@dataclass
class _Background:
    where: str
    command: str
    process: subprocess.Popen[bytes]
    log: Path


class SnippetRunner:
    """Runs the snippets of one page in ``workdir``; use it as a context manager.

    :param env: the environment of every command (``PATH`` must find the tools the page
        uses); exports of earlier commands are added to it.
    :param replace: text to rewrite in commands and files before they run.
    :param timeout_s: limit for one command (``retry`` may try until its own limit).
    """

    def __init__(
        self,
        page: Path,
        workdir: Path,
        *,
        env: Mapping[str, str],
        replace: Mapping[str, str] | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self.page = page
        self.workdir = workdir
        self.env = dict(env)
        self.replace = dict(replace or {})
        self.timeout_s = timeout_s
        self.cwd = workdir
        self.ran: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self._state = workdir / ".docs-test"
        self._background: list[_Background] = []

    def __enter__(self) -> SnippetRunner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ running

    def run(self, snippets: Sequence[Snippet] | None = None) -> None:
        """Run every snippet of the page (or ``snippets``) in order; raise
        :class:`SnippetFailed` at the first that does not do what the page says."""
        self._state.mkdir(parents=True, exist_ok=True)
        for snippet in snippets if snippets is not None else parse_snippets(self.page):
            self.run_snippet(snippet)

    def run_snippet(self, snippet: Snippet) -> None:
        d = snippet.directives
        if "skip" in d:
            self.skipped.append((snippet.where, d["skip"]))
            return
        if "file" in d:
            target = self.cwd / self._rewrite(d["file"])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(self._rewrite(snippet.body))
            self.ran.append(f"{snippet.where}: wrote {d['file']}")
            return
        commands = snippet.commands
        for index, command in enumerate(commands):
            command = self._rewrite(command)
            if "background" in d:
                self._start(snippet, command)
            else:  # exit, contains and retry are about the block's last command
                last = index == len(commands) - 1
                self._run_checked(snippet, command, d if last else {})
            self.ran.append(f"{snippet.where}: {command}")

    def _rewrite(self, text: str) -> str:
        for old, new in self.replace.items():
            text = text.replace(old, new)
        return text

    def _run_checked(self, snippet: Snippet, command: str, d: Mapping[str, str]) -> None:
        expected = int(d.get("exit", "0"))
        deadline = time.monotonic() + float(d.get("retry", "0"))
        while True:
            code, output = self._run_once(command)
            problem = None
            if code != expected:
                problem = f"exited {code}, the page expects {expected}"
            elif "contains" in d and d["contains"] not in output:
                problem = f"its output does not contain {d['contains']!r}"
            if problem is None:
                return
            if time.monotonic() >= deadline or self._background_died():
                raise SnippetFailed(self._explain(snippet, command, problem, output))
            time.sleep(0.5)

    def _run_once(self, command: str) -> tuple[int, str]:
        """Run ``command`` in bash; keep the exports and folder it leaves behind."""
        env_file, cwd_file = self._state / "env", self._state / "cwd"
        script = (
            f"{command}\n__docs_rc=$?\n"
            f"env -0 > {shlex.quote(str(env_file))}; pwd > {shlex.quote(str(cwd_file))}\n"
            "exit $__docs_rc\n"
        )
        try:
            done = subprocess.run(
                ["bash", "-c", script],
                cwd=self.cwd,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=self.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            output = exc.stdout.decode(errors="replace") if exc.stdout else ""
            return -1, f"{output}\n(timed out after {self.timeout_s:g} s)"
        if env_file.exists():
            pairs = env_file.read_bytes().decode(errors="replace").split("\0")
            self.env = dict(p.split("=", 1) for p in pairs if "=" in p)
            self.cwd = Path(cwd_file.read_text().strip())
            env_file.unlink()
        return done.returncode, done.stdout.decode(errors="replace")

    def _background_died(self) -> bool:
        """A background command ended: waiting for what it should provide is pointless."""
        return any(bg.process.poll() is not None for bg in self._background)

    def _start(self, snippet: Snippet, command: str) -> None:
        log = self._state / f"background-{len(self._background) + 1}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["bash", "-c", command],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._background.append(_Background(snippet.where, command, process, log))

    def _explain(self, snippet: Snippet, command: str, problem: str, output: str) -> str:
        parts = [
            f"{snippet.where}: `{command}` {problem}",
            "output:",
            _tail(output),
        ]
        for bg in self._background:
            state = "running" if bg.process.poll() is None else f"exited {bg.process.returncode}"
            parts += [
                f"background `{bg.command}` ({bg.where}, {state}):",
                _tail(bg.log.read_text()),
            ]
        return "\n".join(parts)

    # ------------------------------------------------------------------ stopping

    def close(self) -> None:
        """Stop the background processes this runner started."""
        for bg in self._background:
            if bg.process.poll() is None:
                os.killpg(bg.process.pid, signal.SIGTERM)
        for bg in self._background:
            try:
                bg.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(bg.process.pid, signal.SIGKILL)
                bg.process.wait()
        self._background.clear()

    def background_output(self) -> dict[str, str]:
        """Each background command's output so far."""
        return {bg.command: bg.log.read_text() for bg in self._background}


def _tail(text: str, lines: int = 40) -> str:
    kept = text.splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in kept) or "    (nothing)"
