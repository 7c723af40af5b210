"""One behaviour suite for every built-in storage backend (``memory://`` and SQLite)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio

from der_sdk.errors import DerSdkError, UnknownNameError
from der_sdk.models import (
    Dispatch,
    DispatchEvent,
    DispatchTarget,
    Event,
    Heartbeat,
    Session,
    TelemetrySample,
)
from der_sdk.plugins import Plugins, load_plugins
from der_sdk.storage import StorageBackend, open_storage
from der_sdk.storage.sqlite import SQLiteStorage, sqlite_path_from_url

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
ASSET_A = "00000000-0000-0000-0000-00000000000a"
ASSET_B = "00000000-0000-0000-0000-00000000000b"
SITE = "site-1"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def sample(asset_id: str, seconds: float, mw: float = 1.0, **fields: object) -> TelemetrySample:
    return TelemetrySample(asset_id=asset_id, site_id=SITE, ts=at(seconds), mw=mw, **fields)  # type: ignore[arg-type]


def dispatch(
    dispatch_id: str,
    seconds: float,
    *,
    asset_id: str | None = None,
    site_id: str | None = None,
    state: str = "pending",
    targets: tuple[str, ...] = (),
) -> Dispatch:
    return Dispatch(
        dispatch_id=dispatch_id,
        mw=2.0,
        state=state,  # type: ignore[arg-type]
        created_at=at(seconds),
        updated_at=at(seconds),
        asset_id=asset_id,
        site_id=site_id,
        targets=[DispatchTarget(asset_id=a, mw=1.0) for a in targets],
    )


def session(session_id: str, asset_id: str, seconds: float) -> Session:
    return Session(
        session_id=session_id,
        asset_id=asset_id,
        site_id=SITE,
        agent_id="agent-1",
        peer="ipv4:127.0.0.1:5000",
        connected_at=at(seconds),
    )


def heartbeat(asset_id: str, seconds: float) -> Heartbeat:
    return Heartbeat(
        asset_id=asset_id, site_id=SITE, agent_id="agent-1", ts=at(seconds), uptime_s=seconds
    )


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return load_plugins(entry_points=False)


@pytest.fixture(params=["memory", "sqlite"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    return f"sqlite:///{tmp_path}/data/der.db"  # absolute path: sqlite:////tmp/...


@pytest_asyncio.fixture
async def storage(storage_url: str, plugins: Plugins) -> AsyncIterator[StorageBackend]:
    backend = open_storage(storage_url, plugins)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


# --------------------------------------------------------------------------- telemetry


async def test_history_by_range_includes_start_and_excludes_end(storage: StorageBackend) -> None:
    await storage.append_telemetry([sample(ASSET_A, s) for s in range(5)])
    await storage.append_telemetry([sample(ASSET_B, 2)])

    found = await storage.telemetry_history(ASSET_A, start=at(1), end=at(3))

    assert [s.ts for s in found] == [at(2), at(1)]
    assert all(s.asset_id == ASSET_A for s in found)
    assert [s.ts for s in await storage.telemetry_history(ASSET_A, start=at(3))] == [at(4), at(3)]
    assert [s.ts for s in await storage.telemetry_history(ASSET_A, end=at(1))] == [at(0)]
    assert await storage.telemetry_history("unknown") == []


async def test_history_is_newest_first_and_limited(storage: StorageBackend) -> None:
    await storage.append_telemetry([sample(ASSET_A, s) for s in (3, 0, 4, 1, 2)])

    found = await storage.telemetry_history(ASSET_A, limit=3)

    assert [s.ts for s in found] == [at(4), at(3), at(2)]


async def test_history_accepts_bounds_in_other_time_zones(storage: StorageBackend) -> None:
    await storage.append_telemetry([sample(ASSET_A, s) for s in range(3)])
    plus_two = timezone(timedelta(hours=2))

    found = await storage.telemetry_history(ASSET_A, start=at(1).astimezone(plus_two))

    assert [s.ts for s in found] == [at(2), at(1)]
    assert all(s.ts.tzinfo is not None and s.ts.utcoffset() == timedelta(0) for s in found)


async def test_reappending_the_same_samples_stores_them_once(storage: StorageBackend) -> None:
    batch = [sample(ASSET_A, s) for s in range(3)]

    assert await storage.append_telemetry(batch) == 3
    assert await storage.append_telemetry(batch) == 0
    assert await storage.append_telemetry([*batch, sample(ASSET_A, 3)]) == 1
    assert len(await storage.telemetry_history(ASSET_A)) == 4


async def test_duplicates_within_one_batch_count_once(storage: StorageBackend) -> None:
    assert await storage.append_telemetry([sample(ASSET_A, 0), sample(ASSET_A, 0, mw=9.0)]) == 1
    assert await storage.append_telemetry([]) == 0

    (stored,) = await storage.telemetry_history(ASSET_A)
    assert stored.mw == 1.0  # the first sample for a timestamp wins


async def test_latest_telemetry_is_the_newest_sample_per_asset(storage: StorageBackend) -> None:
    assert await storage.latest_telemetry() == {}
    await storage.append_telemetry([sample(ASSET_A, s, mw=s) for s in (0, 5, 2)])
    await storage.append_telemetry([sample(ASSET_B, 1, mw=-3.0)])

    latest = await storage.latest_telemetry()

    assert set(latest) == {ASSET_A, ASSET_B}
    assert (latest[ASSET_A].ts, latest[ASSET_A].mw) == (at(5), 5.0)
    assert (latest[ASSET_B].ts, latest[ASSET_B].mw) == (at(1), -3.0)


async def test_sample_fields_and_details_round_trip_with_unknown_keys(
    storage: StorageBackend,
) -> None:
    details = {"soc_pct": 55.5, "future_field": {"nested": [1, "two", None]}, "flag": True}
    original = sample(
        ASSET_A,
        0.000001,
        mw=-2.25,
        mw_setpoint=-2.5,
        online=False,
        status="charging",
        fault_code="F12",
        seq=42,
        quality="uncertain",
        quality_reason="stale register",
        details=details,
    )
    await storage.append_telemetry([original])

    (stored,) = await storage.telemetry_history(ASSET_A)

    assert stored == original
    assert stored.details == details
    assert stored.ts.tzinfo is not None and stored.ts.utcoffset() == timedelta(0)


# --------------------------------------------------------------------------- dispatch


async def test_save_get_and_replace_dispatch(storage: StorageBackend) -> None:
    record = dispatch("d1", 0, site_id=SITE, targets=(ASSET_A, ASSET_B))
    assert await storage.get_dispatch("d1") is None

    await storage.save_dispatch(record)
    assert await storage.get_dispatch("d1") == record

    record.state = "applied"
    record.updated_at = at(10)
    record.targets = [DispatchTarget(asset_id=ASSET_A, mw=2.0, state="applied", applied_mw=2.0)]
    await storage.save_dispatch(record)

    stored = await storage.get_dispatch("d1")
    assert stored == record
    assert stored is not None and stored.created_at.utcoffset() == timedelta(0)
    # The replaced targets no longer match the asset that was dropped.
    assert await storage.dispatch_history(asset_id=ASSET_B) == []


async def test_dispatch_history_filters_by_asset_site_and_state(storage: StorageBackend) -> None:
    await storage.save_dispatch(dispatch("to-a", 1, asset_id=ASSET_A, site_id=SITE))
    await storage.save_dispatch(dispatch("to-b", 2, asset_id=ASSET_B, site_id=SITE, state="sent"))
    await storage.save_dispatch(dispatch("site", 3, site_id=SITE, targets=(ASSET_A, ASSET_B)))
    await storage.save_dispatch(dispatch("other-site", 4, site_id="site-2", targets=("x",)))

    async def ids(**filters: str) -> list[str]:
        return [d.dispatch_id for d in await storage.dispatch_history(**filters)]  # type: ignore[arg-type]

    assert await ids() == ["other-site", "site", "to-b", "to-a"]
    assert await ids(asset_id=ASSET_A) == ["site", "to-a"]
    assert await ids(site_id=SITE) == ["site", "to-b", "to-a"]
    assert await ids(state="sent") == ["to-b"]
    assert await ids(asset_id=ASSET_B, state="pending") == ["site"]
    assert await ids(site_id="site-2", asset_id=ASSET_A) == []
    assert [d.dispatch_id for d in await storage.dispatch_history(limit=2)] == [
        "other-site",
        "site",
    ]


async def test_dispatch_events_are_oldest_first(storage: StorageBackend) -> None:
    for state, seconds in (("sent", 2), ("pending", 1), ("applied", 3)):
        await storage.record_dispatch_event(
            DispatchEvent(dispatch_id="d1", state=state, ts=at(seconds))  # type: ignore[arg-type]
        )
    await storage.record_dispatch_event(
        DispatchEvent(dispatch_id="d2", state="failed", ts=at(0), detail="no route")
    )

    events = await storage.dispatch_events("d1")

    assert [(e.state, e.ts) for e in events] == [
        ("pending", at(1)),
        ("sent", at(2)),
        ("applied", at(3)),
    ]
    assert await storage.dispatch_events("d2") == [
        DispatchEvent(dispatch_id="d2", state="failed", ts=at(0), detail="no route")
    ]
    assert await storage.dispatch_events("unknown") == []


# --------------------------------------------------------------------------- presence


async def test_sessions_open_close_and_recent_newest_first(storage: StorageBackend) -> None:
    for session_id, seconds in (("s1", 0), ("s2", 10), ("s3", 20)):
        await storage.open_session(session(session_id, ASSET_A, seconds))
    await storage.open_session(session("other", ASSET_B, 5))

    await storage.close_session("s1", at(5))
    await storage.close_session("s1", at(99))  # already closed: no-op
    await storage.close_session("unknown", at(99))  # unknown: no-op

    recent = await storage.recent_sessions(ASSET_A)
    assert [s.session_id for s in recent] == ["s3", "s2", "s1"]
    assert [s.disconnected_at for s in recent] == [None, None, at(5)]
    assert [s.session_id for s in await storage.recent_sessions(ASSET_A, limit=2)] == ["s3", "s2"]

    assert await storage.close_open_sessions(at(30)) == 3
    assert await storage.close_open_sessions(at(40)) == 0
    recent = await storage.recent_sessions(ASSET_A)
    assert [s.disconnected_at for s in recent] == [at(30), at(30), at(5)]
    assert recent[0] == msgspec.structs.replace(session("s3", ASSET_A, 20), disconnected_at=at(30))


async def test_heartbeats_latest_and_history(storage: StorageBackend) -> None:
    assert await storage.latest_heartbeat(ASSET_A) is None
    await storage.append_heartbeats([heartbeat(ASSET_A, s) for s in (0, 2, 1)])
    await storage.append_heartbeats([heartbeat(ASSET_A, 2), heartbeat(ASSET_B, 9)])  # 2 again

    assert await storage.latest_heartbeat(ASSET_A) == heartbeat(ASSET_A, 2)
    history = await storage.heartbeat_history(ASSET_A)
    assert [h.ts for h in history] == [at(2), at(1), at(0)]
    ranged = await storage.heartbeat_history(ASSET_A, start=at(1), end=at(2))
    assert [h.ts for h in ranged] == [at(1)]
    assert [h.ts for h in await storage.heartbeat_history(ASSET_A, limit=1)] == [at(2)]


# --------------------------------------------------------------------------- events


async def test_events_filter_by_asset_and_kind_newest_first(storage: StorageBackend) -> None:
    refused = Event(ts=at(1), kind="registration_refused", message="unknown asset")
    gap = Event(ts=at(2), kind="telemetry_gap", message="gap", asset_id=ASSET_A, data={"s": 5})
    fault = Event(ts=at(3), kind="fault", message="F12", asset_id=ASSET_A, site_id=SITE)
    other = Event(ts=at(4), kind="fault", message="F1", asset_id=ASSET_B)
    for event in (refused, gap, fault, other):
        await storage.append_event(event)

    assert await storage.events() == [other, fault, gap, refused]
    assert await storage.events(asset_id=ASSET_A) == [fault, gap]
    assert await storage.events(kind="fault") == [other, fault]
    assert await storage.events(asset_id=ASSET_A, kind="fault") == [fault]
    assert await storage.events(limit=1) == [other]


# --------------------------------------------------------------------------- lifecycle


async def test_reset_clears_everything(storage: StorageBackend) -> None:
    await storage.append_telemetry([sample(ASSET_A, 0)])
    await storage.save_dispatch(dispatch("d1", 0, site_id=SITE, targets=(ASSET_A,)))
    await storage.record_dispatch_event(DispatchEvent(dispatch_id="d1", state="sent", ts=at(0)))
    await storage.open_session(session("s1", ASSET_A, 0))
    await storage.append_heartbeats([heartbeat(ASSET_A, 0)])
    await storage.append_event(Event(ts=at(0), kind="fault", message="F1", asset_id=ASSET_A))

    await storage.reset()

    assert await storage.telemetry_history(ASSET_A) == []
    assert await storage.latest_telemetry() == {}
    assert await storage.get_dispatch("d1") is None
    assert await storage.dispatch_history(asset_id=ASSET_A) == []
    assert await storage.dispatch_events("d1") == []
    assert await storage.recent_sessions(ASSET_A) == []
    assert await storage.latest_heartbeat(ASSET_A) is None
    assert await storage.events() == []
    # Still usable after the reset.
    assert await storage.append_telemetry([sample(ASSET_A, 0)]) == 1
    assert await storage.healthy()


async def test_naive_datetimes_are_refused(storage: StorageBackend) -> None:
    naive = sample(ASSET_A, 0)
    naive.ts = naive.ts.replace(tzinfo=None)

    with pytest.raises(ValueError, match="timezone-aware"):
        await storage.append_telemetry([sample(ASSET_A, 1), naive])
    assert await storage.telemetry_history(ASSET_A) == []  # the batch stored nothing


async def test_sqlite_data_survives_close_and_reopen(tmp_path: Path, plugins: Plugins) -> None:
    url = f"sqlite:///{tmp_path}/der.db"
    first = open_storage(url, plugins)
    await first.open()
    await first.append_telemetry([sample(ASSET_A, 0, details={"soc_pct": 50.0})])
    await first.save_dispatch(dispatch("d1", 0, site_id=SITE, targets=(ASSET_A,)))
    await first.open_session(session("s1", ASSET_A, 0))
    await first.close()

    second = open_storage(url, plugins)
    await second.open()
    try:
        assert await second.telemetry_history(ASSET_A) == [
            sample(ASSET_A, 0, details={"soc_pct": 50.0})
        ]
        assert [d.dispatch_id for d in await second.dispatch_history(asset_id=ASSET_A)] == ["d1"]
        assert await second.close_open_sessions(at(1)) == 1
        assert await second.append_telemetry([sample(ASSET_A, 0)]) == 0
    finally:
        await second.close()


async def test_sqlite_relative_path_is_created_under_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plugins: Plugins
) -> None:
    monkeypatch.chdir(tmp_path)
    backend = open_storage("sqlite:///nested/dir/der.db", plugins)
    await backend.open()
    try:
        assert await backend.append_telemetry([sample(ASSET_A, 0)]) == 1
    finally:
        await backend.close()
    assert (tmp_path / "nested" / "dir" / "der.db").is_file()


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///relative/path.db", "relative/path.db"),
        ("sqlite:////absolute/path.db", "/absolute/path.db"),
        ("sqlite://:memory:", ":memory:"),
        ("sqlite:///:memory:", ":memory:"),
    ],
)
def test_sqlite_url_forms(url: str, path: str) -> None:
    assert sqlite_path_from_url(url) == path
    assert SQLiteStorage.from_url(url).path == path


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite://host/db", "sqlite:/x.db"])
def test_sqlite_rejects_malformed_urls(url: str) -> None:
    with pytest.raises(DerSdkError, match=r"use sqlite:///relative/path\.db"):
        sqlite_path_from_url(url)


async def test_sqlite_in_memory_database_works(plugins: Plugins) -> None:
    backend = open_storage("sqlite://:memory:", plugins)
    await backend.open()
    try:
        assert await backend.append_telemetry([sample(ASSET_A, 0)]) == 1
        assert len(await backend.telemetry_history(ASSET_A)) == 1
    finally:
        await backend.close()


async def test_backend_names_and_health(storage: StorageBackend, storage_url: str) -> None:
    assert storage.name == storage_url.split(":", 1)[0]
    assert await storage.healthy()


def test_unknown_url_scheme_lists_installed_schemes(plugins: Plugins) -> None:
    with pytest.raises(UnknownNameError) as raised:
        open_storage("mongodb://localhost/der", plugins)

    assert raised.value.name == "mongodb"
    assert {"memory", "sqlite"} <= set(raised.value.installed)
    assert "memory" in str(raised.value) and "sqlite" in str(raised.value)
