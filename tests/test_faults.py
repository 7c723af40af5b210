"""der_sdk.testing.faults, for real on loopback: the TCP proxy forwards, cuts, blackholes
and delays; the headend and agent run as processes that are SIGKILLed and restarted; and
the docs example of the "Fault injection" section runs."""

from __future__ import annotations

import asyncio
import re
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from der_sdk.testing import (
    AgentProcess,
    HeadendProcess,
    ServiceProcessError,
    TcpProxy,
    free_port,
)

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "testing.md"

SITE = "11111111-1111-4111-8111-111111111111"
B1 = "aaaaaaaa-0000-4000-8000-000000000001"
B2 = "aaaaaaaa-0000-4000-8000-000000000002"
INVENTORY = f"""
sites:
  - {{site_id: {SITE}, name: Test Yard}}
assets:
  - {{asset_id: {B1}, site_id: {SITE}, name: B1, capacity_mwh: 2, max_mw: 0.5, min_mw: -0.5}}
  - {{asset_id: {B2}, site_id: {SITE}, name: B2, capacity_mwh: 4, max_mw: 2, min_mw: -2}}
"""
FAST_AGENT = """
telemetry_interval_s: 0.2
heartbeat_interval_s: 0.5
reconnect_initial_s: 0.05
reconnect_max_s: 0.3
"""

PROMPT_S = 1.0  # what "at once" may take on a loaded CI machine
SILENCE_S = 0.3  # how long a blackholed read waits to prove nothing comes back


# --------------------------------------------------------------------------- echo server


class EchoServer:
    """Echoes every byte back; closes when the client half-closes. Counts connections
    and records how each one ended: "eof" (a FIN) or "reset" (a RST)."""

    def __init__(self) -> None:
        self.connections = 0
        self.endings: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.create_task(self._echo(reader, writer), name="echo")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            self.endings.append("eof")
        except ConnectionResetError:
            self.endings.append("reset")
        finally:
            self._writers.discard(writer)
            writer.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


@pytest_asyncio.fixture
async def echo_server() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    yield server
    await server.close()


@pytest_asyncio.fixture
async def proxy(echo_server: EchoServer) -> AsyncIterator[TcpProxy]:
    async with TcpProxy("127.0.0.1", echo_server.port) as p:
        yield p


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(proxy: TcpProxy) -> Connection:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def round_trip(conn: Connection, payload: bytes = b"ping") -> bytes:
    reader, writer = conn
    writer.write(payload)
    await writer.drain()
    return await reader.readexactly(len(payload))


async def ends_promptly(reader: asyncio.StreamReader) -> str:
    """How the connection ended: "reset" or "eof"; fails if it is still open."""
    try:
        async with asyncio.timeout(PROMPT_S):
            data = await reader.read(65536)
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        pytest.fail(f"the connection was still open {PROMPT_S} s later")
    assert data == b"", data
    return "eof"


async def stays_silent(reader: asyncio.StreamReader) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(SILENCE_S):
            data = await reader.read(65536)
            pytest.fail(f"expected silence, got {data!r}")


async def close(conn: Connection) -> None:
    conn[1].transport.abort()


async def eventually(
    probe: Callable[[], Awaitable[bool]], what: str, within_s: float = PROMPT_S
) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        if await probe():
            return
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {within_s} s waiting for {what}")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- TcpProxy


async def test_proxy_listens_on_an_ephemeral_loopback_port(proxy: TcpProxy) -> None:
    assert proxy.port > 0
    assert proxy.addr == f"127.0.0.1:{proxy.port}"
    assert proxy.mode == "forward"


async def test_proxy_forwards_bytes_both_ways_and_counts_them(
    proxy: TcpProxy, echo_server: EchoServer
) -> None:
    conn = await connect(proxy)

    assert await round_trip(conn, b"hello") == b"hello"
    assert await round_trip(conn, b"x" * 200_000) == b"x" * 200_000

    assert proxy.connections_accepted == 1
    assert proxy.active_connections == 1
    assert echo_server.connections == 1
    assert proxy.bytes_up == proxy.bytes_down == 200_005
    await close(conn)


async def test_proxy_passes_a_half_close_on_and_forgets_the_connection(proxy: TcpProxy) -> None:
    reader, writer = await connect(proxy)
    writer.write(b"last words")
    writer.write_eof()  # the echo server closes once it sees our FIN

    assert await reader.read() == b"last words"

    async def forgotten() -> bool:
        return proxy.active_connections == 0

    await eventually(forgotten, "the proxy to forget the connection")
    writer.close()


async def test_cut_resets_open_connections_and_refuses_new_ones_until_healed(
    proxy: TcpProxy, echo_server: EchoServer
) -> None:
    open_before = await connect(proxy)
    assert await round_trip(open_before) == b"ping"

    proxy.cut()

    assert proxy.mode == "cut"
    assert await ends_promptly(open_before[0]) == "reset"
    assert proxy.active_connections == 0
    during = await connect(proxy)  # accepted by the kernel, then reset by the proxy
    assert await ends_promptly(during[0]) == "reset"
    assert echo_server.connections == 1, "a refused connection never reaches the target"

    proxy.heal()

    after = await connect(proxy)
    assert await round_trip(after, b"again") == b"again"
    assert proxy.connections_accepted == 3
    for conn in (open_before, during, after):
        await close(conn)


async def test_cut_resets_the_target_side_too(proxy: TcpProxy, echo_server: EchoServer) -> None:
    conn = await connect(proxy)
    assert await round_trip(conn) == b"ping"

    proxy.cut()

    assert await ends_promptly(conn[0]) == "reset"

    async def target_saw_it() -> bool:
        return echo_server.endings == ["reset"]

    await eventually(target_saw_it, "the target to see a reset")
    await close(conn)


async def test_blackhole_keeps_connections_open_but_nothing_comes_back(
    proxy: TcpProxy, echo_server: EchoServer
) -> None:
    before = await connect(proxy)
    assert await round_trip(before) == b"ping"

    proxy.blackhole()

    assert proxy.mode == "blackhole"
    before[1].write(b"anyone there?")
    await before[1].drain()
    await stays_silent(before[0])
    assert not before[1].is_closing() and not before[0].at_eof(), "no FIN, no RST"
    during = await connect(proxy)  # accepted, but it never reaches the target
    during[1].write(b"hello?")
    await during[1].drain()
    await stays_silent(during[0])
    assert echo_server.connections == 1
    assert proxy.active_connections == 2
    assert proxy.bytes_discarded == len(b"anyone there?") + len(b"hello?")

    proxy.heal()

    # The blackholed connections lost bytes: healing resets them, like a real outage.
    assert await ends_promptly(before[0]) == "reset"
    assert await ends_promptly(during[0]) == "reset"
    after = await connect(proxy)
    assert await round_trip(after, b"back") == b"back"
    for conn in (before, during, after):
        await close(conn)


async def test_blackhole_passes_no_fin_on(proxy: TcpProxy, echo_server: EchoServer) -> None:
    reader, writer = await connect(proxy)
    assert await round_trip((reader, writer)) == b"ping"
    proxy.blackhole()

    writer.write_eof()  # forwarded, the echo server would close and we would read EOF

    await stays_silent(reader)
    assert not reader.at_eof()
    assert echo_server.endings == [], "the target saw no FIN"
    proxy.heal()
    assert await ends_promptly(reader) == "reset"
    writer.transport.abort()


async def test_delay_adds_one_way_latency_in_order(proxy: TcpProxy) -> None:
    conn = await connect(proxy)
    loop = asyncio.get_running_loop()

    proxy.delay(0.2)

    assert proxy.mode == "delay" and proxy.delay_s == 0.2
    started = loop.time()
    assert await round_trip(conn, b"slow") == b"slow"
    assert loop.time() - started >= 0.38  # 0.2 s each way
    reader, writer = conn
    for i in range(5):  # separate chunks, a little apart: each keeps its place
        writer.write(f"<{i}>".encode())
        await writer.drain()
        await asyncio.sleep(0.02)
    assert await reader.readexactly(15) == b"<0><1><2><3><4>"

    proxy.heal()

    started = loop.time()
    assert await round_trip(conn, b"fast") == b"fast"
    assert loop.time() - started < 0.2
    await close(conn)


async def test_delay_rejects_a_negative_latency(proxy: TcpProxy) -> None:
    with pytest.raises(ValueError, match="delay must be >= 0"):
        proxy.delay(-1)


async def test_a_refusing_target_shows_as_a_reset_to_the_client() -> None:
    async with TcpProxy("127.0.0.1", free_port()) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await ends_promptly(reader) == "reset"
        assert proxy.active_connections == 0
        writer.transport.abort()


async def test_close_resets_everything_and_stops_listening(echo_server: EchoServer) -> None:
    proxy = await TcpProxy("127.0.0.1", echo_server.port).start()
    forwarding = await connect(proxy)
    assert await round_trip(forwarding) == b"ping"
    proxy.blackhole()
    blackholed = await connect(proxy)

    await proxy.close()

    assert await ends_promptly(forwarding[0]) == "reset"
    assert await ends_promptly(blackholed[0]) == "reset"
    assert proxy.active_connections == 0
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", proxy.port)
    await proxy.close()  # idempotent
    for conn in (forwarding, blackholed):
        await close(conn)


def test_free_port_is_a_port_nothing_listens_on() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # would fail if taken
        assert 0 < port < 65536


def test_parallel_workers_get_free_ports_from_bands_the_os_never_hands_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker's port is not one a bind to port 0 or an outgoing connection (of any
    process) can take, nor one another worker gives, nor one given again soon."""
    from der_sdk.testing import faults

    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    given: dict[str, set[int]] = {}
    for worker in ("gw0", "gw1", "gw7"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        ports = [free_port() for _ in range(100)]
        assert len(set(ports)) == 100, "a port given twice"
        assert all(port in faults._port_band() for port in ports)
        assert not any(low <= port <= high for port in ports)
        given[worker] = set(ports)
    assert not given["gw0"] & given["gw1"] and not given["gw1"] & given["gw7"]


# --------------------------------------------------------------------------- processes


@pytest.fixture
def inventory_path(tmp_path: Path) -> Path:
    path = tmp_path / "assets.yaml"
    path.write_text(INVENTORY)
    return path


@pytest.fixture
def agent_config_path(tmp_path: Path) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(FAST_AGENT)
    return path


@pytest_asyncio.fixture
async def headend(inventory_path: Path, tmp_path: Path) -> AsyncIterator[HeadendProcess]:
    process = HeadendProcess(inventory_path, f"sqlite:///{tmp_path / 'der.db'}", tmp_path)
    async with process:
        yield process


async def test_headend_process_is_killed_with_sigkill_and_restarts_on_its_ports(
    headend: HeadendProcess, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(base_url=headend.http_url, timeout=5.0) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert [a["asset_id"] for a in (await http.get("/assets")).json()] == [B1, B2]
        first_pid = headend.pid
        rss = headend.rss_bytes()
        assert rss is None or rss > 10_000_000  # a Python process with grpc loaded

        assert await headend.kill() == -9

        assert headend.returncode == -9 and not headend.running
        assert headend.rss_bytes() is None
        assert await headend.healthz() is None
        ports = (headend.grpc_port, headend.http_port)

        await headend.restart()

        assert headend.pid != first_pid and headend.running
        assert (headend.grpc_port, headend.http_port) == ports
        assert headend.http_url == f"http://127.0.0.1:{headend.http_port}"
        assert headend.grpc_addr == f"127.0.0.1:{headend.grpc_port}"
        assert (await http.get("/healthz")).status_code == 200

    await headend.wait_for_log(r"headend ready")  # this run's line, logged just after
    log = headend.log_text()
    assert headend.log_path == tmp_path / "headend.log"
    assert "--- start 1 of headend" in log and "--- start 2 of headend" in log
    assert log.count("headend ready") == 2
    assert await headend.terminate() == 0  # SIGTERM: a clean shutdown
    assert "stop signal received" in headend.log_text()


async def test_headend_restart_refuses_while_running(headend: HeadendProcess) -> None:
    with pytest.raises(ServiceProcessError, match=r"still running .*kill\(\) or terminate\(\)"):
        await headend.restart()


async def test_headend_that_exits_at_start_raises_with_its_log(tmp_path: Path) -> None:
    headend = HeadendProcess(tmp_path / "missing.yaml", "memory://", tmp_path)

    with pytest.raises(ServiceProcessError) as failure:
        await headend.start()

    message = str(failure.value)
    assert re.search(
        r"headend exited with status 2 before http://127\.0\.0\.1:\d+/healthz", message
    )
    assert "missing.yaml" in message.split("--- last lines of", 1)[1], message
    assert headend.returncode == 2


async def test_headend_start_times_out_with_its_log_and_kills_it(
    inventory_path: Path, tmp_path: Path
) -> None:
    headend = HeadendProcess(inventory_path, "memory://", tmp_path)

    with pytest.raises(ServiceProcessError, match="did not answer in time"):
        await headend.start(timeout_s=0.2)

    assert headend.returncode == -9, "a start that timed out leaves no process behind"


async def test_agent_process_registers_in_gateway_mode_and_dies_with_sigkill(
    headend: HeadendProcess, inventory_path: Path, agent_config_path: Path, tmp_path: Path
) -> None:
    agent = AgentProcess(
        inventory_path,
        headend.grpc_addr,
        tmp_path,
        site_id=SITE,
        agent_config_path=agent_config_path,
        env={"ASSET_ID": ""},  # an empty ASSET_ID is unset: gateway mode still
    )
    assert agent.name == "agent-11111111"
    async with agent, httpx.AsyncClient(base_url=headend.http_url, timeout=5.0) as http:
        match = await agent.wait_registered()
        assert match["headend"] == headend.grpc_addr
        assert match["agent_id"] == f"gateway-{SITE}"
        assert re.search(r"registered with headend .*: 2 asset\(s\) accepted", agent.log_text())

        async def connected() -> set[str]:
            rows = (await http.get("/agents")).json()
            return {row["asset_id"] for row in rows if row["connected"]}

        async def both_connected() -> bool:
            return await connected() == {B1, B2}

        async def none_connected() -> bool:
            return not await connected()

        await eventually(both_connected, "both assets connected at the headend", 10)

        assert await agent.kill() == -9
        assert agent.returncode == -9

        await eventually(none_connected, "the headend to see the stream break", 10)

        await agent.restart()
        await agent.wait_registered()
        assert agent.log_text().count("registered with headend") == 2


async def test_agent_wait_for_log_raises_with_the_log_when_the_agent_exits(
    inventory_path: Path, tmp_path: Path
) -> None:
    unknown_site = "99999999-9999-4999-8999-999999999999"
    agent = AgentProcess(inventory_path, f"127.0.0.1:{free_port()}", tmp_path, site_id=unknown_site)

    async with agent:
        with pytest.raises(ServiceProcessError) as failure:
            await agent.wait_registered()

    message = str(failure.value)
    assert "exited with status 2 before logging" in message
    assert f"GATEWAY_SITE_ID {unknown_site} is not in the inventory" in message


async def test_agent_wait_for_log_times_out_with_the_log(
    inventory_path: Path, agent_config_path: Path, tmp_path: Path
) -> None:
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens: it never registers
    async with AgentProcess(
        inventory_path, nobody, tmp_path, asset_id=B1, agent_config_path=agent_config_path
    ) as agent:
        with pytest.raises(ServiceProcessError, match=r"did not log /registered.*/ within 0\.5 s"):
            await agent.wait_registered(timeout_s=0.5)
        assert agent.running

    assert agent.returncode == -9, "the context manager kills it"


def test_agent_process_needs_exactly_one_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of site_id"):
        AgentProcess(tmp_path / "a.yaml", "127.0.0.1:1", tmp_path)
    with pytest.raises(ValueError, match="exactly one of site_id"):
        AgentProcess(tmp_path / "a.yaml", "127.0.0.1:1", tmp_path, site_id=SITE, asset_id=B1)


def test_process_environment_layers_settings_over_the_inherited_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASSET_ID", B1)  # left over in a shell: must not switch the mode
    monkeypatch.setenv("AGENT_CONFIG", "/elsewhere.yaml")
    agent = AgentProcess(
        tmp_path / "a.yaml", "127.0.0.1:1", tmp_path, site_id=SITE, env={"LOG_EXTRA": "1"}
    )

    env = agent.environment()

    assert env["GATEWAY_SITE_ID"] == SITE and env["HEADEND_GRPC"] == "127.0.0.1:1"
    assert "ASSET_ID" not in env and "AGENT_CONFIG" not in env
    assert env["LOG_EXTRA"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert agent.argv()[-3:] == ["--log-level", "INFO", "agent"]


# --------------------------------------------------------------------------- the docs


def _fault_injection_example() -> str:
    guide = GUIDE.read_text(encoding="utf-8")
    section = guide.split("\n## Fault injection\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Fault injection section of docs/testing.md shows one example"
    return str(blocks[0])


async def test_the_fault_injection_docs_example_runs(tmp_path: Path) -> None:
    module = types.ModuleType("doc_example_fault_injection")
    exec(compile(_fault_injection_example(), str(GUIDE), "exec"), module.__dict__)
    tests = [value for name, value in vars(module).items() if name.startswith("test_")]

    assert len(tests) == 1
    await tests[0](tmp_path)
