"""The operator console over HTTP: sign-in with a REST token kept in a cookie, CSRF on every
change, roles on pages, and every script and style served by the headend itself.

Browser flows are in tests/console (Playwright); these check the server's answers.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from headend_kit import (
    BESS_1,
    BESS_2,
    BESS_3,
    PV_1,
    SITE_A,
    WAIT_S,
    bearer,
    eventually,
    make_config,
    sample,
)

from der_sdk.models import BufferStats, utc_now
from der_sdk.wire import codec
from der_sdk_headend import Headend
from der_sdk_headend.console.auth import COOKIE, CSRF_HEADER, session_cookie
from der_sdk_headend.console.pages import PAGE_SIZE

CSRF_META = re.compile(r'<meta name="csrf-token" content="([0-9a-f]+)">')
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(https?://[^"'\s>]+)""", re.IGNORECASE)


def csrf_of(html: str) -> str:
    match = CSRF_META.search(html)
    assert match, "the page has no csrf-token meta tag"
    return match.group(1)


async def sign_in(http: httpx.AsyncClient, secret: str, next_path: str = "/") -> httpx.Response:
    return await http.post("/console/sign-in", data={"token": secret, "next": next_path})


async def audit_actions(http: httpx.AsyncClient, admin: str) -> list[dict[str, Any]]:
    response = await http.get("/audit", headers=bearer(admin))
    assert response.status_code == 200, response.text
    records: list[dict[str, Any]] = response.json()
    return records


def external_urls(html: str, own: str) -> list[str]:
    return [url for url in EXTERNAL.findall(html) if not url.startswith(own)]


# ----------------------------------------------------------------------------- sign in / out


async def test_a_page_without_sign_in_redirects_to_the_sign_in_page(
    auth_http: httpx.AsyncClient,
) -> None:
    response = await auth_http.get("/console/agents?x=1")
    assert response.status_code == 303
    assert response.headers["location"] == "/console/sign-in?next=/console/agents%3Fx%3D1"
    form = await auth_http.get(response.headers["location"])
    assert form.status_code == 200
    assert 'name="token"' in form.text and '<label for="token">' in form.text


async def test_sign_in_with_a_good_token_sets_an_httponly_samesite_cookie_and_redirects(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    response = await sign_in(auth_http, role_tokens["viewer"], "/console/agents")
    assert response.status_code == 303
    assert response.headers["location"] == "/console/agents"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower() and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP here; Secure under TLS
    fleet = await auth_http.get("/")
    assert fleet.status_code == 200
    assert "test viewer" in fleet.text
    records = await audit_actions(auth_http, role_tokens["admin"])
    assert any(r["action"] == "console.sign_in" for r in records)


async def test_sign_in_never_redirects_off_the_headend(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    response = await sign_in(auth_http, role_tokens["viewer"], "//evil.example/x")
    assert response.headers["location"] == "/"


async def test_sign_in_from_a_page_of_another_site_is_refused(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    data = {"token": role_tokens["viewer"], "next": "/"}
    foreign = await auth_http.post(
        "/console/sign-in", data=data, headers={"Origin": "http://evil.example"}
    )
    assert foreign.status_code == 403 and "another site" in foreign.text
    assert "set-cookie" not in foreign.headers
    own = await auth_http.post(
        "/console/sign-in", data=data, headers={"Origin": str(auth_http.base_url).rstrip("/")}
    )
    assert own.status_code == 303


async def test_a_wrong_token_is_refused_with_a_clear_message(
    auth_http: httpx.AsyncClient,
) -> None:
    response = await sign_in(auth_http, "der_not-a-real-token")
    assert response.status_code == 401
    assert "Unknown token" in response.text
    assert "set-cookie" not in response.headers
    assert (await auth_http.get("/")).status_code == 303


async def test_a_revoked_token_cannot_sign_in_and_its_cookie_stops_working(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    admin = bearer(role_tokens["admin"])
    made = await auth_http.post("/tokens", json={"role": "viewer", "name": "soon"}, headers=admin)
    secret, token_id = made.json()["token"], made.json()["id"]
    await sign_in(auth_http, secret)
    assert (await auth_http.get("/")).status_code == 200
    assert (await auth_http.delete(f"/tokens/{token_id}", headers=admin)).status_code == 200
    assert (await auth_http.get("/")).status_code == 303  # back to the sign-in page
    refused = await sign_in(auth_http, secret)
    assert refused.status_code == 401
    assert f"Token {token_id} was revoked" in refused.text
    # An htmx request is told where to go instead of getting a redirect to swap in.
    partial = await auth_http.get("/", headers={"HX-Request": "true"})
    assert partial.status_code == 401 and partial.headers["HX-Redirect"] == "/console/sign-in"


def test_the_cookie_is_secure_under_tls() -> None:
    def cookie_for(tls: bool) -> Any:
        return session_cookie(SimpleNamespace(config=SimpleNamespace(tls=tls)), "der_x")  # type: ignore[arg-type]

    assert cookie_for(True).secure and cookie_for(True).httponly
    assert not cookie_for(False).secure
    assert cookie_for(True).samesite == "strict"


async def test_sign_out_clears_the_cookie_and_is_audited(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    await sign_in(auth_http, role_tokens["operator"])
    token = csrf_of((await auth_http.get("/")).text)
    response = await auth_http.post("/console/sign-out", data={"csrf_token": token})
    assert response.status_code == 303
    assert response.headers["location"] == "/console/sign-in"
    assert "Max-Age=0" in response.headers["set-cookie"]
    assert (await auth_http.get("/")).status_code == 303
    records = await audit_actions(auth_http, role_tokens["admin"])
    assert any(
        r["action"] == "console.sign_out" and "test operator" in r["actor"]["name"] for r in records
    )


# ----------------------------------------------------------------------------- CSRF


async def test_a_cookie_without_the_csrf_token_cannot_post(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    await sign_in(auth_http, role_tokens["operator"])
    token = csrf_of((await auth_http.get("/")).text)
    refused = await auth_http.post("/console/sign-out")
    assert refused.status_code == 403
    assert "CSRF" in refused.text
    forged = await auth_http.post("/console/sign-out", data={"csrf_token": "0" * 64})
    assert forged.status_code == 403
    dispatch = await auth_http.post("/dispatch", json={"asset_id": "x", "mw": 0.1})
    assert dispatch.status_code == 403 and "CSRF" in dispatch.text
    # The same cookie with the page's token in the header passes the check (and then the
    # body is checked as any REST call's).
    checked = await auth_http.post(
        "/dispatch", json={"asset_id": "x", "mw": 0.1}, headers={CSRF_HEADER: token}
    )
    assert checked.status_code not in (401, 403), checked.text


async def test_a_rest_call_with_an_authorization_header_needs_no_csrf_token(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    await sign_in(auth_http, role_tokens["viewer"])  # a cookie of another role is ignored
    response = await auth_http.post(
        "/tokens", json={"role": "viewer", "name": "no-csrf"}, headers=bearer(role_tokens["admin"])
    )
    assert response.status_code == 201, response.text


# ----------------------------------------------------------------------------- roles


async def test_a_viewer_gets_pages_but_not_the_admin_audit_page(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    await sign_in(auth_http, role_tokens["viewer"])
    for path in ("/", "/console/agents"):
        response = await auth_http.get(path)
        assert response.status_code == 200, path
    page = (await auth_http.get("/")).text
    assert 'href="/console/audit"' not in page
    audit = await auth_http.get("/console/audit")
    assert audit.status_code == 403
    assert "admin" in audit.text


async def test_an_admin_gets_the_audit_page(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    await sign_in(auth_http, role_tokens["admin"])
    page = await auth_http.get("/console/audit")
    assert page.status_code == 200
    assert "console.sign_in" in page.text


async def test_with_authentication_off_the_console_needs_no_sign_in(
    http: httpx.AsyncClient,
) -> None:
    for path in ("/", "/console/agents", "/console/audit"):
        response = await http.get(path)
        assert response.status_code == 200, path
    assert (await http.get("/console/sign-in")).status_code == 302
    page = (await http.get("/")).text
    assert "authentication off" in page
    # Console forms are still checked: a cross-site form cannot act as the anonymous admin.
    assert (await http.post("/console/sign-out")).status_code == 403
    ok = await http.post("/console/sign-out", data={"csrf_token": csrf_of(page)})
    assert ok.status_code == 303


# ----------------------------------------------------------------------------- offline assets


async def test_pages_and_swagger_load_only_the_headends_own_scripts(
    headend: Headend, http: httpx.AsyncClient
) -> None:
    own = headend.http_url
    for path in ("/", "/console/agents", "/console/audit", "/schema/swagger"):
        html = (await http.get(path)).text
        assert external_urls(html, own) == [], path
        for asset in re.findall(r"""(?:src|href)=["'](/console/static/[^"']+)""", html):
            response = await http.get(asset)
            assert response.status_code == 200, asset
    swagger = (await http.get("/schema/swagger")).text
    assert "/console/static/swagger/swagger-ui-bundle.js" in swagger
    for name in ("htmx.min.js", "htmx-ext-sse.min.js", "uPlot.iife.min.js", "uPlot.min.css"):
        response = await http.get(f"/console/static/{name}")
        assert response.status_code == 200 and len(response.content) > 1000, name


async def test_console_routes_are_not_in_the_openapi_schema(http: httpx.AsyncClient) -> None:
    paths = (await http.get("/schema/openapi.json")).json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/console")]


# ----------------------------------------------------------------------------- Fleet, Agents


async def test_the_fleet_shows_live_values_site_totals_and_makes_offline_stand_out(
    http: httpx.AsyncClient, connect_agent: Any
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_1, BESS_2])
    await agent.telemetry(
        1,
        [
            sample(BESS_1, mw=1.5, mw_setpoint=1.5, details={"soc_pct": 55.0}),
            sample(BESS_2, mw=-0.25, quality="uncertain", quality_reason="stale"),
        ],
    )
    html = (await http.get("/")).text
    row = asset_row(html, BESS_1)
    assert 'data-field="mw" data-digits="3">1.500<' in row
    assert 'data-field="mw_setpoint" data-digits="3">1.500<' in row
    assert 'data-field="details.soc_pct" data-digits="1" data-unit="%">55.0 %<' in row
    assert "connected" in row and "offline" not in row
    assert "uncertain" in asset_row(html, BESS_2)
    offline = asset_row(html, BESS_3)  # registered by nobody
    assert 'class="offline"' in offline and "badge off" in offline
    site_row = re.search(rf'<tr class="site-row" data-site-id="{SITE_A}"[^>]*>.*?</tr>', html, re.S)
    assert site_row and 'data-field="site_mw">1.250<' in site_row.group(0)
    assert 'data-others="{}"' in site_row.group(0)  # all its assets are on the page
    assert "2/3 connected" in site_row.group(0)
    buffer = BufferStats(batches=3, samples=120, bytes=4096, oldest_age_s=12.5, dropped_samples=7)
    await agent.send(codec.agent_heartbeat("gw-1", utc_now(), 1.0, buffer))

    async def buffer_shown() -> bool:
        return "120 samples" in (await http.get("/console/agents")).text

    await eventually(buffer_shown, "the Agents page shows the heartbeat's buffer figures")
    agents = (await http.get("/console/agents")).text
    session = re.search(r'<tr data-agent-id="gw-1">.*?</tr>', agents, re.S)
    assert session, "no live session row for gw-1"
    row = session.group(0)
    assert "127.0.0.1" in row and "3 batches" in row and "4096 B" in row
    assert "12.5 s" in row and 'data-field="buffer_dropped">7<' in row


async def test_the_fleet_filters_on_the_server_and_answers_htmx_with_the_table_alone(
    http: httpx.AsyncClient,
) -> None:
    response = await http.get("/", params={"q": "pv"})
    assert asset_ids(response.text) == {PV_1}
    by_site = await http.get("/", params={"site": SITE_A})
    assert asset_ids(by_site.text) == {BESS_1, BESS_2, BESS_3}
    offline = await http.get("/", params={"status": "online"})
    assert asset_ids(offline.text) == set()
    partial = await http.get("/", params={"q": "BESS 2"}, headers={"HX-Request": "true"})
    assert partial.text.lstrip().startswith('<section id="fleet-table"')
    assert "<html" not in partial.text
    assert asset_ids(partial.text) == {BESS_2}


@pytest.fixture
def big_inventory_path(tmp_path: Path) -> Path:
    """1,000 assets on 20 sites."""
    sites = [str(uuid.UUID(int=0x5000 + s)) for s in range(20)]
    lines = ["sites:"]
    lines += [f"  - site_id: {site}\n    name: Site {n:02d}" for n, site in enumerate(sites)]
    lines.append("assets:")
    for n in range(1000):
        kind = "bess" if n % 2 else "pv"
        lines.append(
            f"  - asset_id: {unit_id(n)}\n    site_id: {sites[n % 20]}\n"
            f"    name: Unit {n:04d}\n    asset_type: {kind}\n    max_mw: 1.0\n"
            f"    min_mw: {-1.0 if kind == 'bess' else 0.0}\n    capacity_mwh: 2.0"
        )
    path = tmp_path / "big.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_the_fleet_pages_through_1000_assets_and_searches_them(
    big_inventory_path: Path, plugins: Any
) -> None:
    server = Headend(make_config(big_inventory_path), plugins=plugins)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT_S) as http:
            seen: set[str] = set()
            first = await http.get("/")
            assert first.status_code == 200
            assert "1000</strong> assets" in first.text and "1000</strong> offline" in first.text
            assert len(asset_ids(first.text)) == PAGE_SIZE
            for number in range(1, 1000 // PAGE_SIZE + 1):
                page_html = (await http.get("/", params={"page": number})).text
                seen |= asset_ids(page_html)
            assert len(seen) == 1000
            found = await http.get("/", params={"q": "unit 0042"})
            hits = asset_ids(found.text)
            assert unit_id(42) in hits and len(hits) < 5  # and any whose id has 0042
            assert all("0042" in asset_row(found.text, hit) for hit in hits)
            site_3 = str(uuid.UUID(int=0x5000 + 3))  # assets 3, 23, ...: every one bess
            site = await http.get("/", params={"site": site_3, "type": "bess"})
            assert "50 matching" in site.text
            assert len(asset_ids(site.text)) == 50
            agents = await http.get("/console/agents", params={"q": "unit 0999"})
            assert unit_id(999) in asset_ids(agents.text)
            assert len(asset_ids(agents.text)) < 5
    finally:
        await server.stop()


def unit_id(n: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"der-sdk-console-test-unit-{n}"))


def asset_ids(html: str) -> set[str]:
    return set(re.findall(r'<tr data-asset-id="([0-9a-f-]+)"', html))


def asset_row(html: str, asset_id: str) -> str:
    match = re.search(rf'<tr data-asset-id="{asset_id}".*?</tr>', html, re.S)
    assert match, f"no row for {asset_id}"
    return match.group(0)


def test_the_console_package_imports_on_its_own() -> None:
    # The console imports rest.auth, whose package imports the app that mounts the console.
    for module in ("der_sdk_headend.console", "der_sdk_headend.console.pages"):
        done = subprocess.run(
            [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
