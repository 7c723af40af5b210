"""Configuration, start and stop of the headend, and SQLite storage across restarts."""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import httpx
import pytest
from headend_kit import BESS_1, BESS_2, WAIT_S, RawAgent, make_config, sample

from der_sdk.errors import DerSdkError
from der_sdk.models import Session, utc_now
from der_sdk.plugins import Plugins, load_plugins
from der_sdk.storage.sqlite import SQLiteStorage
from der_sdk.wire import codec
from der_sdk_headend import Headend, HeadendConfig


def test_config_reads_the_environment_with_defaults(inventory_path: Path) -> None:
    config = HeadendConfig.from_env({"ASSETS_PATH": str(inventory_path), "RESET_DB": "Yes"})

    assert config.assets_path == inventory_path
    assert config.database_url == "sqlite:///der-data/der.db"
    assert config.grpc_addr == "127.0.0.1:50051"
    assert config.http_addr == "127.0.0.1:3001"
    assert config.reset_db is True
    assert config.split_policy == "capacity_weighted"
    assert config.console_confirm_share == 0.5


def test_the_default_stream_window_keeps_grpc_reading_connections_into_small_buffers(
    inventory_path: Path,
) -> None:
    """gRPC (grpcio 1.85) reads a connection into 64 KiB blocks once its estimate of the
    next read reaches 12 KiB, else into 8 KiB ones. The estimate doubles only after a read
    of more than 0.8 of it, so it stays below 2.5 times the largest read, and one read
    takes about a window (plus frame headers): the default window must keep that under
    12 KiB, or every loaded stream holds a 64 KiB block (docs/performance.md, "Memory
    per loaded stream, a fourth pass")."""
    config = HeadendConfig.from_env({"ASSETS_PATH": str(inventory_path)})
    largest_read = config.stream_window_kb * 1024 + 2 * 9  # two DATA frame headers
    assert 2.5 * largest_read < 12 * 1024


def test_headend_id_defaults_to_host_name_and_grpc_port_so_a_restart_keeps_it(
    inventory_path: Path,
) -> None:
    env = {"ASSETS_PATH": str(inventory_path), "HEADEND_GRPC_ADDR": "0.0.0.0:50061"}
    first = HeadendConfig.from_env(env)
    again = HeadendConfig.from_env(env)
    other_port = HeadendConfig.from_env({**env, "HEADEND_GRPC_ADDR": "0.0.0.0:50062"})
    chosen = HeadendConfig.from_env({**env, "HEADEND_ID": "replica-a.site_1:2"})

    assert first.headend_id == again.headend_id == f"{socket.gethostname()}:50061"
    assert other_port.headend_id == f"{socket.gethostname()}:50062"
    assert chosen.headend_id == "replica-a.site_1:2"


def test_config_without_assets_path_says_what_to_set() -> None:
    with pytest.raises(DerSdkError, match="ASSETS_PATH is not set"):
        HeadendConfig.from_env({})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HEADEND_HTTP_ADDR": "3001"}, "HEADEND_HTTP_ADDR"),
        ({"HEADEND_GRPC_ADDR": "127.0.0.1:http"}, "HEADEND_GRPC_ADDR"),
        ({"HEADEND_GRPC_ADDR": "127.0.0.1:70000"}, "outside 0..65535"),
        ({"RESET_DB": "maybe"}, "RESET_DB"),
        ({"INGEST_WRITERS": "0"}, "INGEST_WRITERS=0 must be 1..16"),
        ({"INGEST_WRITERS": "two"}, "INGEST_WRITERS"),
        ({"HEADEND_STREAM_WINDOW_KB": "2"}, "HEADEND_STREAM_WINDOW_KB=2 must be 4..1024"),
        ({"HEADEND_STREAM_WINDOW_KB": "16k"}, "HEADEND_STREAM_WINDOW_KB='16k' is not a whole"),
        ({"HEADEND_MTLS_MODE": "grpc"}, "HEADEND_MTLS_MODE='grpc' is not one of front, native"),
        ({"HEADEND_MTLS_MODE": "native"}, "HEADEND_MTLS_MODE=native .* needs HEADEND_CLIENT_CA"),
        ({"HEADEND_ID": "headend a"}, "HEADEND_ID='headend a' is not a headend id: use 1 to 128"),
        ({"HEADEND_ID": "-a"}, "HEADEND_ID='-a' is not a headend id"),
        ({"HEADEND_ID": "a/b"}, "HEADEND_ID='a/b' is not a headend id"),
        ({"HEADEND_ID": "a" * 129}, "is not a headend id: use 1 to 128"),
        ({"CONSOLE_CONFIRM_SHARE": "1.5"}, "CONSOLE_CONFIRM_SHARE=1.5 must be a share from 0 to 1"),
        ({"CONSOLE_CONFIRM_SHARE": "nan"}, "CONSOLE_CONFIRM_SHARE=nan must be a share"),
        ({"CONSOLE_CONFIRM_SHARE": "half"}, "CONSOLE_CONFIRM_SHARE='half' is not a number"),
        ({"HEADEND_COMMS_LOSS_ALARM_S": "0"}, "HEADEND_COMMS_LOSS_ALARM_S=0 must be more than 0"),
        ({"HEADEND_COMMS_LOSS_ALARM_S": "nan"}, "HEADEND_COMMS_LOSS_ALARM_S=nan must be"),
        ({"HEADEND_ALARM_DEBOUNCE_S": "-1"}, "HEADEND_ALARM_DEBOUNCE_S=-1 must be 0 to 3600"),
    ],
)
def test_config_rejects_malformed_values_naming_the_variable(
    inventory_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(DerSdkError, match=message):
        HeadendConfig.from_env({"ASSETS_PATH": str(inventory_path), **env})


async def test_an_unknown_split_policy_fails_start_listing_the_installed_ones(
    inventory_path: Path, plugins: Plugins
) -> None:
    headend = Headend(make_config(inventory_path, SPLIT_POLICY="greedy"), plugins=plugins)
    with pytest.raises(DerSdkError, match=r"SPLIT_POLICY.*greedy.*capacity_weighted, equal"):
        await headend.start()


async def test_a_busy_grpc_port_fails_start_naming_the_address(
    headend: Headend, inventory_path: Path, plugins: Plugins
) -> None:
    busy = f"127.0.0.1:{headend.grpc_port}"
    second = Headend(make_config(inventory_path, HEADEND_GRPC_ADDR=busy), plugins=plugins)
    with pytest.raises(DerSdkError, match=f"cannot listen for agents on {busy}"):
        await second.start()


async def test_a_busy_http_port_fails_start_naming_the_address(
    headend: Headend, inventory_path: Path, plugins: Plugins
) -> None:
    busy = f"127.0.0.1:{headend.http_port}"
    second = Headend(make_config(inventory_path, HEADEND_HTTP_ADDR=busy), plugins=plugins)
    with pytest.raises(DerSdkError, match=f"cannot serve REST on {busy}"):
        await second.start()


async def test_stop_ends_agent_streams_and_is_idempotent(headend: Headend) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{headend.grpc_port}") as channel:
        agent = RawAgent(channel)
        await agent.register([BESS_1])

        await headend.stop()
        await headend.stop()

        code, _ = await agent.outcome()
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
    sessions = await headend.storage.recent_sessions(BESS_1)
    assert sessions[0].disconnected_at is not None


async def test_sqlite_headend_keeps_history_and_pending_dispatches_across_restart(
    tmp_path: Path, inventory_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'der.db'}"
    plugins = load_plugins(entry_points=False, env={})
    first = Headend(make_config(inventory_path, DATABASE_URL=url), plugins=plugins)
    await first.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{first.grpc_port}") as channel,
            httpx.AsyncClient(base_url=first.http_url, timeout=WAIT_S) as http,
        ):
            agent = RawAgent(channel)
            await agent.register([BESS_1])
            await agent.telemetry(1, [sample(BESS_1, seconds=s, mw=float(s)) for s in (1, 2)])
            pending = (await http.post("/dispatch", json={"asset_id": BESS_2, "mw": 0.5})).json()
            assert pending["state"] == "submitted"
            assert (await http.get("/healthz")).json()["storage"] == "sqlite"
    finally:
        await first.stop()

    second = Headend(make_config(inventory_path, DATABASE_URL=url), plugins=plugins)
    await second.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{second.grpc_port}") as channel,
            httpx.AsyncClient(base_url=second.http_url, timeout=WAIT_S) as http,
        ):
            latest = (await http.get(f"/telemetry/{BESS_1}")).json()
            assert latest["mw"] == 2.0, "the latest cache is warmed from storage"
            history = (await http.get(f"/telemetry/{BESS_1}/history")).json()
            assert [row["mw"] for row in history] == [2.0, 1.0]
            sessions = (await http.get("/agents")).json()[0]["sessions"]
            assert sessions[0]["disconnected_at"] is not None

            agent = RawAgent(channel)
            await agent.register([BESS_2])
            setpoint = await agent.recv_kind("setpoint")
            assert setpoint.command_id == pending["dispatch_id"]
            await agent.send(
                codec.agent_setpoint_ack(
                    setpoint.command_id, "applied", [codec.Allocation(asset_id=BESS_2, mw=0.5)]
                )
            )
            await agent.end()
            record = (await http.get(f"/dispatch/{pending['dispatch_id']}")).json()
            assert record["state"] == "applied"
    finally:
        await second.stop()

    reset = Headend(make_config(inventory_path, DATABASE_URL=url, RESET_DB="1"), plugins=plugins)
    await reset.start()
    try:
        assert await reset.storage.telemetry_history(BESS_1) == []
        assert reset.ingest.latest(BESS_1) is None
    finally:
        await reset.stop()


@pytest.mark.parametrize(
    ("headend_id", "left_open"),
    [
        (None, set()),  # derived id: may differ from the last run's, so every session closes
        ("headend-a", {"s-other"}),  # configured: only its own (and those with no id)
    ],
)
async def test_a_start_closes_only_its_own_sessions_when_its_id_is_configured(
    tmp_path: Path, inventory_path: Path, headend_id: str | None, left_open: set[str]
) -> None:
    path = tmp_path / "der.db"
    storage = SQLiteStorage(str(path))
    await storage.open()
    for session_id, owner in (("s-own", "headend-a"), ("s-other", "headend-b"), ("s-old", None)):
        await storage.open_session(
            Session(
                session_id=session_id,
                asset_id=BESS_1,
                site_id="site",
                agent_id="gw",
                peer="ipv4:127.0.0.1:1",
                connected_at=utc_now(),
                headend_id=owner,
            )
        )
    await storage.close()

    env = {"DATABASE_URL": f"sqlite:///{path}"}
    if headend_id is not None:
        env["HEADEND_ID"] = headend_id
    headend = Headend(
        make_config(inventory_path, **env), plugins=load_plugins(entry_points=False, env={})
    )
    await headend.start()
    try:
        sessions = await headend.storage.recent_sessions(BESS_1)
    finally:
        await headend.stop()
    assert {s.session_id for s in sessions if s.disconnected_at is None} == left_open
    assert headend.config.headend_id_configured is (headend_id is not None)
