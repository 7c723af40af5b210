"""The deployment files in deploy/: the systemd units pass ``systemd-analyze verify`` and
keep their hardening, the env file examples set only settings the programs read, the
container's health check tells healthy from degraded, and the alert rules pass
``promtool check rules`` and their unit tests."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

from der_sdk import certs
from der_sdk.plugins import load_plugins
from der_sdk_agent.settings import AgentSettings
from der_sdk_headend import Headend, gc_pauses
from der_sdk_headend.config import HeadendConfig
from tests.headend.headend_kit import INVENTORY_YAML, SITE_A, make_config
from tests.ops_kit import ROOT, RULES, promtool

DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
CONTAINER = DEPLOY / "container"
PROMETHEUS = DEPLOY / "prometheus"
UNITS = ("der-headend.service", "der-agent.service")
INSTALLED_DER = "/opt/der-sdk/bin/der"


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return found


@pytest.fixture
def units_here(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this environment's ``der`` (verify checks
    that the program exists), everything else as shipped."""
    der = Path(sys.executable).with_name("der")
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text()
        assert INSTALLED_DER in text
        (tmp_path / unit).write_text(text.replace(INSTALLED_DER, str(der)))
    return tmp_path


def test_the_units_pass_systemd_analyze_verify_without_a_warning(units_here: Path) -> None:
    tool = _systemd_analyze()
    result = subprocess.run(
        [tool, "verify", "--man=no", *(str(units_here / unit) for unit in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on an unknown key too; its warning is the only sign of a typo
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("unit", UNITS)
def test_the_units_hardening_exposure_is_low(units_here: Path, unit: str) -> None:
    tool = _systemd_analyze()
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--threshold=20", str(units_here / unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert exposure is not None, result.stdout + result.stderr
    assert result.returncode == 0, f"exposure {exposure.group(1)} is above 2.0"


def _settings(unit: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (SYSTEMD / unit).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.parametrize("unit", UNITS)
def test_the_units_run_unprivileged_confined_and_restart_within_limits(unit: str) -> None:
    settings = _settings(unit)
    sysusers = (SYSTEMD / "der-sdk.sysusers.conf").read_text()
    user = settings["User"][0]
    assert re.search(rf"^u {user} ", sysusers, re.MULTILINE), "the sysusers file creates it"
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "Restart": "on-failure",
        "ConfigurationDirectory": "der-sdk",
    }
    assert {key: settings.get(key, ["<unset>"])[0] for key in expected} == expected
    families = settings["RestrictAddressFamilies"][0].split()
    assert set(families) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert int(settings["StartLimitBurst"][0]) > 1 and settings["StartLimitIntervalSec"]
    name = unit.removesuffix(".service")
    assert settings["StateDirectory"] == [name] and settings["LogsDirectory"] == [name]
    assert settings["WorkingDirectory"] == [f"/var/lib/{name}"], "der-data/ lands in state"
    env_file = settings["EnvironmentFile"][0]
    assert env_file == f"/etc/der-sdk/{name.removeprefix('der-')}.env"
    assert (SYSTEMD / f"{Path(env_file).name}.example").is_file()


class _Recorder(dict[str, str]):
    """An environment that records every variable asked for."""

    def __init__(self, values: Mapping[str, str]) -> None:
        super().__init__(values)
        self.asked: set[str] = set()

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.asked.add(key)
        return super().__contains__(key)


def _read_by_the_cli_and_plugins() -> set[str]:
    """What every program reads: the ``der`` command (``LOG_LEVEL``), plugin loading."""
    env = _Recorder({})
    load_plugins(env=env)
    gc_pauses.freeze_setting(env)
    gc_pauses.compact_growth_setting(env)
    from der_sdk import cli

    source = Path(cli.__file__).read_text()
    return env.asked | set(re.findall(r'os\.environ\.get\("([A-Z_]+)"', source))


def _read_by_the_headend() -> set[str]:
    env = _Recorder({"ASSETS_PATH": "assets.yaml"})
    HeadendConfig.from_env(env)
    return env.asked | _read_by_the_cli_and_plugins()


def _read_by_the_agent() -> set[str]:
    env = _Recorder({"ASSETS_PATH": "assets.yaml", "GATEWAY_SITE_ID": SITE_A})
    AgentSettings.from_env(env)
    return env.asked | _read_by_the_cli_and_plugins()


def _example_variables(name: str, *, commented: bool = True) -> dict[str, str]:
    """Every ``VAR=value`` of an env file example; with ``commented``, the commented-out
    ones too (an active line wins)."""
    found: dict[str, str] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        match = re.fullmatch(r"(#?)([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match is None or (match.group(1) and not commented):
            continue
        if not match.group(1) or match.group(2) not in found:  # an active line wins
            found[match.group(2)] = match.group(3)
    return found


@pytest.mark.parametrize(
    ("example", "read"),
    [("headend.env.example", _read_by_the_headend), ("agent.env.example", _read_by_the_agent)],
)
def test_the_env_file_examples_set_only_settings_the_program_reads(
    example: str, read: object
) -> None:
    assert callable(read)
    variables = _example_variables(example)
    assert len(variables) > 10
    unknown = sorted(set(variables) - read())
    assert unknown == [], f"{example} sets variables nothing reads"


def test_the_headend_env_example_is_a_valid_configuration() -> None:
    config = HeadendConfig.from_env(_example_variables("headend.env.example", commented=False))
    assert config.tls and config.mtls and config.database_url.startswith("postgresql://")
    assert config.metrics_auth == "open" and config.headend_id == "headend-a"


def test_the_agent_env_example_is_a_valid_configuration() -> None:
    settings = AgentSettings.from_env(_example_variables("agent.env.example", commented=False))
    assert settings.mode == "site" and len(settings.headends) == 2
    assert settings.tls_cert and settings.buffer_path and "{agent_id}" in settings.buffer_path


# --------------------------------------------------------------------------- container


def test_the_containerfile_runs_the_headend_unprivileged_with_a_health_check() -> None:
    text = (CONTAINER / "Containerfile").read_text()
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK .*\n.*healthcheck\.py", text, re.MULTILINE)
    assert "COPY deploy/container/healthcheck.py" in text
    assert re.search(r"^EXPOSE 3001 50051$", text, re.MULTILINE)
    assert re.search(r'^CMD \["headend"\]$', text, re.MULTILINE)


async def _healthcheck(port: int, tls_cert: str = "") -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CONTAINER / "healthcheck.py"),
        env={**os.environ, "HEADEND_HTTP_ADDR": f"0.0.0.0:{port}", "HEADEND_TLS_CERT": tls_cert},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def headend(tmp_path: Path) -> AsyncIterator[Headend]:
    inventory = tmp_path / "assets.yaml"
    inventory.write_text(INVENTORY_YAML)
    started = Headend(make_config(inventory), plugins=load_plugins(env={}))
    await started.start()
    yield started
    await started.stop()


async def test_the_container_health_check_passes_while_healthy_and_fails_while_degraded(
    headend: Headend, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = int(headend.http_url.rsplit(":", 1)[1])
    code, out, err = await _healthcheck(port)
    assert (code, err) == (0, "") and "/healthz: ok, 0 agents connected" in out

    async def unhealthy() -> bool:
        return False

    monkeypatch.setattr(headend.storage, "healthy", unhealthy)
    code, out, err = await _healthcheck(port)
    assert code == 1 and "503 storage memory is not healthy" in err


async def test_the_container_health_check_asks_over_https_when_the_headend_serves_tls(
    tmp_path: Path,
) -> None:
    pki = tmp_path / "pki"
    certs.init_ca(pki)
    issued = certs.issue_headend(pki, ["headend.example.net"])  # not 127.0.0.1: not verified
    inventory = tmp_path / "assets.yaml"
    inventory.write_text(INVENTORY_YAML)
    config = make_config(
        inventory, HEADEND_TLS_CERT=str(issued.cert_path), HEADEND_TLS_KEY=str(issued.key_path)
    )
    headend = Headend(config, plugins=load_plugins(env={}))
    await headend.start()
    try:
        assert headend.http_url.startswith("https://")
        port = int(headend.http_url.rsplit(":", 1)[1])
        code, out, err = await _healthcheck(port, tls_cert=str(issued.cert_path))
        assert (code, err) == (0, "") and f"https://127.0.0.1:{port}/healthz: ok" in out
        code, _, err = await _healthcheck(port)  # plain HTTP to a TLS port
        assert code == 1 and "/healthz" in err
    finally:
        await headend.stop()


def _docker_usable() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    probe = subprocess.run([docker, "info"], capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


@pytest.mark.slow
def test_the_container_image_builds() -> None:
    if not _docker_usable():
        pytest.skip("no usable docker daemon (docker info fails): the image is not built")
    subprocess.run(
        ["docker", "build", "-f", str(CONTAINER / "Containerfile"), "-t", "der-headend:test", "."],
        cwd=ROOT,
        check=True,
        timeout=1800,
    )


# --------------------------------------------------------------------------- prometheus


def test_the_alert_rules_pass_promtool_check_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: \d+ rules found", result.stdout)


def test_the_alert_rules_unit_tests_pass_in_promtool() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", "rules.test.yml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_scrape_config_example_passes_promtool_check_config(tmp_path: Path) -> None:
    tool = promtool()
    installed = tmp_path / "der-sdk"
    installed.mkdir()
    shutil.copy(RULES, installed / "rules.yml")
    (installed / "headend-ca.crt").write_text("")
    (installed / "viewer.token").write_text("")
    example = (PROMETHEUS / "prometheus.scrape.example.yml").read_text()
    config = tmp_path / "prometheus.yml"
    config.write_text(example.replace("/etc/prometheus/der-sdk", str(installed)))
    result = subprocess.run(
        [tool, "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
