"""The operator console over HTTP: sign-in with a REST token kept in a cookie, CSRF on every
change, roles on pages, and every script and style served by the headend itself.

Browser flows are in tests/console (Playwright); these check the server's answers.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
from headend_kit import bearer

from der_sdk_headend import Headend
from der_sdk_headend.console.auth import COOKIE, CSRF_HEADER

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


async def test_a_wrong_token_is_refused_with_a_clear_message(
    auth_http: httpx.AsyncClient,
) -> None:
    response = await sign_in(auth_http, "der_not-a-real-token")
    assert response.status_code == 401
    assert "Unknown token" in response.text
    assert "set-cookie" not in response.headers
    assert (await auth_http.get("/")).status_code == 303


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
