"""The agent link over TLS and mutual TLS, with agents bound to sites by certificate or
token: real TLS over loopback TCP, certificates from :mod:`der_sdk.certs`.

The negative matrix, and what each refusal leaves behind:

* refused in the TLS handshake (no client certificate, self-signed, another CA, expired,
  not yet valid, plaintext): the headend's TLS front refuses the connection before any
  request exists, and records an ``agent.refused`` audit record (``stage: tls``) with the
  peer and the reason, and nothing else;
* refused by the servicer (a valid certificate or token for another site, a foreign asset,
  a site bound to nobody, a missing or wrong token): one ``agent.refused`` audit record
  and one ``registration_refused`` event, and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from headend_kit import (
    BESS_1,
    BESS_2,
    BESS_3,
    INVENTORY_YAML,
    PV_1,
    SITE_A,
    SITE_A_ASSETS,
    SITE_B,
    WAIT_S,
    RawAgent,
    agents_by_asset,
    eventually,
    make_config,
    sample,
)
from prometheus_client.parser import text_string_to_metric_families

from der_sdk import certs
from der_sdk.errors import DerSdkError
from der_sdk.models import Event
from der_sdk.plugins import Plugins
from der_sdk.testing import certs as bad_certs
from der_sdk.wire import AGENT_TOKEN_METADATA_KEY, codec
from der_sdk_headend import Headend
from der_sdk_headend.audit import AUDIT_KIND
from der_sdk_headend.link.tls_front import RefusalLimiter

ALL_ASSETS = (*SITE_A_ASSETS, PV_1)
TOKEN_A = "dera_site-a-secret"


@dataclass
class Pki:
    """A development CA with a headend certificate and agent certificates."""

    dir: Path
    headend: certs.IssuedCert
    agent_a: certs.IssuedCert  # bound to site A
    agent_b: certs.IssuedCert  # from the same CA, bound to nothing

    @property
    def ca(self) -> Path:
        return self.dir / certs.CA_CERT_FILE

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    certs.init_ca(folder)
    return Pki(
        dir=folder,
        headend=certs.issue_headend(folder, ["localhost", "127.0.0.1"]),
        agent_a=certs.issue_agent(folder, SITE_A, agent_id="gw-north"),
        agent_b=certs.issue_agent(folder, SITE_B, agent_id="gw-stranger"),
    )


def bind(site_id: str, *entries: str, base: str = INVENTORY_YAML) -> str:
    """``base`` (the test inventory) with ``agents:`` entries (``kind: value``) under
    ``site_id``."""
    lines = "".join(f"      - {entry}\n" for entry in entries)
    marker = f"  - site_id: {site_id}\n"
    head, tail = base.split(marker)
    name_line, rest = tail.split("\n", 1)
    return f"{head}{marker}{name_line}\n    agents:\n{lines}{rest}"


Start = Callable[..., Awaitable[Headend]]


@pytest.fixture
async def start_headend(tmp_path: Path, pki: Pki, plugins: Plugins) -> AsyncIterator[Start]:
    started: list[Headend] = []

    async def start(inventory: str, *, tls: bool = True, mtls: bool = True, **env: str) -> Headend:
        path = tmp_path / f"assets-{len(started)}.yaml"
        path.write_text(inventory)
        settings: dict[str, str] = {
            "HEADEND_AUTH": "off",
            "HEADEND_TOKENS_FILE": str(tmp_path / "tokens.json"),
        }
        if tls:
            settings["HEADEND_TLS_CERT"] = str(pki.headend.cert_path)
            settings["HEADEND_TLS_KEY"] = str(pki.headend.key_path)
        if mtls:
            settings["HEADEND_CLIENT_CA"] = str(pki.ca)
        settings.update(env)
        headend = Headend(make_config(path, **settings), plugins=plugins)
        await headend.start()
        started.append(headend)
        return headend

    yield start
    for headend in started:
        await headend.stop()


@pytest.fixture
async def channels() -> AsyncIterator[Callable[..., grpc.aio.Channel]]:
    opened: list[grpc.aio.Channel] = []

    def open_channel(
        headend: Headend,
        client: certs.IssuedCert | None = None,
        *,
        ca: Path | None = None,
        plaintext: bool = False,
    ) -> grpc.aio.Channel:
        target = f"127.0.0.1:{headend.grpc_port}"
        if plaintext:
            channel = grpc.aio.insecure_channel(target)
        else:
            assert ca is not None
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca.read_bytes(),
                private_key=client.key_path.read_bytes() if client else None,
                certificate_chain=client.cert_pem if client else None,
            )
            channel = grpc.aio.secure_channel(target, credentials)
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        await channel.close()


async def try_register(
    channel: grpc.aio.Channel,
    assets: Sequence[str],
    site_id: str = SITE_A,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> tuple[grpc.StatusCode, str, Any]:
    """Register like an agent (nothing more until the answer: a write racing the
    headend's abort can make grpc report INTERNAL instead of the status); the call's
    final status, details and RegisterAck (``None`` when none came)."""
    agent = RawAgent(channel, metadata=metadata)
    ack = None
    try:
        await agent.send(
            codec.agent_register(
                agent_id="gw-1",
                site_id=site_id,
                assets={a: "sim-bess" for a in assets},
                sdk_version="test",
                plugins={},
            )
        )
        first = await agent.recv()
        ack = first.register_ack if first.WhichOneof("msg") == "register_ack" else None
    except (grpc.aio.AioRpcError, AssertionError):
        pass  # the status is read below
    code, details = await agent.outcome()
    return code, details, ack


async def assert_nothing_written(headend: Headend, http: httpx.AsyncClient | None = None) -> None:
    storage = headend.storage
    for asset_id in ALL_ASSETS:
        assert await storage.recent_sessions(asset_id) == [], f"a session for {asset_id}"
        assert await storage.telemetry_history(asset_id) == [], f"telemetry for {asset_id}"
        assert await storage.latest_heartbeat(asset_id) is None
    assert headend.agents_connected == 0 and headend.assets_connected == 0
    if http is not None:
        rows = await agents_by_asset(http)
        assert not any(row["connected"] for row in rows.values())


async def only_refusal_records(headend: Headend) -> tuple[Event, Event]:
    """The one audit record and the one registration_refused event, and that nothing
    else was recorded."""
    events = await headend.storage.events()
    assert sorted(e.kind for e in events) == sorted([AUDIT_KIND, "registration_refused"]), [
        (e.kind, e.message) for e in events
    ]
    [audit] = [e for e in events if e.kind == AUDIT_KIND]
    [refused] = [e for e in events if e.kind == "registration_refused"]
    return audit, refused


@pytest.fixture
def https(pki: Pki) -> Callable[[Headend], httpx.AsyncClient]:
    def client(headend: Headend) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=headend.http_url, verify=pki.ssl_context(), timeout=WAIT_S
        )

    return client


# --------------------------------------------------------------------------- accepted


async def test_a_bound_agent_registers_and_streams_over_mutual_tls(
    pki: Pki, start_headend: Start, channels: Callable[..., grpc.aio.Channel],
    https: Callable[[Headend], httpx.AsyncClient], caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="der.headend.link")
    headend = await start_headend(bind(SITE_A, f"fingerprint: {pki.agent_a.fingerprint}"))
    agent = RawAgent(channels(headend, pki.agent_a, ca=pki.ca))
    ack = await agent.register(SITE_A_ASSETS)
    assert ack.accepted and list(ack.accepted_asset_ids) == list(SITE_A_ASSETS)
    tack = await agent.telemetry(1, [sample(BESS_1, seconds=1)])
    assert tack.seq == 1
    assert len(await headend.storage.telemetry_history(BESS_1)) == 1
    async with https(headend) as http:
        rows = await agents_by_asset(http)
    assert all(rows[a]["connected"] for a in SITE_A_ASSETS)
    assert f"proved {pki.agent_a.fingerprint} for site {SITE_A}" in caplog.text
    assert await headend.storage.events(kind=AUDIT_KIND) == []


@pytest.mark.parametrize("mode", ["front", "native"])
async def test_metrics_show_when_the_headend_and_each_agent_certificate_expire(
    mode: str, pki: Pki, start_headend: Start, channels: Callable[..., grpc.aio.Channel],
    https: Callable[[Headend], httpx.AsyncClient],
) -> None:  # fmt: skip
    headend = await start_headend(
        bind(SITE_A, f"fingerprint: {pki.agent_a.fingerprint}"), HEADEND_MTLS_MODE=mode
    )
    agent = RawAgent(channels(headend, pki.agent_a, ca=pki.ca))
    assert (await agent.register(SITE_A_ASSETS, agent_id="gw-north")).accepted
    async with https(headend) as http:
        text = (await http.get("/metrics")).text
    values = {
        (s.name, s.labels.get("agent_id", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert values[("der_tls_certificate_expiry_timestamp_seconds", "")] == (
        pki.headend.not_after.timestamp()
    )
    assert values[("der_agent_certificate_expiry_timestamp_seconds", "gw-north")] == (
        pki.agent_a.not_after.timestamp()
    )


async def test_subject_identity_binds_any_certificate_with_that_subject(
    pki: Pki, start_headend: Start, channels: Callable[..., grpc.aio.Channel]
) -> None:
    headend = await start_headend(
        bind(SITE_A, 'subject: "CN = gw-north"'), AGENT_IDENTITY="subject"
    )
    ack = await RawAgent(channels(headend, pki.agent_a, ca=pki.ca)).register(SITE_A_ASSETS)
    assert ack.accepted


# --------------------------------------------------------------------------- handshake refusals


HandshakeCase = Callable[[Pki, Path], "certs.IssuedCert | None"]

HANDSHAKE_REFUSALS: dict[str, HandshakeCase] = {
    "no client certificate": lambda pki, tmp: None,
    "self-signed": lambda pki, tmp: bad_certs.self_signed_agent(tmp, SITE_A),
    "another CA": lambda pki, tmp: bad_certs.agent_from_other_ca(tmp, SITE_A),
    "expired": lambda pki, tmp: bad_certs.expired_agent(pki.dir, SITE_A),
    "not yet valid": lambda pki, tmp: bad_certs.not_yet_valid_agent(pki.dir, SITE_A),
}

# What the audit record's reason says, per case (OpenSSL's words, either spelling).
HANDSHAKE_REASONS: dict[str, tuple[str, ...]] = {
    "no client certificate": ("no client certificate",),
    "self-signed": ("self-signed certificate", "self signed certificate"),
    "another CA": ("unable to get local issuer certificate",),
    "expired": ("certificate has expired",),
    "not yet valid": ("certificate is not yet valid",),
}


async def audited(headend: Headend) -> None:
    """Wait for the first record: the front closes the connection, then audits."""

    async def written() -> bool:
        return bool(await headend.storage.events())

    await eventually(written, "the refused handshake was audited")


async def only_handshake_refusals(headend: Headend, *reasons: str) -> Event:
    """The TLS front's audit record(s) of a refused handshake, and that nothing else was
    recorded. The client may retry within the test: one record per second at most."""
    await audited(headend)
    events = await headend.storage.events()
    assert all(e.kind == AUDIT_KIND for e in events), [(e.kind, e.message) for e in events]
    for audit in events:
        data = audit.data
        assert data["action"] == "agent.refused" and data["outcome"] == "refused"
        assert data["auth"] == "mtls" and data["stage"] == "tls"
        assert data["actor"]["kind"] == "agent" and data["actor"]["name"].startswith("unknown")
        assert data["source"].startswith("ipv4:127.0.0.1:")
        assert data["source"] != f"ipv4:127.0.0.1:{headend.grpc_port}"
        assert any(r in data["reason"] for r in reasons), data["reason"]
        assert data["suppressed"] >= 0
    return events[0]


@pytest.mark.parametrize("case", list(HANDSHAKE_REFUSALS))
async def test_a_bad_client_certificate_is_refused_in_the_handshake_and_nothing_is_written(
    case: str, pki: Pki, tmp_path: Path, start_headend: Start,
    channels: Callable[..., grpc.aio.Channel], https: Callable[[Headend], httpx.AsyncClient],
) -> None:  # fmt: skip
    client = HANDSHAKE_REFUSALS[case](pki, tmp_path)
    # The certificate itself is bound: only the TLS check can refuse it.
    bound = client.fingerprint if client is not None else pki.agent_a.fingerprint
    headend = await start_headend(bind(SITE_A, f"fingerprint: {bound}"))

    code, details, ack = await try_register(channels(headend, client, ca=pki.ca), SITE_A_ASSETS)

    assert code == grpc.StatusCode.UNAVAILABLE, details
    assert ack is None
    async with https(headend) as http:
        await assert_nothing_written(headend, http)
    # The request never reached the servicer: the TLS front's audit record, nothing else.
    await only_handshake_refusals(headend, *HANDSHAKE_REASONS[case])


async def test_a_plaintext_agent_is_refused_by_a_tls_headend(
    pki: Pki, start_headend: Start, channels: Callable[..., grpc.aio.Channel]
) -> None:
    headend = await start_headend(bind(SITE_A, f"fingerprint: {pki.agent_a.fingerprint}"))
    code, _, _ = await try_register(channels(headend, plaintext=True), SITE_A_ASSETS)
    assert code == grpc.StatusCode.UNAVAILABLE
    await assert_nothing_written(headend)
    await only_handshake_refusals(headend, "TLS handshake failed")


async def test_a_flood_of_refused_handshakes_is_audited_at_most_once_a_second(
    pki: Pki, start_headend: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="der.headend.link")
    headend = await start_headend(bind(SITE_A, f"fingerprint: {pki.agent_a.fingerprint}"))
    for _ in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", headend.grpc_port)
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # plaintext HTTP/2
        with contextlib.suppress(OSError):
            await writer.drain()
            assert await reader.read() == b"", "closed by the headend"
        writer.close()
    await audited(headend)
    events = await headend.storage.events()
    assert 1 <= len(events) <= 2, [e.message for e in events]
    lines = [r for r in caplog.records if "refused in the TLS handshake" in r.getMessage()]
    assert len(lines) == len(events)


def test_the_refusal_limiter_admits_one_per_source_a_second_and_counts_the_rest() -> None:
    limiter = RefusalLimiter(interval_s=1.0)
    assert limiter.admit("ipv4:192.0.2.1", now=10.0) == 0
    assert limiter.admit("ipv4:192.0.2.1", now=10.2) is None
    assert limiter.admit("ipv4:192.0.2.1", now=10.9) is None
    assert limiter.admit("ipv4:192.0.2.2", now=10.9) == 0, "per source"
    assert limiter.admit("ipv4:192.0.2.1", now=11.0) == 2, "the held-back ones, counted"
    assert limiter.admit("ipv4:192.0.2.1", now=12.5) == 0


async def test_a_stream_that_bypasses_the_tls_front_is_refused_and_audited(
    pki: Pki, start_headend: Start, channels: Callable[..., grpc.aio.Channel]
) -> None:
    headend = await start_headend(bind(SITE_A, f"fingerprint: {pki.agent_a.fingerprint}"))
    front = headend._front
    assert front is not None
    internal = grpc.aio.insecure_channel(f"127.0.0.1:{front.upstream_port}")
    try:
        code, details, ack = await try_register(internal, SITE_A_ASSETS)
    finally:
        await internal.close()
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert "TLS front" in details and ack is None
    await assert_nothing_written(headend)
    [audit] = await headend.storage.events()
    assert audit.kind == AUDIT_KIND and audit.data["action"] == "agent.refused"
    assert audit.data["stage"] == "front" and audit.data["source"].startswith("ipv4:127.0.0.1:")


# --------------------------------------------------------------------------- native mode


async def test_in_native_mode_grpc_checks_the_certificate_and_refusals_go_unaudited(
    pki: Pki, start_headend: Start, channels: Callable[..., grpc.aio.Channel]
) -> None:
    headend = await start_headend(
        bind(SITE_A, f"fingerprint: {pki.agent_a.fingerprint}"), HEADEND_MTLS_MODE="native"
    )
    assert headend._front is None, "gRPC's own TLS serves the agent port"

    code, details, ack = await try_register(channels(headend, None, ca=pki.ca), SITE_A_ASSETS)
    assert code == grpc.StatusCode.UNAVAILABLE, details
    assert ack is None
    await assert_nothing_written(headend)
    # What this mode gives up: gRPC refused the handshake in its C core, unseen.
    await asyncio.sleep(0.3)
    assert await headend.storage.events() == []

    agent = RawAgent(channels(headend, pki.agent_a, ca=pki.ca))
    ack = await agent.register(SITE_A_ASSETS)
    assert ack.accepted and list(ack.accepted_asset_ids) == list(SITE_A_ASSETS)
    assert (await agent.telemetry(1, [sample(BESS_1, seconds=1)])).seq == 1
    assert len(await headend.storage.telemetry_history(BESS_1)) == 1


async def test_in_native_mode_a_valid_certificate_claiming_another_site_is_refused(
    pki: Pki, start_headend: Start, channels: Callable[..., grpc.aio.Channel]
) -> None:
    headend = await start_headend(
        bind(SITE_A, f"fingerprint: {pki.agent_a.fingerprint}"), HEADEND_MTLS_MODE="native"
    )
    code, details, _ = await try_register(
        channels(headend, pki.agent_b, ca=pki.ca), [BESS_3], site_id=SITE_A
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    await assert_nothing_written(headend)
    audit, _ = await only_refusal_records(headend)
    assert audit.data["actor"]["name"] == pki.agent_b.fingerprint
    assert audit.data["source"].startswith("ipv4:127.0.0.1:")


# --------------------------------------------------------------------------- servicer refusals


async def test_a_valid_certificate_claiming_another_site_is_refused_and_audited(
    pki: Pki, start_headend: Start, channels: Callable[..., grpc.aio.Channel],
    https: Callable[[Headend], httpx.AsyncClient], caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, logger="der.headend.link")
    headend = await start_headend(
        bind(
            SITE_B,
            f"fingerprint: {pki.agent_b.fingerprint}",
            base=bind(SITE_A, f"fingerprint: {pki.agent_a.fingerprint}"),
        )
    )
    code, details, ack = await try_register(
        channels(headend, pki.agent_a, ca=pki.ca), [PV_1], site_id=SITE_B
    )

    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert f"not bound to site {SITE_B}" in details
    assert ack is not None and not ack.accepted and "PERMISSION_DENIED" in ack.message
    async with https(headend) as http:
        await assert_nothing_written(headend, http)
    audit, refused = await only_refusal_records(headend)
    assert audit.data["action"] == "agent.refused"
    assert audit.data["actor"] == {"kind": "agent", "name": pki.agent_a.fingerprint, "role": None}
    assert audit.data["source"].startswith("ipv4:127.0.0.1:")
    assert audit.data["outcome"] == "refused"
    assert audit.site_id == SITE_B and audit.data["assets"] == [PV_1]
    assert audit.data["auth"] == "mtls" and audit.data["code"] == "PERMISSION_DENIED"
    assert f"not bound to site {SITE_B}" in audit.data["reason"]
    # the agent's own address (through the TLS front), not the internal connection's
    front = headend._front
    assert front is not None
    assert audit.data["source"] in {agent.peer for agent in front.peers.values()}
    assert audit.data["source"] != f"ipv4:127.0.0.1:{front.upstream_port}"
    assert refused.data["identity"] == pki.agent_a.fingerprint
    assert refused.site_id == SITE_B
    [warning] = [r for r in caplog.records if "agent stream refused" in r.getMessage()]
    text = warning.getMessage()
    assert pki.agent_a.fingerprint in text and SITE_B in text and PV_1 in text
    assert "ipv4:127.0.0.1:" in text


async def test_a_bound_agent_naming_an_asset_of_another_site_is_refused_whole(
    pki: Pki, start_headend: Start, channels: Callable[..., grpc.aio.Channel]
) -> None:
    headend = await start_headend(bind(SITE_A, f"fingerprint: {pki.agent_a.fingerprint}"))
    code, details, _ = await try_register(
        channels(headend, pki.agent_a, ca=pki.ca), [BESS_1, BESS_2, PV_1]
    )

    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert PV_1 in details and "not assets of that site" in details
    await assert_nothing_written(headend)  # not even BESS_1, which is site A's
    audit, _ = await only_refusal_records(headend)
    assert audit.data["foreign_assets"] == [PV_1]


async def test_a_certificate_bound_to_no_site_is_refused(
    pki: Pki, start_headend: Start, channels: Callable[..., grpc.aio.Channel]
) -> None:
    headend = await start_headend(bind(SITE_A, f"fingerprint: {pki.agent_a.fingerprint}"))
    code, details, _ = await try_register(channels(headend, pki.agent_b, ca=pki.ca), [BESS_3])
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert f"fingerprint: {pki.agent_b.fingerprint}" in details, "says how to bind it"
    await assert_nothing_written(headend)
    audit, _ = await only_refusal_records(headend)
    assert audit.data["actor"]["name"] == pki.agent_b.fingerprint


async def test_under_mutual_tls_a_site_without_agents_cannot_be_served(
    pki: Pki, start_headend: Start, channels: Callable[..., grpc.aio.Channel],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, logger="der.headend.link")
    headend = await start_headend(INVENTORY_YAML)
    assert f"site {SITE_A} (North Yard) lists no agents" in caplog.text, "said at start"
    code, details, _ = await try_register(channels(headend, pki.agent_a, ca=pki.ca), [BESS_1])
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "lists no agents" in details
    assert f"'- fingerprint: {pki.agent_a.fingerprint}' under 'agents:'" in details
    await assert_nothing_written(headend)
    await only_refusal_records(headend)


async def test_a_fingerprint_entry_does_not_match_in_subject_mode(
    pki: Pki, start_headend: Start, channels: Callable[..., grpc.aio.Channel]
) -> None:
    headend = await start_headend(
        bind(SITE_A, f"fingerprint: {pki.agent_a.fingerprint}"), AGENT_IDENTITY="subject"
    )
    code, details, _ = await try_register(channels(headend, pki.agent_a, ca=pki.ca), [BESS_1])
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert "subject CN=gw-north is not bound" in details


# --------------------------------------------------------------------------- tokens


def token_inventory() -> str:
    return bind(SITE_A, f"token_sha256: {certs.token_sha256(TOKEN_A)}")


async def test_a_site_bound_by_token_accepts_its_token_over_tls(
    pki: Pki, start_headend: Start, channels: Callable[..., grpc.aio.Channel],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    headend = await start_headend(token_inventory(), mtls=False)
    agent = RawAgent(channels(headend, ca=pki.ca), metadata=[(AGENT_TOKEN_METADATA_KEY, TOKEN_A)])
    ack = await agent.register(SITE_A_ASSETS)
    assert ack.accepted
    assert (await agent.telemetry(1, [sample(BESS_1)])).seq == 1
    assert TOKEN_A not in caplog.text


async def test_a_missing_token_is_unauthenticated_and_audited(
    start_headend: Start, channels: Callable[..., grpc.aio.Channel]
) -> None:
    headend = await start_headend(token_inventory(), tls=False, mtls=False)
    code, details, ack = await try_register(channels(headend, plaintext=True), SITE_A_ASSETS)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert AGENT_TOKEN_METADATA_KEY in details and "AGENT_TOKEN" in details
    assert ack is not None and not ack.accepted
    await assert_nothing_written(headend)
    audit, _ = await only_refusal_records(headend)
    assert audit.data["token"] == "missing" and audit.data["auth"] == "token"
    assert audit.data["actor"] == {"kind": "agent", "name": "gw-1", "role": None}


async def test_a_wrong_token_is_permission_denied_and_never_recorded(
    start_headend: Start, channels: Callable[..., grpc.aio.Channel],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    headend = await start_headend(token_inventory(), tls=False, mtls=False)
    wrong = "dera_guessed-token"
    code, _, _ = await try_register(
        channels(headend, plaintext=True),
        SITE_A_ASSETS,
        metadata=[(AGENT_TOKEN_METADATA_KEY, wrong)],
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    await assert_nothing_written(headend)
    audit, refused = await only_refusal_records(headend)
    assert audit.data["token"] == "wrong"
    recorded = repr([audit, refused])
    assert wrong not in recorded and certs.token_sha256(wrong) not in recorded
    assert wrong not in caplog.text and certs.token_sha256(wrong) not in caplog.text


async def test_a_good_token_naming_an_asset_of_another_site_is_refused_whole(
    start_headend: Start, channels: Callable[..., grpc.aio.Channel]
) -> None:
    headend = await start_headend(token_inventory(), tls=False, mtls=False)
    code, details, _ = await try_register(
        channels(headend, plaintext=True),
        [BESS_1, PV_1],
        metadata=[(AGENT_TOKEN_METADATA_KEY, TOKEN_A)],
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and PV_1 in details
    await assert_nothing_written(headend)


async def test_without_mutual_tls_an_unbound_site_accepts_any_agent(
    start_headend: Start, channels: Callable[..., grpc.aio.Channel]
) -> None:
    headend = await start_headend(token_inventory(), tls=False, mtls=False)
    ack = await RawAgent(channels(headend, plaintext=True)).register([PV_1], site_id=SITE_B)
    assert ack.accepted


async def test_without_mutual_tls_a_site_bound_by_certificate_is_refused(
    pki: Pki, start_headend: Start, channels: Callable[..., grpc.aio.Channel],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, logger="der.headend.link")
    headend = await start_headend(
        bind(SITE_A, f"fingerprint: {pki.agent_a.fingerprint}"), mtls=False
    )
    assert "binds its agents by certificate" in caplog.text, "said at start"
    code, details, _ = await try_register(channels(headend, ca=pki.ca), [BESS_1])
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert "HEADEND_CLIENT_CA" in details
    await assert_nothing_written(headend)


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize(
    ("variable", "content", "words"),
    [
        ("HEADEND_TLS_CERT", b"not a certificate", ["no valid PEM certificate"]),
        ("HEADEND_TLS_KEY", b"not a key", ["not a valid PEM private key"]),
        ("HEADEND_CLIENT_CA", b"", ["no valid PEM certificate"]),
        ("HEADEND_TLS_CERT", None, ["file not found"]),
    ],
)
async def test_a_bad_tls_file_stops_the_start_naming_the_variable_and_the_path(
    variable: str, content: bytes | None, words: list[str], pki: Pki, tmp_path: Path,
    start_headend: Start,
) -> None:  # fmt: skip
    path = tmp_path / "bad.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DerSdkError) as caught:
        await start_headend(INVENTORY_YAML, **{variable: str(path)})
    message = str(caught.value)
    assert f"{variable}={path}" in message
    for word in words:
        assert word in message


async def test_a_key_of_another_certificate_stops_the_start(pki: Pki, start_headend: Start) -> None:
    with pytest.raises(DerSdkError, match="is not the private key of the certificate"):
        await start_headend(INVENTORY_YAML, HEADEND_TLS_KEY=str(pki.agent_a.key_path))
