"""The real agent over TLS, mutual TLS and tokens, against the real headend on loopback;
and the agent's security settings: environment, agent config, files, messages."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from der_sdk import certs
from der_sdk.agent_config import AgentConfig, parse_agent_config
from der_sdk.errors import DerSdkError
from der_sdk.plugins import Plugins
from der_sdk.testing import certs as bad_certs
from der_sdk.testing import wait_until
from der_sdk.testing.faults import AgentProcess, HeadendProcess
from der_sdk_agent.agent import Agent
from der_sdk_agent.settings import AgentSettings
from der_sdk_agent.testing import AgentLink
from der_sdk_agent.tls import LinkSecurity
from der_sdk_headend import Headend, HeadendConfig
from tests.agent.conftest import A1, SITE, MakeAgent
from tests.agent.conftest import site_inventory as inventory

TOKEN = "dera_gateway-test-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    certs.init_ca(folder)
    certs.issue_headend(folder, ["localhost", "127.0.0.1"])
    certs.issue_agent(folder, SITE, agent_id="gateway-test")
    return folder


def agent_cert(pki: Path) -> tuple[Path, Path]:
    return pki / "agent-gateway-test.pem", pki / "agent-gateway-test.key"


StartHeadend = Callable[..., Awaitable[Headend]]


@pytest.fixture
async def start_headend(tmp_path: Path, pki: Path, plugins: Plugins) -> AsyncIterator[StartHeadend]:
    started: list[Headend] = []

    async def start(assets_yaml: str, *, mtls: bool = True, **env: str) -> Headend:
        path = tmp_path / "assets.yaml"
        path.write_text(assets_yaml)
        settings = {
            "ASSETS_PATH": str(path),
            "DATABASE_URL": "memory://",
            "HEADEND_GRPC_ADDR": "127.0.0.1:0",
            "HEADEND_HTTP_ADDR": "127.0.0.1:0",
            "HEADEND_AUTH": "off",
            "HEADEND_TOKENS_FILE": str(tmp_path / "tokens.json"),
            "HEADEND_TLS_CERT": str(pki / "headend.pem"),
            "HEADEND_TLS_KEY": str(pki / "headend.key"),
            **({"HEADEND_CLIENT_CA": str(pki / "ca.pem")} if mtls else {}),
            **env,
        }
        headend = Headend(HeadendConfig.from_env(settings), plugins=plugins)
        await headend.start()
        started.append(headend)
        return headend

    yield start
    for headend in started:
        await headend.stop()


def https(headend: Headend, pki: Path) -> httpx.AsyncClient:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    return httpx.AsyncClient(base_url=headend.http_url, verify=context, timeout=5.0)


async def failed_twice(agent: Agent) -> bool:
    return agent.stats().failed_attempts >= 2


# ----------------------------------------------------------------------------- end to end


async def test_an_agent_over_mutual_tls_registers_streams_and_applies_a_dispatch(
    pki: Path, start_headend: StartHeadend, make_agent: MakeAgent
) -> None:
    cert, key = agent_cert(pki)
    headend = await start_headend(inventory(f"fingerprint: {certs.fingerprint(cert.read_bytes())}"))
    security = LinkSecurity.load(ca=str(pki / "ca.pem"), cert=str(cert), key=str(key))
    agent = make_agent(f"127.0.0.1:{headend.grpc_port}", security=security)
    await agent.start()
    async with https(headend, pki) as http:
        link = AgentLink(agent, headend, http)
        await link.wait_connected()
        await link.wait_for_telemetry(A1)
        dispatch = await link.dispatch(0.5, asset_id=A1)
        applied = await link.wait_for_dispatch(dispatch.dispatch_id, "applied")
    assert applied.targets[0].applied_mw == 0.5
    audits = await headend.storage.events(kind="audit")
    assert not [a for a in audits if a.data["action"] == "agent.refused"]


async def test_a_server_name_override_checks_the_name_in_the_certificate(
    pki: Path, tmp_path: Path, start_headend: StartHeadend, make_agent: MakeAgent
) -> None:
    named = tmp_path / "named"
    named.mkdir()
    for name in ("ca.pem", "ca.key"):
        (named / name).write_bytes((pki / name).read_bytes())
    only_dns = certs.issue_headend(named, ["headend.example"])
    headend = await start_headend(
        inventory(),
        mtls=False,
        HEADEND_TLS_CERT=str(only_dns.cert_path),
        HEADEND_TLS_KEY=str(only_dns.key_path),
    )
    security = LinkSecurity.load(ca=str(pki / "ca.pem"), server_name="headend.example")
    agent = make_agent(f"127.0.0.1:{headend.grpc_port}", security=security)
    await agent.start()
    await wait_until(lambda: _connected(agent), "the agent to register via headend.example")


async def _connected(agent: Agent) -> bool:
    return agent.stats().connected


async def test_a_token_agent_is_served_and_a_wrong_token_is_refused_and_retried(
    pki: Path, start_headend: StartHeadend, make_agent: MakeAgent,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    headend = await start_headend(
        inventory(f"token_sha256: {certs.token_sha256(TOKEN)}"), mtls=False
    )
    good = make_agent(
        f"127.0.0.1:{headend.grpc_port}",
        security=LinkSecurity.load(ca=str(pki / "ca.pem"), token=TOKEN),
    )
    await good.start()
    await wait_until(lambda: _connected(good), "the agent with the right token to register")
    await good.stop()

    wrong = make_agent(
        f"127.0.0.1:{headend.grpc_port}",
        agent_id="gateway-wrong",
        security=LinkSecurity.load(ca=str(pki / "ca.pem"), token="dera_not-it"),
    )
    await wrong.start()
    await wait_until(lambda: failed_twice(wrong), "two refused attempts")
    assert not wrong.stats().connected
    refusals = [
        r for r in caplog.records if r.name == "der.agent.link" and r.levelno == logging.ERROR
    ]
    assert refusals, "a refusal is logged at ERROR"
    assert "PERMISSION_DENIED" in refusals[0].getMessage()
    assert "token is not one of site" in refusals[0].getMessage()
    assert TOKEN not in caplog.text and "dera_not-it" not in caplog.text
    audits = await headend.storage.events(kind="audit")
    assert audits and all(a.data["token"] == "wrong" for a in audits)


async def test_an_expired_client_certificate_is_explained_in_the_log_and_retried(
    pki: Path, tmp_path: Path, start_headend: StartHeadend, make_agent: MakeAgent,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, logger="der.agent")
    expired = bad_certs.expired_agent(pki, SITE, agent_id="gateway-expired")
    headend = await start_headend(inventory(f"fingerprint: {expired.fingerprint}"))
    security = LinkSecurity.load(
        ca=str(pki / "ca.pem"), cert=str(expired.cert_path), key=str(expired.key_path)
    )
    assert "expired on" in caplog.text, "said when the files are loaded"
    agent = make_agent(f"127.0.0.1:{headend.grpc_port}", security=security)
    await agent.start()
    await wait_until(lambda: failed_twice(agent), "two failed attempts")
    lines = [r.getMessage() for r in caplog.records if r.name == "der.agent.link"]
    assert any(
        "unreachable" in line and "UNAVAILABLE" in line and "expired on" in line for line in lines
    ), lines
    # The headend's TLS front refused and audited it; nothing else was written.
    events = await headend.storage.events()
    assert events and all(e.data["stage"] == "tls" for e in events), events
    assert all("certificate has expired" in e.data["reason"] for e in events)


async def test_a_certificate_from_another_ca_is_explained_in_the_log(
    pki: Path, tmp_path: Path, start_headend: StartHeadend, make_agent: MakeAgent,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, logger="der.agent.link")
    other = bad_certs.agent_from_other_ca(tmp_path, SITE)
    headend = await start_headend(inventory(f"fingerprint: {other.fingerprint}"))
    security = LinkSecurity.load(
        ca=str(pki / "ca.pem"), cert=str(other.cert_path), key=str(other.key_path)
    )
    agent = make_agent(f"127.0.0.1:{headend.grpc_port}", security=security)
    await agent.start()
    await wait_until(lambda: failed_twice(agent), "two failed attempts")
    assert "does not trust the client certificate" in caplog.text
    assert "HEADEND_CLIENT_CA" in caplog.text


async def test_the_ca_is_pinned_a_headend_from_another_ca_is_refused(
    pki: Path, tmp_path: Path, start_headend: StartHeadend, make_agent: MakeAgent,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, logger="der.agent.link")
    certs.init_ca(tmp_path / "other")
    headend = await start_headend(inventory(), mtls=False)
    security = LinkSecurity.load(ca=str(tmp_path / "other" / "ca.pem"))
    agent = make_agent(f"127.0.0.1:{headend.grpc_port}", security=security)
    await agent.start()
    await wait_until(lambda: failed_twice(agent), "two failed attempts")
    assert "the headend's certificate was not accepted" in caplog.text


async def test_a_server_name_that_is_not_in_the_certificate_is_explained(
    pki: Path, start_headend: StartHeadend, make_agent: MakeAgent,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, logger="der.agent.link")
    headend = await start_headend(inventory(), mtls=False)
    security = LinkSecurity.load(ca=str(pki / "ca.pem"), server_name="wrong.example")
    agent = make_agent(f"127.0.0.1:{headend.grpc_port}", security=security)
    await agent.start()
    await wait_until(lambda: failed_twice(agent), "two failed attempts")
    assert "does not name wrong.example (AGENT_TLS_SERVER_NAME)" in caplog.text


async def test_a_tls_agent_against_a_plaintext_headend_is_explained(
    pki: Path, start_headend: StartHeadend, make_agent: MakeAgent,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, logger="der.agent.link")
    headend = await start_headend(inventory(), mtls=False, HEADEND_TLS_CERT="", HEADEND_TLS_KEY="")
    agent = make_agent(
        f"127.0.0.1:{headend.grpc_port}", security=LinkSecurity.load(ca=str(pki / "ca.pem"))
    )
    await agent.start()
    await wait_until(lambda: failed_twice(agent), "two failed attempts")
    assert "the headend does not speak TLS on this port" in caplog.text


async def test_der_headend_and_der_agent_processes_use_mutual_tls_from_the_environment(
    pki: Path, tmp_path: Path
) -> None:
    cert, key = agent_cert(pki)
    assets = tmp_path / "assets.yaml"
    assets.write_text(inventory(f"fingerprint: {certs.fingerprint(cert.read_bytes())}"))
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    headend_env = {
        "HEADEND_TLS_CERT": str(pki / "headend.pem"),
        "HEADEND_TLS_KEY": str(pki / "headend.key"),
        "HEADEND_CLIENT_CA": str(pki / "ca.pem"),
        "HEADEND_AUTH": "off",
        "HEADEND_TOKENS_FILE": str(tmp_path / "tokens.json"),
    }
    agent_env = {
        "AGENT_TLS_CA": str(pki / "ca.pem"),
        "AGENT_TLS_CERT": str(cert),
        "AGENT_TLS_KEY": str(key),
        "TELEMETRY_INTERVAL_S": "0.2",
    }
    async with HeadendProcess(
        assets, "memory://", tmp_path, env=headend_env, ssl_context=context
    ) as headend:
        assert headend.http_url.startswith("https://")
        async with AgentProcess(
            assets, headend.grpc_addr, tmp_path, site_id=SITE, env=agent_env
        ) as agent:
            await agent.wait_registered(timeout_s=20)
            assert f"client certificate {certs.fingerprint(cert.read_bytes())}" in agent.log_text()
        assert "proved sha256:" in headend.log_text()


# ----------------------------------------------------------------------------- settings


def test_the_environment_names_the_files_and_hides_the_token() -> None:
    settings = AgentSettings.from_env(
        {
            "ASSETS_PATH": "assets.yaml",
            "GATEWAY_SITE_ID": SITE,
            "AGENT_TLS_CA": "ca.pem",
            "AGENT_TLS_CERT": "agent.pem",
            "AGENT_TLS_KEY": "agent-key.pem",
            "AGENT_TLS_SERVER_NAME": "headend.example",
            "AGENT_TOKEN": TOKEN,
        }
    )
    assert (settings.tls_ca, settings.tls_cert, settings.tls_key) == (
        "ca.pem",
        "agent.pem",
        "agent-key.pem",
    )
    assert settings.tls_server_name == "headend.example" and settings.token == TOKEN
    assert TOKEN not in repr(settings)
    assert TOKEN not in repr(LinkSecurity(token=TOKEN))


def test_the_environment_wins_over_the_agent_config(pki: Path) -> None:
    cert, key = agent_cert(pki)
    config = parse_agent_config(
        f"tls:\n  ca: {tmp_missing()}\n  cert: {cert}\n  key: {key}\n  server_name: a.example\n",
        "agent.yaml",
    )
    settings = AgentSettings(
        assets_path="assets.yaml", site_id=SITE, tls_ca=str(pki / "ca.pem"), token=TOKEN
    )
    security = LinkSecurity.from_settings(settings, config)
    assert security.sources["ca"] == f"AGENT_TLS_CA={pki / 'ca.pem'}"
    assert security.sources["cert"] == f"agent.yaml:3: tls.cert={cert}"
    assert security.server_name == "a.example" and security.mtls and security.tls
    assert security.call_metadata() == (("x-der-agent-token", TOKEN),)


def tmp_missing() -> str:
    return "/nonexistent/ca.pem"


def test_a_missing_file_in_the_agent_config_names_its_line(pki: Path) -> None:
    config = parse_agent_config(f"# ca below\ntls:\n  ca: {tmp_missing()}\n", "agent.yaml")
    settings = AgentSettings(assets_path="assets.yaml", site_id=SITE)
    with pytest.raises(
        DerSdkError, match=r"agent\.yaml:3: tls\.ca=/nonexistent/ca\.pem: file not found"
    ):
        LinkSecurity.from_settings(settings, config)


def test_the_tls_section_is_checked_like_the_rest_of_the_config() -> None:
    with pytest.raises(Exception, match=r"agent\.yaml:2: tls\.cafile: unknown key"):
        parse_agent_config("tls:\n  cafile: ca.pem\n", "agent.yaml")
    assert parse_agent_config("", "agent.yaml").tls.ca is None
    assert AgentConfig().tls.server_name is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cert": "a.pem"}, "AGENT_TLS_CERT and AGENT_TLS_KEY go together"),
        ({"cert": "a.pem", "key": "k.pem"}, "AGENT_TLS_CERT is set but AGENT_TLS_CA is not"),
        ({"server_name": "x"}, "AGENT_TLS_SERVER_NAME is set but AGENT_TLS_CA is not"),
    ],
)
def test_incomplete_settings_are_refused(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(DerSdkError, match=message):
        LinkSecurity.load(**kwargs)


def test_a_key_of_another_certificate_is_refused(pki: Path) -> None:
    cert, _ = agent_cert(pki)
    with pytest.raises(DerSdkError, match=r"AGENT_TLS_KEY=.* is not the private key"):
        LinkSecurity.load(ca=str(pki / "ca.pem"), cert=str(cert), key=str(pki / "headend.key"))


def test_a_token_over_plaintext_to_another_host_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="der.agent.tls")
    LinkSecurity(token=TOKEN).warn_if_exposed("127.0.0.1:50051")
    assert caplog.text == ""
    LinkSecurity(token=TOKEN).warn_if_exposed("headend.example:50051")
    assert "clear text" in caplog.text and TOKEN not in caplog.text


def test_the_documented_tls_section_parses() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "agent.md").read_text()
    block = doc.split("```yaml\n# tls section of agent.yaml", 1)[1].split("```")[0]
    block = "#" + block  # the rest of the comment line
    config = parse_agent_config(block, "docs/agent.md")
    assert config.tls.ca == "/etc/der/ca.pem" and config.tls.key == "/etc/der/agent.key"
    assert config.tls.server_name == "headend.example"
