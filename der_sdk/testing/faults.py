"""Fault injection beyond one device: a TCP proxy that cuts, blackholes and delays a link,
and the real headend and agent run as processes you can SIGKILL.

* :class:`TcpProxy` sits on loopback between a client (an agent, a storage driver) and its
  server, and switches between ``forward``, ``cut`` (every connection reset, new ones
  refused), ``blackhole`` (a half-open link: bytes vanish, no FIN, no RST) and ``delay``
  (added one-way latency). :meth:`TcpProxy.heal` forwards again.
* :class:`HeadendProcess` and :class:`AgentProcess` (both :class:`ServiceProcess`) run
  ``python -m der_sdk.cli headend`` / ``agent`` as child processes with their output
  appended to a log file, and :meth:`~ServiceProcess.kill` them with SIGKILL: no ``finally``
  block, no graceful shutdown, exactly like a power cut. :meth:`~ServiceProcess.restart`
  starts them again with the same settings and ports.

Everything is asyncio: the proxy is built on asyncio streams, the processes on
:func:`asyncio.create_subprocess_exec`, and file reads of the logs run in a thread. Nothing
here needs httpx or pytest. ``close()``, ``kill()`` and the context managers leave no task
and no child process behind, so the leaked-task check of :mod:`der_sdk.testing.tasks` stays
quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, ClassVar, Literal, TypeVar

__all__ = [
    "AgentProcess",
    "HeadendProcess",
    "ProxyMode",
    "ServiceProcess",
    "ServiceProcessError",
    "TcpProxy",
    "free_port",
    "http_status",
]

ProxyMode = Literal["forward", "cut", "blackhole", "delay"]

LOOPBACK = "127.0.0.1"
_CHUNK = 65536
_LOG_TAIL_LINES = 40
_POLL_S = 0.05
_REGISTERED = r"registered with headend (?P<headend>\S+) as agent (?P<agent_id>[^\s:]+)"

_P = TypeVar("_P", bound="ServiceProcess")


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that nothing listens on right now.

    Ports come from a band of this test process's own below the OS's ephemeral range
    (:func:`_port_band`), in turn: the OS never hands one of them to another socket (a
    ``bind`` to port 0 or an outgoing connection), a parallel pytest-xdist worker takes
    its ports from another band, and a port comes back only after the whole band, so a
    port given to one test is not given to the next while its server is still closing.
    Another program may still bind it before you do; on loopback in a test run that is
    rare enough to ignore.
    """
    return _free_ports(1, host)[0]


_BAND_BASE = 20000
_BAND_SPAN = 500
_BANDS = 24  # 20000-31999, below Linux's default ephemeral range (32768-60999)
_band_next: dict[str, int] = {}
_band_lock = threading.Lock()


def _port_band() -> range:
    """The ports :func:`free_port` gives in this process: its own band of 500, by its
    pytest-xdist worker (``PYTEST_XDIST_WORKER=gw<N>``); ``gw0`` has 20500-20999, a run
    without workers 20000-20499."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    start = _BAND_BASE + (index % _BANDS) * _BAND_SPAN
    return range(start, start + _BAND_SPAN)


def _ephemeral_range() -> range:
    """The OS's range for ``bind`` to port 0 and outgoing connections (Linux; elsewhere
    the IANA range)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(49152, 65536)


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    band = _port_band()
    ephemeral = _ephemeral_range()
    if band.start < ephemeral.stop and ephemeral.start < band.stop:
        return _os_picked_ports(count, host)  # the OS could hand out the band's ports
    key = f"{band.start}:{host}"
    with _band_lock:
        # a random start, so two runs of the suite side by side rarely walk the same ports
        offset = _band_next.get(key, random.randrange(len(band)))
        ports: list[int] = []
        for step in range(len(band)):
            port = band[(offset + step) % len(band)]
            if _bindable(host, port):
                ports.append(port)
                if len(ports) == count:
                    _band_next[key] = (offset + step + 1) % len(band)
                    return ports
    return _os_picked_ports(count, host)  # the band is taken: leave it to the OS


def _os_picked_ports(count: int, host: str) -> list[int]:
    # All sockets stay bound until every port is picked, so the ports differ.
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


# ----------------------------------------------------------------------------- TCP proxy


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: SO_LINGER 0, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed: nothing left to reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Connection:
    """One client connection through the proxy and, unless blackholed from the start,
    its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.blackholed = False
        self.aborted = False
        self.released = asyncio.Event()

    def abort(self) -> None:
        self.aborted = True
        self.released.set()
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)

    async def finish(self) -> None:
        """Release both sockets: RST when the connection is unusable, FIN otherwise."""
        if self.aborted or self.blackholed:
            self.abort()
            return
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()


class TcpProxy:
    """A TCP proxy on loopback between clients and ``target_host:target_port``.

    ``async with TcpProxy("127.0.0.1", port) as proxy:`` listens on an ephemeral port of
    127.0.0.1 (:attr:`port`, :attr:`addr`); point the client at :attr:`addr` instead of the
    target. Each accepted connection opens its own connection to the target.

    Faults, switched at any time (synchronous: they act on the next loop iteration):

    * :meth:`cut` — every open connection is reset (RST) at once, and new connections are
      accepted and reset immediately, until :meth:`heal`;
    * :meth:`blackhole` — open connections stay open and new ones are accepted (without
      reaching the target), but every byte is discarded in both directions, and neither a
      FIN nor a RST is passed on: a half-open link, as when a cable is pulled or a NAT entry
      expires. Only timeouts and keepalives notice it;
    * :meth:`delay` — forward with ``seconds`` of added one-way latency per chunk, in
      order;
    * :meth:`heal` — forward again. Connections that lived through a blackhole are reset
      (their lost bytes leave them unusable, as after a real outage); cut ones are gone.

    A target that refuses the proxy's connection shows as a reset to the client.
    Counters: :attr:`connections_accepted`, :attr:`active_connections`, :attr:`bytes_up`
    (client to target), :attr:`bytes_down` (target to client), :attr:`bytes_discarded`
    (by the blackhole), and the current :attr:`mode`.
    """

    def __init__(
        self, target_host: str, target_port: int, *, host: str = LOOPBACK, port: int = 0
    ) -> None:
        """:param host, port: where the proxy listens; port 0 lets the OS pick one."""
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self._listen_port = port
        self._mode: ProxyMode = "forward"
        self._delay_s = 0.0
        self._server: asyncio.Server | None = None
        self._closed = False
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections_accepted = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_discarded = 0

    # -- life cycle

    async def start(self) -> TcpProxy:
        """Listen; returns ``self``. The port is known from now on."""
        if self._server is not None:
            raise RuntimeError("this TcpProxy is already started")
        if self._closed:
            raise RuntimeError("this TcpProxy was closed; create a new one")
        self._server = await asyncio.start_server(self._accepted, self.host, self._listen_port)
        self._listen_port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        """Stop listening, reset every connection and wait for the proxy's tasks to end.
        Idempotent."""
        self._closed = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for connection in list(self._connections):
            connection.abort()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:  # still connecting to an unresponsive target
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- where and what

    @property
    def port(self) -> int:
        """The port the proxy listens on (after :meth:`start`)."""
        if self._server is None and not self._closed:
            raise RuntimeError("the TcpProxy has no port before start()")
        return self._listen_port

    @property
    def addr(self) -> str:
        """``"127.0.0.1:PORT"``: give this to the client instead of the target's address."""
        return f"{self.host}:{self.port}"

    @property
    def mode(self) -> ProxyMode:
        return self._mode

    @property
    def delay_s(self) -> float:
        """The added one-way latency (0 unless in ``delay`` mode)."""
        return self._delay_s

    @property
    def active_connections(self) -> int:
        """Client connections open through the proxy now (blackholed ones included)."""
        return len(self._connections)

    def __repr__(self) -> str:
        where = f"{self.host}:{self._listen_port}"
        return f"<TcpProxy {where} -> {self.target_host}:{self.target_port} {self._mode}>"

    # -- faults

    def cut(self) -> None:
        """Reset every open connection now and reset new ones on accept, until
        :meth:`heal`."""
        self._mode = "cut"
        self._delay_s = 0.0
        for connection in list(self._connections):
            connection.abort()
            self._connections.discard(connection)

    def blackhole(self) -> None:
        """Discard every byte of open and new connections, in both directions, without
        closing anything, until :meth:`heal`."""
        self._mode = "blackhole"
        self._delay_s = 0.0
        for connection in self._connections:
            connection.blackholed = True

    def delay(self, seconds: float) -> None:
        """Forward with ``seconds`` of added one-way latency per chunk (order kept).

        Leaving a blackhole this way resets its connections, as :meth:`heal` does.
        """
        if not seconds >= 0:
            raise ValueError(f"delay must be >= 0 seconds, got {seconds!r}")
        self._leave_blackhole()
        self._mode = "delay"
        self._delay_s = float(seconds)

    def heal(self) -> None:
        """Forward again, without delay. Connections that lived through a blackhole are
        reset; new connections work."""
        self._leave_blackhole()
        self._mode = "forward"
        self._delay_s = 0.0

    def _leave_blackhole(self) -> None:
        for connection in list(self._connections):
            if connection.blackholed:
                connection.abort()
                self._connections.discard(connection)

    # -- connections

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: the proxy owns (and awaits on close) every task
        # it starts, instead of leaving one to the stream server.
        self.connections_accepted += 1
        connection = _Connection(writer)
        if self._closed or self._mode == "cut":
            connection.abort()
            return
        self._spawn(self._serve(connection, reader), f"der-tcp-proxy-{self._listen_port}")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, connection: _Connection, client: asyncio.StreamReader) -> None:
        try:
            if self._mode == "blackhole":
                # Never reaches the target: the SYN got lost on the way, as far as it knows.
                connection.blackholed = True
                self._connections.add(connection)
                await self._discard(client)
            else:
                await self._forward(connection, client)
            if connection.blackholed:
                # A blackhole passes on no FIN and no RST: hold the sockets until heal().
                await connection.released.wait()
        finally:
            self._connections.discard(connection)
            await connection.finish()

    async def _forward(self, connection: _Connection, client: asyncio.StreamReader) -> None:
        try:
            upstream, upstream_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            connection.abort()
            return
        connection.upstream = upstream_writer
        # The mode may have changed while connecting.
        if self._closed or self._mode == "cut":
            connection.abort()
            return
        connection.blackholed = self._mode == "blackhole"
        self._connections.add(connection)
        async with asyncio.TaskGroup() as group:
            self._pipe(group, connection, client, upstream_writer, up=True)
            self._pipe(group, connection, upstream, connection.client, up=False)

    async def _discard(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                data = await reader.read(_CHUNK)
            except OSError:
                return
            if not data:
                return
            self.bytes_discarded += len(data)

    def _pipe(
        self,
        group: asyncio.TaskGroup,
        connection: _Connection,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        *,
        up: bool,
    ) -> None:
        """One direction: a reader stamps each chunk with its delivery time, a writer
        delivers chunks in order once due. ``None`` in the queue is end of stream."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        direction = "up" if up else "down"
        group.create_task(
            self._read_side(connection, source, queue),
            name=f"der-tcp-proxy-{self._listen_port}-{direction}-read",
        )
        group.create_task(
            self._write_side(connection, sink, queue, up=up),
            name=f"der-tcp-proxy-{self._listen_port}-{direction}-write",
        )

    async def _read_side(
        self,
        connection: _Connection,
        source: asyncio.StreamReader,
        queue: asyncio.Queue[tuple[float, bytes] | None],
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    data = await source.read(_CHUNK)
                except OSError:
                    # A reset from one peer reaches the other, unless the link is a
                    # blackhole, which passes on nothing at all.
                    if not connection.blackholed:
                        connection.abort()
                    return
                if not data:
                    return
                if connection.blackholed:
                    self.bytes_discarded += len(data)
                    continue
                queue.put_nowait((loop.time() + self._delay_s, data))
        finally:
            queue.put_nowait(None)

    async def _write_side(
        self,
        connection: _Connection,
        sink: asyncio.StreamWriter,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        *,
        up: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        while (item := await queue.get()) is not None:
            due, data = item
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            if connection.aborted:
                return
            if connection.blackholed or sink.is_closing():
                self.bytes_discarded += len(data)
                continue
            sink.write(data)
            try:
                await sink.drain()
            except OSError:
                connection.abort()
                return
            if up:
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)
        # End of stream: pass the FIN on (a half-close), unless the link is a blackhole.
        passes_eof = not (connection.aborted or connection.blackholed or sink.is_closing())
        if passes_eof and sink.can_write_eof():
            with contextlib.suppress(OSError):
                sink.write_eof()


# ----------------------------------------------------------------------------- processes


class ServiceProcessError(RuntimeError):
    """A service process did not come up, exited early, or never logged what was awaited.
    The message ends with the tail of its log."""


class ServiceProcess:
    """A ``der`` command (``python -m der_sdk.cli <command>``) run as a child process.

    Its stdout and stderr are appended to :attr:`log_path`; every start writes a
    ``--- start N of NAME ---`` line first, so a restart appends to the same log and
    :meth:`wait_for_log` looks only at the current run. The environment is ``os.environ``,
    then the service's settings, then ``env``; settings a subclass does not use are removed
    from the inherited environment, so a variable in your shell cannot change the mode.

    ``async with`` starts the process (unless started) and always kills it on exit.
    """

    command: ClassVar[str]
    """The ``der`` subcommand."""

    def __init__(
        self,
        name: str,
        *,
        workdir: Path | str,
        env: Mapping[str, str] | None = None,
        log_path: Path | str | None = None,
        log_level: str = "INFO",
    ) -> None:
        """:param name: names the process in messages and the default log file
            (``workdir/NAME.log``).
        :param workdir: the process's working directory (relative paths resolve there).
        :param env: environment variables layered over everything else.
        :param log_level: the ``der --log-level`` flag; INFO shows the lines waits look for.
        """
        self.name = name
        self.workdir = Path(workdir)
        self.env: dict[str, str] = dict(env or {})
        self.log_path = Path(log_path) if log_path is not None else self.workdir / f"{name}.log"
        self.log_level = log_level
        self.starts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._run_offset = 0

    # -- what subclasses define

    def settings(self) -> dict[str, str | None]:
        """The environment variables this service is configured with; ``None`` removes
        a variable inherited from ``os.environ``."""
        return {}

    async def _wait_ready(self, deadline: float) -> None:
        """Return once the service is up; the default: once the process runs."""

    # -- command line and environment

    def argv(self) -> list[str]:
        """The command line: this Python running ``der_sdk.cli``."""
        return [sys.executable, "-m", "der_sdk.cli", "--log-level", self.log_level, self.command]

    def environment(self) -> dict[str, str]:
        """The child's environment: ``os.environ``, :meth:`settings`, then ``env``."""
        environment = dict(os.environ)
        # Output reaches the log as it is written, not when a buffer fills: a SIGKILL
        # would lose the buffer.
        environment["PYTHONUNBUFFERED"] = "1"
        for key, value in self.settings().items():
            if value is None:
                environment.pop(key, None)
            else:
                environment[key] = value
        environment.update(self.env)
        return environment

    # -- state

    @property
    def pid(self) -> int | None:
        """The process id of the current (or last) run; ``None`` before the first start."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status of the last run once it ended (``-9`` after :meth:`kill`);
        ``None`` while running or before the first start."""
        return self._process.returncode if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.returncode}"
        if self._process is None:
            state = "not started"
        return f"<{type(self).__name__} {self.name} pid={self.pid} {state}>"

    # -- life cycle

    async def start(self, timeout_s: float = 30.0) -> None:
        """Start the process and wait until it is up (what "up" means depends on the
        service).

        :raises ServiceProcessError: it exited first or was not up within ``timeout``
            seconds (then it is killed); the message ends with the tail of its log.
        """
        if self.running:
            raise ServiceProcessError(f"{self.name} is already running (pid {self.pid})")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self.starts += 1
        argv = self.argv()
        environment = self.environment()
        header = (
            f"--- start {self.starts} of {self.name} at {time.strftime('%H:%M:%S')}: "
            f"{' '.join(argv)} ---\n"
        )
        log_file, self._run_offset = await asyncio.to_thread(self._open_log, header)
        try:
            self._process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=self.workdir,
                env=environment,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
            )
        finally:
            log_file.close()  # the child has its own copy of the descriptor
        try:
            await self._wait_ready(deadline)
        except BaseException:
            if self.running:
                await self.kill()
            raise

    def _open_log(self, header: str) -> tuple[BinaryIO, int]:
        """The log opened for appending, with ``header`` written, and where this run's
        output begins."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        log.write(header.encode())
        log.flush()
        return log, log.tell()

    async def restart(self, timeout_s: float = 30.0) -> None:
        """Start again with the same settings (and, for a headend, the same ports), once
        the last run ended (:meth:`kill`, :meth:`terminate`, or on its own).

        :raises ServiceProcessError: it is still running, or as :meth:`start`.
        """
        if self.running:
            raise ServiceProcessError(
                f"{self.name} is still running (pid {self.pid}); kill() or terminate() it "
                "before restart()"
            )
        await self.start(timeout_s)

    async def wait(self, timeout_s: float | None = None) -> int:
        """Wait for the process to exit; returns its exit status.

        :raises TimeoutError: still running after ``timeout`` seconds.
        """
        process = self._started_process()
        async with asyncio.timeout(timeout_s):
            return await process.wait()

    async def kill(self) -> int:
        """SIGKILL the process (no cleanup of any kind runs) and wait for it to be gone.
        Returns the exit status, ``-9`` unless it had already exited. Idempotent."""
        process = self._started_process()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        return await process.wait()

    async def terminate(self, timeout_s: float = 10.0) -> int:
        """SIGTERM (a clean shutdown), then SIGKILL if it has not exited within
        ``timeout`` seconds. Returns the exit status."""
        process = self._started_process()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                async with asyncio.timeout(timeout_s):
                    return await process.wait()
            except TimeoutError:
                return await self.kill()
        return process.returncode

    def _started_process(self) -> asyncio.subprocess.Process:
        if self._process is None:
            raise ServiceProcessError(f"{self.name} was never started")
        return self._process

    async def __aenter__(self: _P) -> _P:
        if not self.running:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is not None:
            await self.kill()

    # -- looking at it

    def rss_bytes(self) -> int | None:
        """The resident memory of the running process (``VmRSS`` of ``/proc/PID/status``);
        ``None`` when it is not running or there is no ``/proc`` (not Linux). procfs is
        served from kernel memory, so the read does not wait on a disk."""
        if not self.running or self.pid is None:
            return None
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, flags=re.M)
        return int(match[1]) * 1024 if match else None

    def log_text(self) -> str:
        """The whole log, every run (a blocking read: for assertion messages and after
        the process exited; :meth:`wait_for_log` reads in a thread)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    async def wait_for_log(
        self,
        pattern: str | re.Pattern[str],
        timeout_s: float = 10.0,
        *,
        count: int = 1,
        all_runs: bool = False,
    ) -> re.Match[str]:
        """Poll the log until ``pattern`` (a regex, searched with ``re.M``) has matched
        ``count`` times in the output of the current run (of every run with
        ``all_runs=True``); returns the last match.

        :raises ServiceProcessError: the process exited without logging it, or
            ``timeout_s`` seconds passed; the message ends with the log's tail.
        """
        regex = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        process = self._started_process()
        offset = 0 if all_runs else self._run_offset
        deadline = asyncio.get_running_loop().time() + timeout_s
        what = f"/{regex.pattern}/" + (f" {count} times" if count != 1 else "")
        while True:
            exited = process.returncode is not None
            text = await asyncio.to_thread(self._read_log_from, offset)
            matches = list(itertools.islice(regex.finditer(text), count))
            if len(matches) == count:
                return matches[-1]
            if exited:
                raise self._error(
                    f"{self.name} exited with status {process.returncode} before logging {what}"
                )
            if asyncio.get_running_loop().time() >= deadline:
                raise self._error(f"{self.name} did not log {what} within {timeout_s:g} s")
            await asyncio.sleep(_POLL_S)

    def _read_log_from(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _error(self, message: str) -> ServiceProcessError:
        return ServiceProcessError(
            f"{message}\n--- last lines of {self.log_path} ---\n{self.log_tail()}"
        )


async def http_status(
    host: str,
    port: int,
    path: str = "/healthz",
    timeout_s: float = 1.0,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> int | None:
    """The status code of ``GET path`` at ``host:port`` through httpx (over TLS with
    ``ssl_context``), or ``None`` when nothing answers (refused, reset, a failed TLS
    handshake, no answer within ``timeout_s`` seconds)."""
    import httpx

    scheme = "https" if ssl_context is not None else "http"
    try:
        async with httpx.AsyncClient(verify=ssl_context or True, timeout=timeout_s) as client:
            response = await client.get(f"{scheme}://{host}:{port}{path}")
    except httpx.TransportError:
        return None
    return response.status_code


class HeadendProcess(ServiceProcess):
    """``der headend`` as a child process, on 127.0.0.1.

    The ports are picked once, when this object is built (unless given), so a
    :meth:`~ServiceProcess.restart` listens where the agents already dial.
    :meth:`~ServiceProcess.start` returns once ``GET /healthz`` answers with any status
    (``503`` while storage is still unreachable counts; poll :meth:`healthz` for 200).

    With ``ssl_context`` (one that trusts the headend's certificate; pass the
    ``HEADEND_TLS_*`` variables in ``env``) ``/healthz`` is asked over HTTPS and
    :attr:`http_url` is ``https://``.
    """

    command = "headend"

    def __init__(
        self,
        assets_path: Path | str,
        database_url: str,
        workdir: Path | str,
        grpc_port: int | None = None,
        http_port: int | None = None,
        env: Mapping[str, str] | None = None,
        *,
        name: str = "headend",
        log_path: Path | str | None = None,
        log_level: str = "INFO",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """:param assets_path: the inventory (``ASSETS_PATH``).
        :param database_url: the storage (``DATABASE_URL``), e.g. ``sqlite:///{tmp}/der.db``:
            use a persistent backend to see what survives a kill.
        :param grpc_port, http_port: default: free ports picked now.
        :param ssl_context: REST is served over TLS; trust what this context trusts.
        """
        super().__init__(name, workdir=workdir, env=env, log_path=log_path, log_level=log_level)
        self.assets_path = Path(assets_path)
        self.database_url = database_url
        picked = iter(_free_ports(2))
        self.grpc_port = grpc_port if grpc_port is not None else next(picked)
        self.http_port = http_port if http_port is not None else next(picked)
        self.host = LOOPBACK
        self.ssl_context = ssl_context

    @property
    def grpc_addr(self) -> str:
        """``"127.0.0.1:PORT"``: where agents dial (``HEADEND_GRPC`` of an agent)."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``"http://127.0.0.1:PORT"`` (``https`` with TLS): the REST API."""
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.http_port}"

    def settings(self) -> dict[str, str | None]:
        return {
            "ASSETS_PATH": str(self.assets_path),
            "DATABASE_URL": self.database_url,
            "HEADEND_GRPC_ADDR": self.grpc_addr,
            "HEADEND_HTTP_ADDR": f"{self.host}:{self.http_port}",
            "RESET_DB": None,
        }

    async def healthz(self, timeout_s: float = 1.0) -> int | None:
        """The status of ``GET /healthz`` now; ``None`` when nothing answers."""
        return await http_status(
            self.host, self.http_port, "/healthz", timeout_s, ssl_context=self.ssl_context
        )

    async def _wait_ready(self, deadline: float) -> None:
        process = self._started_process()
        loop = asyncio.get_running_loop()
        while True:
            if process.returncode is not None:
                raise self._error(
                    f"{self.name} exited with status {process.returncode} before "
                    f"{self.http_url}/healthz answered"
                )
            if await self.healthz(timeout_s=max(0.1, min(1.0, deadline - loop.time()))):
                return
            if loop.time() >= deadline:
                raise self._error(f"{self.name}: {self.http_url}/healthz did not answer in time")
            await asyncio.sleep(_POLL_S)


class AgentProcess(ServiceProcess):
    """``der agent`` as a child process: gateway mode with ``site_id``, single-asset mode
    with ``asset_id`` (give exactly one).

    :meth:`~ServiceProcess.start` returns once the process runs; :meth:`wait_registered`
    waits for the agent to register with the headend.
    """

    command = "agent"

    def __init__(
        self,
        assets_path: Path | str,
        headend_addr: str,
        workdir: Path | str,
        site_id: str | None = None,
        asset_id: str | None = None,
        agent_config_path: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        *,
        gateway_id: str | None = None,
        name: str | None = None,
        log_path: Path | str | None = None,
        log_level: str = "INFO",
    ) -> None:
        """:param assets_path: the inventory (``ASSETS_PATH``).
        :param headend_addr: ``host:port`` of the headend's gRPC (``HEADEND_GRPC``): a
            :attr:`HeadendProcess.grpc_addr`, or a :attr:`TcpProxy.addr` in front of it.
        :param agent_config_path: the agent config YAML (``AGENT_CONFIG``); default: the
            built-in defaults (every asset on ``sim-bess``, telemetry every 4 s).
        :param name: default ``agent-<first 8 characters of the site or asset id>``.
        """
        if (site_id is None) == (asset_id is None):
            raise ValueError(
                "give exactly one of site_id (gateway mode) and asset_id (single-asset mode)"
            )
        served = site_id if site_id is not None else asset_id
        assert served is not None
        super().__init__(
            name or f"agent-{served[:8]}",
            workdir=workdir,
            env=env,
            log_path=log_path,
            log_level=log_level,
        )
        self.assets_path = Path(assets_path)
        self.headend_addr = headend_addr
        self.site_id = site_id
        self.asset_id = asset_id
        self.agent_config_path = Path(agent_config_path) if agent_config_path else None
        self.gateway_id = gateway_id

    def settings(self) -> dict[str, str | None]:
        return {
            "ASSETS_PATH": str(self.assets_path),
            "HEADEND_GRPC": self.headend_addr,
            "GATEWAY_SITE_ID": self.site_id,
            "ASSET_ID": self.asset_id,
            "GATEWAY_ID": self.gateway_id,
            "AGENT_CONFIG": str(self.agent_config_path) if self.agent_config_path else None,
        }

    async def wait_registered(self, timeout_s: float = 10.0, *, count: int = 1) -> re.Match[str]:
        """Until this run of the agent has logged ``count`` registrations with the headend
        (every reconnect registers again: ``count=2`` waits for the first reconnect).
        The match has groups ``headend`` (the address dialled) and ``agent_id``."""
        return await self.wait_for_log(_REGISTERED, timeout_s, count=count)
