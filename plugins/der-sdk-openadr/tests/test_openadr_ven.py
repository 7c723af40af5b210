"""The OpenADR 2.0b VEN end to end: openleadr's own VTN (OpenADRServer) on loopback, a
reference headend running the ``openadr2b`` program, a real agent with simulated
batteries (sim-bess) over gRPC. Nothing here is mocked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from openleadr import OpenADRServer

from der_sdk.plugins import Plugins, load_plugins
from der_sdk.testing.faults import free_port
from der_sdk.testing.inventory import DEFAULT_ASSET_IDS, DEFAULT_INVENTORY_YAML, DEFAULT_SITE_ID
from der_sdk.testing.waits import wait_until
from der_sdk_agent.testing.agent_link import AgentRunner
from der_sdk_headend import Headend
from der_sdk_headend.testing import headend_config, running_headend

VEN_NAME = "north-yard"
VEN_ID = "VEN_NORTH"
BESS_1, BESS_2, BESS_3 = DEFAULT_ASSET_IDS
WAIT_S = 20.0


@dataclass
class Vtn:
    """openleadr's VTN with handlers that record what the VEN sent."""

    port: int
    tls: dict[str, Any] = field(default_factory=dict)
    server: OpenADRServer = field(init=False)
    registrations: list[dict[str, Any]] = field(default_factory=list)
    opts: list[tuple[str, str]] = field(default_factory=list)  # (event id, opt type)
    reports: list[tuple[str, float]] = field(default_factory=list)  # (resource id, value)
    running: bool = False

    def __post_init__(self) -> None:
        self.server = OpenADRServer(
            vtn_id="TEST_VTN",
            http_host="127.0.0.1",
            http_port=self.port,
            requested_poll_freq=timedelta(seconds=1),
            show_fingerprint=False,
            show_server_cert_domain=False,
            **self.tls,
        )
        self.server.add_handler("on_create_party_registration", self._register)
        self.server.add_handler("on_register_report", self._register_report)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/OpenADR2/Simple/2.0b"

    async def _register(self, registration_info: dict[str, Any]) -> tuple[str, str] | bool:
        self.registrations.append(registration_info)
        if registration_info.get("ven_name") != VEN_NAME:
            return False
        return VEN_ID, "REG_NORTH"

    async def _register_report(
        self,
        ven_id: str,
        resource_id: str,
        measurement: str,
        unit: str,
        scale: str,
        min_sampling_interval: timedelta,
        max_sampling_interval: timedelta,
    ) -> tuple[Any, timedelta]:
        async def on_update(data: list[tuple[datetime, float]]) -> None:
            self.reports.extend((resource_id, value) for _, value in data)

        return on_update, min_sampling_interval

    def _opted(self, ven_id: str, event_id: str, opt_type: str) -> None:
        self.opts.append((event_id, opt_type))
        # openleadr's VTN forgets an event's callback after its first response; listen on,
        # to record a VEN that changes its mind later (another oadrCreatedEvent)
        self.server.event_callbacks[event_id] = (None, self._opted)

    def add_simple_event(self, level: int, start_in_s: float, duration_s: float) -> str:
        start = datetime.now(UTC) + timedelta(seconds=start_in_s)
        return str(
            self.server.add_event(
                ven_id=VEN_ID,
                signal_name="SIMPLE",
                signal_type="level",
                intervals=[
                    {
                        "dtstart": start,
                        "duration": timedelta(seconds=duration_s),
                        "signal_payload": level,
                    }
                ],
                callback=self._opted,
            )
        )

    async def start(self) -> None:
        await self.server.run()
        self.running = True

    async def stop(self) -> None:
        if self.running:
            await self.server.stop()
            self.running = False


@pytest_asyncio.fixture
async def vtn() -> AsyncIterator[Vtn]:
    server = Vtn(port=free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _inventory(vtn: Vtn) -> str:
    return (
        DEFAULT_INVENTORY_YAML
        + f"""\
programs:
  - name: utility-dr
    source: openadr2b
    sites: [{DEFAULT_SITE_ID}]
    options:
      vtn_url: "{vtn.url}"
      ven_name: {VEN_NAME}
      poll_interval_s: 0.3
      report_interval_s: 1
      levels: {{0: 0.0, 1: 1.0, 2: 2.0, 3: 3.5}}
"""
    )


@pytest.fixture
def plugins() -> Plugins:
    plugins = load_plugins(env={})
    assert "openadr2b" in plugins.program_sources, "der-sdk-openadr is installed"
    assert "sim-bess" in plugins.adapter_types
    return plugins


@pytest_asyncio.fixture
async def headend(tmp_path: Path, vtn: Vtn, plugins: Plugins) -> AsyncIterator[Headend]:
    path = tmp_path / "assets.yaml"
    path.write_text(_inventory(vtn))
    config = headend_config(path, {"HEADEND_ALARM_DEBOUNCE_S": "0"})
    async with running_headend(config, plugins) as headend:
        yield headend


@pytest_asyncio.fixture
async def http(headend: Headend) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=headend.http_url, timeout=10) as client:
        yield client


@pytest_asyncio.fixture
async def agent(headend: Headend, plugins: Plugins, http: httpx.AsyncClient) -> AsyncIterator[Any]:
    runner = AgentRunner(headend, plugins, http)
    try:
        yield await runner(adapter_type="sim-bess", telemetry_interval_s=0.2)
    finally:
        await runner.close()


async def _registered(vtn: Vtn, headend: Headend) -> None:
    async def probe() -> bool:
        programs = headend.programs
        return programs is not None and programs.health()[0].connected is True

    await wait_until(probe, "the VEN registered with the VTN", timeout_s=WAIT_S)
    assert vtn.registrations[0]["ven_name"] == VEN_NAME


async def _program_dispatches(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    history = (await http.get("/dispatch/history")).json()
    return [d for d in history if d["source"] == "program:utility-dr"]


async def test_an_event_from_the_vtn_is_applied_at_the_battery_and_the_vtn_hears_back(
    vtn: Vtn, headend: Headend, http: httpx.AsyncClient, agent: Any
) -> None:
    await _registered(vtn, headend)
    event_id = vtn.add_simple_event(level=2, start_in_s=3.0, duration_s=8.0)

    opted = await wait_until(
        lambda: _first(vtn.opts), "the VEN's opt response at the VTN", timeout_s=WAIT_S
    )
    assert opted == (event_id, "optIn")
    (dispatch,) = await wait_until(
        lambda: _nonempty(_program_dispatches(http)), "the program's site dispatch"
    )
    assert dispatch["external_id"] == f"{event_id}/{DEFAULT_SITE_ID}"
    assert dispatch["site_id"] == DEFAULT_SITE_ID
    assert dispatch["steps"] == [{"offset_s": 0.0, "mw": 2.0}]  # level 2 → 2 MW
    shares = {t["asset_id"]: t["mw"] for t in dispatch["targets"]}
    assert sum(shares.values()) == pytest.approx(2.0)

    async def applied_at_the_batteries() -> bool:
        latest = [headend.ingest.latest(a) for a in DEFAULT_ASSET_IDS]
        return all(
            s is not None and s.mw_setpoint == pytest.approx(shares[s.asset_id]) for s in latest
        )

    await wait_until(applied_at_the_batteries, "the event's MW at the batteries", timeout_s=WAIT_S)

    async def reported_discharge() -> bool:
        return any(r == DEFAULT_SITE_ID and v > 1.5 for r, v in vtn.reports)

    await wait_until(reported_discharge, "the site's MW in a report at the VTN", timeout_s=WAIT_S)

    async def completed() -> dict[str, Any] | None:
        record = (await http.get(f"/dispatch/{dispatch['dispatch_id']}")).json()
        return record if record["state"] == "completed" else None

    await wait_until(completed, "the event's dispatch completed", timeout_s=WAIT_S)
    audit = (await http.get("/audit", params={"action": "dispatch.create"})).json()
    assert audit[0]["details"]["via"] == "program:utility-dr"
    assert audit[0]["details"]["external_id"] == dispatch["external_id"]


async def test_the_ven_opts_out_while_an_operator_holds_the_site(
    vtn: Vtn, headend: Headend, http: httpx.AsyncClient
) -> None:
    await _registered(vtn, headend)
    manual = await http.post("/dispatch", json={"asset_id": BESS_2, "mw": -0.5, "duration_s": 600})
    assert manual.status_code == 202

    event_id = vtn.add_simple_event(level=1, start_in_s=5.0, duration_s=60.0)
    opted = await wait_until(lambda: _first(vtn.opts), "the VEN's opt response", timeout_s=WAIT_S)
    assert opted == (event_id, "optOut")
    assert await _program_dispatches(http) == []
    held = [
        r
        for r in (await http.get("/audit", params={"action": "dispatch.create"})).json()
        if r["outcome"] == "held"
    ]
    assert held and manual.json()["dispatch_id"] in held[0]["message"]


async def test_an_operator_dispatch_supersedes_the_event_and_the_ven_opts_out_afterwards(
    vtn: Vtn, headend: Headend, http: httpx.AsyncClient
) -> None:
    await _registered(vtn, headend)
    event_id = vtn.add_simple_event(level=1, start_in_s=30.0, duration_s=60.0)
    await wait_until(lambda: _first(vtn.opts), "the VEN opted in", timeout_s=WAIT_S)
    assert vtn.opts == [(event_id, "optIn")]

    manual = await http.post(
        "/dispatch", json={"site_id": DEFAULT_SITE_ID, "mw": 0.0, "duration_s": 300}
    )
    assert manual.status_code == 202

    async def opted_out() -> bool:
        return (event_id, "optOut") in vtn.opts

    await wait_until(opted_out, "the VEN's later optOut at the VTN", timeout_s=WAIT_S)
    (dispatch,) = await _program_dispatches(http)
    assert dispatch["state"] == "superseded"
    assert dispatch["superseded_by"] == manual.json()["dispatch_id"]


async def test_a_vtn_that_goes_away_degrades_health_and_raises_an_alarm_until_it_is_back(
    vtn: Vtn, headend: Headend, http: httpx.AsyncClient
) -> None:
    await _registered(vtn, headend)
    vtn.add_simple_event(level=1, start_in_s=60.0, duration_s=60.0)
    (dispatch,) = await wait_until(
        lambda: _nonempty(_program_dispatches(http)), "the event's dispatch", timeout_s=WAIT_S
    )

    await vtn.stop()

    async def degraded() -> dict[str, Any] | None:
        response = await http.get("/healthz")
        return response.json() if response.status_code == 503 else None

    health = await wait_until(degraded, "/healthz degraded", timeout_s=WAIT_S)
    assert "program utility-dr (openadr2b) has lost its server" in health["reason"]
    assert vtn.url in health["reason"]

    async def alarms(state: str) -> list[dict[str, Any]] | None:
        found = (
            await http.get("/alarms", params={"code": "program_comms_loss", "state": state})
        ).json()
        return found if len(found) == len(DEFAULT_ASSET_IDS) else None

    await wait_until(lambda: alarms("active"), "program_comms_loss raised", timeout_s=WAIT_S)
    kept = (await http.get(f"/dispatch/{dispatch['dispatch_id']}")).json()
    assert kept["state"] == "scheduled", "the schedule the program has is kept"

    await vtn.start()

    async def healthy() -> bool:
        return (await http.get("/healthz")).status_code == 200

    await wait_until(healthy, "/healthz ok again", timeout_s=WAIT_S)
    await wait_until(lambda: alarms("cleared"), "program_comms_loss cleared", timeout_s=WAIT_S)


async def test_a_cancelled_event_cancels_its_dispatch(
    vtn: Vtn, headend: Headend, http: httpx.AsyncClient
) -> None:
    await _registered(vtn, headend)
    event_id = vtn.add_simple_event(level=2, start_in_s=60.0, duration_s=60.0)
    (dispatch,) = await wait_until(
        lambda: _nonempty(_program_dispatches(http)), "the event's dispatch", timeout_s=WAIT_S
    )
    vtn.server.cancel_event(VEN_ID, event_id)

    async def cancelled() -> bool:
        record = (await http.get(f"/dispatch/{dispatch['dispatch_id']}")).json()
        return bool(record["state"] == "cancelled")

    await wait_until(cancelled, "the dispatch cancelled with its event", timeout_s=WAIT_S)
    assert (event_id, "optOut") not in vtn.opts


async def _first(items: list[Any]) -> Any:
    await asyncio.sleep(0)
    return items[0] if items else None


async def _nonempty(found: Any) -> Any:
    items = await found
    return items or None


async def test_an_operator_dispatch_cuts_a_running_event_at_the_battery_and_the_ven_opts_out(
    vtn: Vtn, headend: Headend, http: httpx.AsyncClient, agent: Any
) -> None:
    await _registered(vtn, headend)
    event_id = vtn.add_simple_event(level=1, start_in_s=1.0, duration_s=120.0)
    (dispatch,) = await wait_until(
        lambda: _nonempty(_program_dispatches(http)), "the event's dispatch", timeout_s=WAIT_S
    )

    async def state_is(wanted: str) -> bool:
        record = (await http.get(f"/dispatch/{dispatch['dispatch_id']}")).json()
        return bool(record["state"] == wanted)

    await wait_until(lambda: state_is("active"), "the event running", timeout_s=WAIT_S)
    manual = await http.post("/dispatch", json={"asset_id": BESS_1, "mw": -1.0, "duration_s": 60})
    assert manual.status_code == 202

    async def cut() -> dict[str, Any] | None:
        record = (await http.get(f"/dispatch/{dispatch['dispatch_id']}")).json()
        targets = {t["asset_id"]: t["state"] for t in record["targets"]}
        return record if targets[BESS_1] == "superseded" else None

    record = await wait_until(cut, "the event cut on BESS 1 by the agent", timeout_s=WAIT_S)
    assert record["superseded_by"] == manual.json()["dispatch_id"]
    assert {t["asset_id"]: t["state"] for t in record["targets"]} == {
        BESS_1: "superseded",
        BESS_2: "active",
        BESS_3: "active",
    }, "the assets the operator did not touch run on"

    async def manual_applied() -> bool:
        sample = headend.ingest.latest(BESS_1)
        return sample is not None and sample.mw_setpoint == pytest.approx(-1.0)

    await wait_until(manual_applied, "the operator's MW at the battery", timeout_s=WAIT_S)

    async def opted_out() -> bool:
        return (event_id, "optOut") in vtn.opts

    await wait_until(opted_out, "the VEN's optOut at the VTN", timeout_s=WAIT_S)


@pytest_asyncio.fixture
async def tls_vtn(tmp_path: Path) -> AsyncIterator[tuple[Vtn, dict[str, str]]]:
    """openleadr's VTN over mutual TLS with signed messages, certificates from der-sdk's
    development CA (`der certs`): the VTN's server certificate signs its messages, the
    VEN's client certificate (known to the VTN by fingerprint) signs the VEN's."""
    from openleadr.service.vtn_service import VTNService
    from openleadr.utils import certificate_fingerprint

    from der_sdk.certs import init_ca, issue_agent, issue_headend

    certs = tmp_path / "certs"
    ca = init_ca(certs)
    server = issue_headend(certs, ["127.0.0.1"])
    ven = issue_agent(certs, DEFAULT_SITE_ID, agent_id=VEN_NAME)
    ven_fingerprint = certificate_fingerprint(ven.cert_pem)

    def ven_lookup(ven_id: str) -> dict[str, str]:
        return {
            "ven_id": VEN_ID,
            "ven_name": VEN_NAME,
            "fingerprint": ven_fingerprint,
            "registration_id": "REG_NORTH",
        }

    vtn = Vtn(
        port=free_port(),
        tls={
            "cert": str(server.cert_path),
            "key": str(server.key_path),
            "http_cert": str(server.cert_path),
            "http_key": str(server.key_path),
            "http_ca_file": str(ca.cert_path),
            "ven_lookup": ven_lookup,
        },
    )
    await vtn.start()
    try:
        yield (
            vtn,
            {
                "cert": str(ven.cert_path),
                "key": str(ven.key_path),
                "ca_file": str(ca.cert_path),
                "vtn_fingerprint": certificate_fingerprint(server.cert_pem),
            },
        )
    finally:
        await vtn.stop()
        # openleadr keeps these on the service class: do not leak them into other tests
        for name in ("ven_lookup",):
            if name in vars(VTNService):
                delattr(VTNService, name)


async def test_the_ven_talks_to_a_vtn_over_mutual_tls_with_signed_messages(
    tls_vtn: tuple[Vtn, dict[str, str]], tmp_path: Path, plugins: Plugins
) -> None:
    vtn, ven_certs = tls_vtn
    options = "\n".join(f'      {k}: "{v}"' for k, v in ven_certs.items())
    path = tmp_path / "assets.yaml"
    path.write_text(_inventory(vtn) + options + "\n")
    async with running_headend(headend_config(path), plugins) as headend:
        await _registered(vtn, headend)
        assert vtn.registrations[0]["fingerprint"] == certificate_fingerprint_of(ven_certs)
        event_id = vtn.add_simple_event(level=1, start_in_s=60.0, duration_s=60.0)
        opted = await wait_until(
            lambda: _first(vtn.opts), "the signed optIn at the VTN", timeout_s=WAIT_S
        )
        assert opted == (event_id, "optIn")


def certificate_fingerprint_of(ven_certs: dict[str, str]) -> str:
    from openleadr.utils import certificate_fingerprint

    return str(certificate_fingerprint(Path(ven_certs["cert"]).read_bytes()))
