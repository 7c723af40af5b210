"""docs/runbooks.md, the alert rules and the Grafana dashboard name only what exists: every
metric is exposed by a real headend's ``/metrics``, every endpoint is served, every ``der``
command and flag is accepted, and every alert has a runbook section that names it.

The metrics of bus mode are checked against a real replica in
tests/cluster/test_ops_metrics.py."""

from __future__ import annotations

import contextlib
import io
import json
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from der_sdk import certs, cli
from der_sdk.plugins import load_plugins
from der_sdk_headend import Headend, gc_pauses
from tests.headend.headend_kit import INVENTORY_YAML, make_config
from tests.ops_kit import (
    BUS_ONLY_PREFIXES,
    DASHBOARD,
    DEPLOYMENT,
    EXTERNAL_METRICS,
    RUNBOOKS,
    dashboard_exprs,
    exposed_metric_names,
    named_metrics,
    promql_metric_names,
    rules,
)

# `der SUB [SUBSUB] ...` in a command line, as typed or through its installed path
_DER_COMMAND = re.compile(
    r"(?:^|(?<!-\w)[\s;&|(`/])der\s+([a-z][a-z-]*)((?:\s+[^\s`;&|]+)*)"
)  # not the argument of an option: `createdb -O der der`
_ENDPOINT = re.compile(r"(?:\$H|\b(?:GET|POST))\s?(/[A-Za-z0-9_/{}.-]*)")


@pytest.fixture
async def tls_headend(tmp_path: Path) -> AsyncIterator[tuple[Headend, httpx.AsyncClient]]:
    """A headend serving TLS (so its certificate's expiry is exposed), with the cycle
    collector's monitor installed as ``der headend`` installs it."""
    pki = tmp_path / "pki"
    certs.init_ca(pki)
    issued = certs.issue_headend(pki, ["localhost", "127.0.0.1"])
    inventory = tmp_path / "assets.yaml"
    inventory.write_text(INVENTORY_YAML)
    config = make_config(
        inventory,
        HEADEND_TLS_CERT=str(issued.cert_path),
        HEADEND_TLS_KEY=str(issued.key_path),
        HEADEND_AUTH="off",
    )
    gc_pauses.install()
    headend = Headend(config, plugins=load_plugins(env={}))
    await headend.start()
    try:
        async with httpx.AsyncClient(
            base_url=headend.http_url,
            verify=ssl.create_default_context(cafile=pki / certs.CA_CERT_FILE),
            timeout=10.0,
        ) as http:
            yield headend, http
    finally:
        await headend.stop()


def test_the_name_checker_finds_metrics_and_nothing_else_in_promql() -> None:
    expr = (
        'sum by (agent_id) (increase(der_a_total{job="x", le="0.5"}[15m])) '
        "/ on(instance) group_left der_b offset 5m > 2 * 86400 and up == 1e3"
    )
    assert promql_metric_names(expr) == {"der_a_total", "der_b", "up"}
    assert promql_metric_names("(der_c - time()) / 86400 < bool 3") == {"der_c"}


async def test_every_metric_the_runbooks_rules_and_dashboard_name_is_exposed(
    tls_headend: tuple[Headend, httpx.AsyncClient],
) -> None:
    _, http = tls_headend
    response = await http.get("/metrics")
    assert response.status_code == 200
    exposed = exposed_metric_names(response.text)
    named = named_metrics()
    assert len(named) > 20, "the extraction found the metrics the files name"
    missing = {
        name: sorted(where)
        for name, where in named.items()
        if name not in exposed
        and name not in EXTERNAL_METRICS
        and not name.startswith(BUS_ONLY_PREFIXES)
    }
    assert missing == {}, "named but not exposed by the headend"


async def test_every_endpoint_the_runbooks_name_is_served(
    tls_headend: tuple[Headend, httpx.AsyncClient],
) -> None:
    _, http = tls_headend
    schema = (await http.get("/schema/openapi.json")).json()
    served = [
        re.compile("^" + re.sub(r"\{[^/]+\}", "[^/]+", path) + "$") for path in schema["paths"]
    ]
    named = set(_ENDPOINT.findall(RUNBOOKS.read_text()))
    assert {"/healthz", "/metrics", "/agents", "/alarms", "/audit"} <= named
    unknown = sorted(path for path in named if not any(p.match(path) for p in served))
    assert unknown == [], "named in docs/runbooks.md, not served by the headend"


def _der_commands(text: str) -> set[tuple[str, ...]]:
    """Each ``der`` command line in ``text``'s shell blocks and inline code, as its
    words (placeholders and paths included)."""
    commands = set()
    for line in text.splitlines():
        for match in _DER_COMMAND.finditer(line):
            words = (match.group(1), *match.group(2).split())
            commands.add(words)
    return commands


def _help(words: tuple[str, ...]) -> str | None:
    """What ``der WORDS --help`` prints, or ``None`` when it fails: the ``der`` entry point
    (:func:`der_sdk.cli.main`, every installed plugin's commands) called in this process,
    not a child process per command (each would load every plugin again)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([*words, "--help"])
        except SystemExit as exc:
            code = exc.code
    return out.getvalue() if code in (0, None) else None


def test_every_der_command_and_flag_in_the_runbooks_and_deployment_guide_exists() -> None:
    commands = _der_commands(RUNBOOKS.read_text()) | _der_commands(DEPLOYMENT.read_text())
    assert {"certs", "check-config", "tokens", "plugins"} <= {words[0] for words in commands}
    helps: dict[tuple[str, ...], str | None] = {}
    problems = []
    for words in sorted(commands):
        # the longest prefix of plain words that is a command: `certs show`, `check-config`
        prefix = words[:2] if len(words) > 1 and re.fullmatch(r"[a-z][a-z-]*", words[1]) else ()
        text = None
        for candidate in (prefix, words[:1]):
            if candidate and candidate not in helps:
                helps[candidate] = _help(candidate)
            if candidate and helps[candidate] is not None:
                text = helps[candidate]
                break
        if text is None:
            problems.append(f"der {' '.join(words)}: no such command")
            continue
        for flag in (w.split("=", 1)[0] for w in words if w.startswith("--")):
            if flag not in text:
                problems.append(f"der {' '.join(words)}: no flag {flag}")
    assert problems == []


def test_every_alert_has_a_runbook_section_that_names_it() -> None:
    text = RUNBOOKS.read_text()
    anchors = _anchors(text)
    for rule in rules():
        runbook = rule["annotations"]["runbook"]
        page, _, anchor = runbook.partition("#")
        assert page == "docs/runbooks.md" and anchor in anchors, (rule["alert"], runbook)
        assert f"`{rule['alert']}`" in text, f"{rule['alert']} is not named in the runbooks"


def test_the_dashboard_has_unique_panels_on_the_datasource_variable() -> None:
    document = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in document["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
    assert len(list(dashboard_exprs())) > 20


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings in ``markdown``."""
    return {
        re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", markdown, re.MULTILINE)
    }


@pytest.mark.parametrize("page", [RUNBOOKS, DEPLOYMENT], ids=lambda p: p.name)
def test_every_relative_link_of_the_page_reaches_a_file_and_heading(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (
            anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text())
        ):
            broken.append(target)
    assert broken == []
