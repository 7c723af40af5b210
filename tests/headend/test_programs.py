"""Program sources at the headend (docs/programs.md): the ``der_program_sources`` hook,
the ``programs:`` section of the inventory, the supervised run, the dispatch path with
its limits, audit and precedence rule, the lifecycle reported back, health and alarms."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import pytest_asyncio

from der_sdk import hookimpl
from der_sdk.errors import ConfigError, DerSdkError
from der_sdk.inventory import parse_inventory
from der_sdk.models import Dispatch
from der_sdk.plugins import Plugins, load_plugins
from der_sdk.programs import (
    PROGRAM_COMMS_LOSS,
    ProgramContext,
    ProgramDispatch,
    ProgramRefusedError,
    ProgramSource,
    ProgramSourceType,
)
from der_sdk.testing.inventory import DEFAULT_ASSET_IDS, DEFAULT_INVENTORY_YAML, DEFAULT_SITE_ID
from der_sdk.testing.waits import wait_until
from der_sdk_headend import Headend
from der_sdk_headend.testing import headend_config, running_headend

BESS_1, BESS_2, BESS_3 = DEFAULT_ASSET_IDS


class ScriptedOptions(msgspec.Struct, forbid_unknown_fields=True):
    server: str
    fail_runs: int = 0


class ScriptedSource(ProgramSource):
    """A program source the test drives through its context."""

    def __init__(self, ctx: ProgramContext, options: ScriptedOptions) -> None:
        self.ctx = ctx
        self.options = options
        self.runs = 0
        self.changes: list[Dispatch] = []
        self.closed = asyncio.Event()
        self.running = asyncio.Event()

    async def run(self) -> None:
        self.runs += 1
        if self.runs <= self.options.fail_runs:
            raise RuntimeError(f"upstream {self.options.server} said no (run {self.runs})")
        self.ctx.report_health(True, f"connected to {self.options.server}")
        self.running.set()
        await self.closed.wait()

    async def dispatch_changed(self, dispatch: Dispatch) -> None:
        self.changes.append(dispatch)

    async def close(self) -> None:
        self.closed.set()


class ScriptedPlugin:
    def __init__(self) -> None:
        self.sources: dict[str, ScriptedSource] = {}

    @hookimpl
    def der_program_sources(self) -> list[ProgramSourceType]:
        return [
            ProgramSourceType(
                name="scripted", factory=self.build, options=ScriptedOptions, description="test"
            )
        ]

    def build(self, ctx: ProgramContext, options: ScriptedOptions) -> ScriptedSource:
        source = ScriptedSource(ctx, options)
        self.sources[ctx.program] = source
        return source


def _inventory(programs: str) -> str:
    return DEFAULT_INVENTORY_YAML + programs


PROGRAMS = f"""\
programs:
  - name: utility-dr
    source: scripted
    sites: [{DEFAULT_SITE_ID}]
    options: {{server: "https://utility.test"}}
"""


@pytest.fixture
def plugin() -> ScriptedPlugin:
    return ScriptedPlugin()


@pytest.fixture
def plugins(plugin: ScriptedPlugin) -> Plugins:
    return load_plugins(entry_points=False, extra=[("scripted-programs", plugin)], env={})


@pytest.fixture
def programs_yaml() -> str:
    """The ``programs:`` section of the inventory; a test parametrizes its own."""
    return PROGRAMS


@pytest.fixture
def database_url() -> str:
    return "memory://"


@pytest_asyncio.fixture
async def headend(
    tmp_path: Path, plugins: Plugins, programs_yaml: str, database_url: str
) -> AsyncIterator[Headend]:
    path = tmp_path / "assets.yaml"
    path.write_text(_inventory(programs_yaml))
    env = {
        "HEADEND_ALARM_DEBOUNCE_S": "0",
        "DATABASE_URL": database_url.format(tmp=tmp_path),
    }
    async with running_headend(headend_config(path, env), plugins) as headend:
        yield headend


@pytest_asyncio.fixture
async def http(headend: Headend) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=headend.http_url, timeout=10) as client:
        yield client


async def _running(plugin: ScriptedPlugin, name: str = "utility-dr") -> ScriptedSource:
    async def probe() -> ScriptedSource | None:
        source = plugin.sources.get(name)
        return source if source is not None and source.running.is_set() else None

    return await wait_until(probe, f"program {name} running")


def _later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def _audit(http: httpx.AsyncClient, action: str) -> list[dict[str, Any]]:
    response = await http.get("/audit", params={"action": action})
    assert response.status_code == 200, response.text
    return list(response.json())


# ----------------------------------------------------------------------------- the hook


def test_the_hook_registers_program_sources_by_name(plugins: Plugins) -> None:
    assert "scripted" in plugins.program_sources
    assert plugins.program_sources.get("scripted").options is ScriptedOptions


def test_a_duplicate_program_source_name_names_both_packages(plugin: ScriptedPlugin) -> None:
    with pytest.raises(DerSdkError, match="duplicate program source 'scripted'"):
        _ = load_plugins(extra=[("one", plugin), ("two", ScriptedPlugin())], env={}).program_sources


# ----------------------------------------------------------------------------- config


def _parse(programs: str, plugins: Plugins) -> Any:
    return parse_inventory(
        _inventory(programs),
        "assets.yaml",
        program_sources={s.name: s.options for s in plugins.program_sources},
    )


def test_the_programs_section_gives_each_program_its_scope(plugins: Plugins) -> None:
    inventory = _parse(
        f"""\
programs:
  - name: dr
    source: scripted
    assets: [{BESS_2.upper()}]
    options: {{server: x}}
""",
        plugins,
    )
    (program,) = inventory.programs
    assert program.asset_ids == (BESS_2,)
    sites, assets = inventory.program_scope(program)
    assert sites == [] and [a.asset_id for a in assets] == [BESS_2]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            f"  - name: dr\n    source: nope\n    sites: [{DEFAULT_SITE_ID}]\n",
            "assets.yaml:28: programs[0].source: unknown program source 'nope'; installed: "
            "scripted",
        ),
        (
            f"  - name: dr\n    source: scripted\n    sites: [{DEFAULT_SITE_ID}]\n"
            "    options: {server: x, fail_runs: many}\n",
            "assets.yaml:30: programs[0].options.fail_runs: invalid options for program source "
            "'scripted': expected int, got str (its options: server, fail_runs)",
        ),
        (
            "  - name: dr\n    source: scripted\n"
            "    sites: [6f1c2b1e-3d4a-4c5b-8e9f-0a1b2c3d4e5f]\n    options: {server: x}\n",
            "assets.yaml:29: programs[0].sites: sites[0]: unknown site "
            "6f1c2b1e-3d4a-4c5b-8e9f-0a1b2c3d4e5f; declare it under 'sites'",
        ),
        (
            "  - name: dr\n    source: scripted\n    options: {server: x}\n",
            "programs[0].sites: a program needs a scope",
        ),
        (
            f"  - name: dr\n    source: scripted\n    sites: [{DEFAULT_SITE_ID}]\n"
            "    options: {server: x}\n"
            f"  - name: dr\n    source: scripted\n    sites: [{DEFAULT_SITE_ID}]\n"
            "    options: {server: y}\n",
            "programs[1].name: duplicate program 'dr': also on line 27",
        ),
    ],
)
def test_a_bad_program_entry_is_refused_naming_file_line_and_field(
    plugins: Plugins, entry: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _parse("programs:\n" + entry, plugins)
    assert expected in str(caught.value)


# ----------------------------------------------------------------------------- dispatches


async def test_a_program_dispatch_is_planned_recorded_and_audited_like_rest(
    headend: Headend, http: httpx.AsyncClient, plugin: ScriptedPlugin
) -> None:
    source = await _running(plugin)
    assert [a.asset_id for a in source.ctx.assets] == sorted(DEFAULT_ASSET_IDS)
    dispatch = await source.ctx.schedule(
        ProgramDispatch(
            external_id="event-1/signal-0",
            site_id=DEFAULT_SITE_ID,
            mw=3.5,
            start_at=_later(60),
            duration_s=600,
            reason="peak event",
        )
    )
    assert dispatch.source == "program:utility-dr"
    assert dispatch.external_id == "event-1/signal-0"
    assert dispatch.policy == "capacity_weighted", "split like any site dispatch"
    assert {t.asset_id: t.mw for t in dispatch.targets} == {BESS_1: 2.0, BESS_2: 1.0, BESS_3: 0.5}
    assert dispatch.state == "scheduled"  # no agent serves the site yet

    shown = (await http.get(f"/dispatch/{dispatch.dispatch_id}")).json()
    assert shown["external_id"] == "event-1/signal-0"
    assert shown["source"] == "program:utility-dr"
    (record,) = await _audit(http, "dispatch.create")
    assert record["actor"] == {"kind": "program", "name": "utility-dr", "role": None}
    assert record["outcome"] == "ok"
    assert record["details"]["via"] == "program:utility-dr"
    assert record["details"]["external_id"] == "event-1/signal-0"
    assert record["details"]["dispatch_id"] == dispatch.dispatch_id


async def test_a_program_can_never_ask_an_asset_beyond_its_limits(
    headend: Headend, http: httpx.AsyncClient, plugin: ScriptedPlugin
) -> None:
    source = await _running(plugin)
    for control in (
        ProgramDispatch(external_id="big", asset_id=BESS_1, mw=50.0, start_at=_later(60)),
        ProgramDispatch(external_id="huge", site_id=DEFAULT_SITE_ID, mw=-9, start_at=_later(60)),
    ):
        with pytest.raises(ProgramRefusedError, match="is outside the limits of") as caught:
            await source.ctx.schedule(control)
        assert caught.value.kind == "invalid"
    refused = await _audit(http, "dispatch.create")
    assert [r["outcome"] for r in refused] == ["refused", "refused"]
    assert "[-2, 2] MW" in refused[1]["message"] and "[-3.5, 3.5] MW" in refused[0]["message"]
    assert (await http.get("/dispatch/history")).json() == []


async def test_the_same_control_again_is_the_same_dispatch_and_a_changed_one_replaces_it(
    headend: Headend, http: httpx.AsyncClient, plugin: ScriptedPlugin
) -> None:
    source = await _running(plugin)
    start = _later(120)
    control = ProgramDispatch(
        external_id="ctl-7", site_id=DEFAULT_SITE_ID, mw=1.5, start_at=start, duration_s=300
    )
    first = await source.ctx.schedule(control)
    again = await source.ctx.schedule(control)
    assert again.dispatch_id == first.dispatch_id

    changed = await source.ctx.schedule(msgspec.structs.replace(control, mw=-1.0))
    assert changed.dispatch_id != first.dispatch_id
    old = (await http.get(f"/dispatch/{first.dispatch_id}")).json()
    assert old["state"] == "cancelled"
    assert "program utility-dr: control ctl-7 changed upstream" in str(old["events"])
    assert [d.dispatch_id for d in await source.ctx.open_dispatches()] == [changed.dispatch_id]

    cancelled = await source.ctx.cancel("ctl-7", "event cancelled upstream")
    assert cancelled is not None and cancelled.state == "cancelled"
    assert await source.ctx.open_dispatches() == []
    assert await source.ctx.cancel("ctl-7", "again") is None
    cancels = await _audit(http, "dispatch.cancel")
    assert [r["details"]["via"] for r in cancels] == ["program:utility-dr"] * 2


@pytest.mark.parametrize(
    "programs_yaml",
    [
        f"""\
programs:
  - name: one-asset
    source: scripted
    assets: [{BESS_3}]
    options: {{server: x}}
"""
    ],
)
async def test_a_program_cannot_reach_beyond_its_scope(
    headend: Headend, http: httpx.AsyncClient, plugin: ScriptedPlugin
) -> None:
    source = await _running(plugin, "one-asset")
    for control in (
        ProgramDispatch(external_id="a", asset_id=BESS_1, mw=1.0, start_at=_later(60)),
        ProgramDispatch(external_id="s", site_id=DEFAULT_SITE_ID, mw=1.0, start_at=_later(60)),
    ):
        with pytest.raises(ProgramRefusedError) as caught:
            await source.ctx.schedule(control)
        assert caught.value.kind == "out_of_scope"
        assert "not in the scope of program one-asset" in str(caught.value)
    refused = await _audit(http, "dispatch.create")
    assert [r["outcome"] for r in refused] == ["refused", "refused"]
    assert (await http.get("/dispatch/history")).json() == []


async def test_a_control_that_already_started_starts_now_for_what_is_left_of_it(
    headend: Headend, plugin: ScriptedPlugin
) -> None:
    source = await _running(plugin)
    from der_sdk.models import ScheduleStep

    dispatch = await source.ctx.schedule(
        ProgramDispatch(
            external_id="late",
            asset_id=BESS_2,
            start_at=datetime.now(UTC) - timedelta(seconds=90),
            duration_s=300,
            steps=[
                ScheduleStep(offset_s=0, mw=0.2),
                ScheduleStep(offset_s=60, mw=0.4),
                ScheduleStep(offset_s=120, mw=0.6),
            ],
        )
    )
    assert dispatch.start_at is not None
    assert abs((dispatch.start_at - datetime.now(UTC)).total_seconds()) < 5
    assert dispatch.duration_s is not None and 205 < dispatch.duration_s <= 210
    assert dispatch.steps is not None
    assert [s.mw for s in dispatch.steps] == [0.4, 0.6]
    assert dispatch.steps[0].offset_s == 0 and 25 < dispatch.steps[1].offset_s <= 30

    with pytest.raises(ProgramRefusedError, match="ended at") as caught:
        await source.ctx.schedule(
            ProgramDispatch(
                external_id="over", asset_id=BESS_2, mw=0.1, start_at=_later(-600), duration_s=60
            )
        )
    assert caught.value.kind == "invalid"


# ----------------------------------------------------------------------------- precedence


async def test_a_manual_dispatch_holds_its_assets_against_programs_for_its_duration(
    headend: Headend, http: httpx.AsyncClient, plugin: ScriptedPlugin
) -> None:
    source = await _running(plugin)
    manual = await http.post("/dispatch", json={"asset_id": BESS_1, "mw": 0.5, "duration_s": 900})
    assert manual.status_code == 202, manual.text
    manual_id = manual.json()["dispatch_id"]

    control = ProgramDispatch(
        external_id="peak", site_id=DEFAULT_SITE_ID, mw=2.0, start_at=_later(60), duration_s=600
    )
    with pytest.raises(ProgramRefusedError) as caught:
        await source.ctx.schedule(control)
    assert caught.value.kind == "held" and caught.value.held_by == manual_id
    assert f"manual dispatch {manual_id} (rest) holds asset {BESS_1}" in str(caught.value)
    with pytest.raises(ProgramRefusedError):  # asked again: held again, audited once
        await source.ctx.schedule(control)
    held = [r for r in await _audit(http, "dispatch.create") if r["outcome"] == "held"]
    assert len(held) == 1 and held[0]["details"]["via"] == "program:utility-dr"

    # after the hold: a control that starts when the manual dispatch has ended is made
    after = await source.ctx.schedule(
        ProgramDispatch(
            external_id="later", asset_id=BESS_1, mw=1.0, start_at=_later(1000), duration_s=60
        )
    )
    assert after.state == "scheduled"
    # an asset the manual dispatch does not hold is free
    other = await source.ctx.schedule(
        ProgramDispatch(external_id="b2", asset_id=BESS_2, mw=1.0, start_at=_later(60))
    )
    assert other.state == "scheduled"


async def test_a_manual_dispatch_without_a_duration_holds_nothing(
    headend: Headend, http: httpx.AsyncClient, plugin: ScriptedPlugin
) -> None:
    source = await _running(plugin)
    manual = await http.post("/dispatch", json={"asset_id": BESS_1, "mw": 0.5})
    assert manual.status_code == 202
    made = await source.ctx.schedule(
        ProgramDispatch(external_id="p", asset_id=BESS_1, mw=1.0, start_at=_later(60))
    )
    assert made.source == "program:utility-dr"


async def test_a_manual_dispatch_supersedes_a_waiting_program_dispatch_and_the_source_hears(
    headend: Headend, http: httpx.AsyncClient, plugin: ScriptedPlugin
) -> None:
    source = await _running(plugin)
    program = await source.ctx.schedule(
        ProgramDispatch(
            external_id="evt", asset_id=BESS_2, mw=1.0, start_at=_later(30), duration_s=600
        )
    )
    manual = await http.post("/dispatch", json={"asset_id": BESS_2, "mw": -0.5, "duration_s": 120})
    assert manual.status_code == 202, manual.text

    async def superseded() -> Dispatch | None:
        return next((d for d in source.changes if d.state == "superseded"), None)

    seen = await wait_until(superseded, "the source told its dispatch was superseded")
    assert seen.dispatch_id == program.dispatch_id
    assert seen.external_id == "evt"
    assert seen.superseded_by == manual.json()["dispatch_id"]
    assert source.changes[0].state == "scheduled", "every change is told, in order"


# ----------------------------------------------------------------------------- supervision


@pytest.mark.parametrize(
    "programs_yaml",
    [
        f"""\
programs:
  - name: flaky
    source: scripted
    sites: [{DEFAULT_SITE_ID}]
    options: {{server: "https://flaky.test", fail_runs: 2}}
"""
    ],
)
async def test_a_source_whose_run_raises_is_logged_with_its_plugin_and_started_again(
    headend: Headend,
    http: httpx.AsyncClient,
    plugin: ScriptedPlugin,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from der_sdk_headend.programs import runner

    assert runner.RESTART_INITIAL_S == 1.0
    source = await wait_until(
        lambda: _some(plugin.sources.get("flaky"), lambda s: s.running.is_set()),
        "the flaky source running after two failed runs",
        timeout_s=15,
    )
    assert source.runs == 3
    records = {id(r): r for r in caplog.get_records("setup") + caplog.get_records("call")}
    failures = [
        r
        for r in records.values()
        if r.levelno == logging.ERROR and "run() raised" in r.getMessage()
    ]
    assert len(failures) == 2
    assert (
        "program flaky: source scripted (scripted-programs): run() raised"
        in failures[0].getMessage()
    )
    health = (await http.get("/healthz")).json()
    assert health["status"] == "ok"
    (program,) = health["programs"]
    assert program["restarts"] == 2 and program["connected"] is True


async def _some(value: Any, check: Any) -> Any:
    return value if value is not None and check(value) else None


async def test_a_source_that_loses_its_server_degrades_healthz_and_raises_an_alarm(
    headend: Headend, http: httpx.AsyncClient, plugin: ScriptedPlugin
) -> None:
    source = await _running(plugin)
    waiting = await source.ctx.schedule(
        ProgramDispatch(external_id="keep", asset_id=BESS_1, mw=1.0, start_at=_later(300))
    )
    source.ctx.report_health(False, "https://utility.test: connection refused")

    response = await http.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert "program utility-dr (scripted) has lost its server" in body["reason"]
    assert "keeps running the schedule it has" in body["reason"]
    assert body["programs"][0]["connected"] is False

    async def alarms(state: str) -> list[dict[str, Any]] | None:
        found = (
            await http.get("/alarms", params={"code": PROGRAM_COMMS_LOSS, "state": state})
        ).json()
        return found if len(found) == len(DEFAULT_ASSET_IDS) else None

    raised = await wait_until(lambda: alarms("active"), "program_comms_loss for each asset")
    assert {a["asset_id"] for a in raised} == set(DEFAULT_ASSET_IDS)
    assert "program utility-dr: https://utility.test: connection refused" in raised[0]["text"]
    kept = (await http.get(f"/dispatch/{waiting.dispatch_id}")).json()
    assert kept["state"] == "scheduled", "the schedule it has is kept"

    source.ctx.report_health(True, "back")
    await wait_until(lambda: alarms("cleared"), "program_comms_loss cleared for each asset")
    response = await http.get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"


async def test_the_headend_closes_its_sources_when_it_stops(
    headend: Headend, plugin: ScriptedPlugin
) -> None:
    source = await _running(plugin)
    await headend.stop()
    assert source.closed.is_set()


# ----------------------------------------------------------------------------- storage


@pytest.mark.parametrize("database_url", ["sqlite:///{tmp}/der.db"])
async def test_the_external_id_is_stored_and_a_restarted_headend_knows_the_control(
    headend: Headend, plugins: Plugins, plugin: ScriptedPlugin, tmp_path: Path
) -> None:
    source = await _running(plugin)
    control = ProgramDispatch(
        external_id="evt-42", asset_id=BESS_1, mw=1.0, start_at=_later(300), duration_s=60
    )
    made = await source.ctx.schedule(control)
    await headend.stop()

    again = Headend(headend.config, plugins=plugins)
    await again.start()
    try:
        stored = await again.storage.get_dispatch(made.dispatch_id)
        assert stored is not None and stored.external_id == "evt-42"
        source = await _running(plugin)
        assert (await source.ctx.schedule(control)).dispatch_id == made.dispatch_id
    finally:
        await again.stop()


async def test_the_console_dispatch_view_shows_the_program_and_its_upstream_id(
    headend: Headend, http: httpx.AsyncClient, plugin: ScriptedPlugin
) -> None:
    source = await _running(plugin)
    made = await source.ctx.schedule(
        ProgramDispatch(external_id="evt-9/sig-0", asset_id=BESS_2, mw=1.0, start_at=_later(90))
    )
    table = await http.get("/console/dispatch/history", headers={"HX-Request": "true"})
    assert table.status_code == 200, table.text
    row = table.text.split(f'id="dispatch-{made.dispatch_id}"', 1)[1].split("</tr>", 1)[0]
    assert "program:utility-dr" in row
    assert 'data-external-id="evt-9/sig-0"' in row
    page = await http.get(f"/console/assets/{BESS_2}")
    assert 'data-external-id="evt-9/sig-0"' in page.text


async def test_a_cluster_replica_refuses_to_run_programs(tmp_path: Path, plugins: Plugins) -> None:
    path = tmp_path / "assets.yaml"
    path.write_text(_inventory(PROGRAMS))
    config = headend_config(path, {"HEADEND_BUS_URL": "memory://p23-programs"})
    headend = Headend(config, plugins=plugins)
    with pytest.raises(DerSdkError, match="does not run programs yet"):
        await headend.start()


@pytest.mark.parametrize("database_url", ["sqlite:///{tmp}/der.db"])
async def test_an_alarm_left_active_by_a_previous_run_clears_when_the_program_connects(
    headend: Headend, plugins: Plugins, plugin: ScriptedPlugin
) -> None:
    source = await _running(plugin)
    source.ctx.report_health(False, "down when the headend stopped")

    async def active(h: Headend) -> list[Any] | None:
        found = await h.storage.alarms(code=PROGRAM_COMMS_LOSS, state="active")
        return found or None

    await wait_until(lambda: active(headend), "program_comms_loss raised")
    await headend.stop()

    async with running_headend(headend.config, plugins) as again:
        await _running(plugin)  # the new source reports it is connected

        async def cleared() -> bool:
            return await active(again) is None

        await wait_until(cleared, "the stale program_comms_loss cleared")
