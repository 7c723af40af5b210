"""REST authentication and roles: the access matrix over every route of the app, tokens
changed over REST and with ``der tokens`` (revocation at once), the audit trail, the
``HEADEND_AUTH`` modes, and the OpenAPI security scheme.

Every test here also checks that no token secret reached a log record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from headend_kit import BESS_1, NOT_IN_INVENTORY, WAIT_S, bearer, eventually, make_config
from litestar import Litestar, get
from litestar.testing import AsyncTestClient

from der_sdk.cli import main as der_main
from der_sdk.errors import DerSdkError
from der_sdk.plugins import Plugins
from der_sdk_headend import Headend, HeadendConfig
from der_sdk_headend.console.auth import CONSOLE_KEY
from der_sdk_headend.rest import create_app
from der_sdk_headend.rest.auth import (
    RELOAD_INTERVAL_S,
    DenialLimiter,
    RestAuth,
    access,
    access_of,
    check_access_rules,
    check_auth_config,
    create_auth_middleware,
)
from der_sdk_headend.rest.errors import EXCEPTION_HANDLERS
from der_sdk_headend.tokens import TokenFileStore, hash_secret, match_secret

Role = str | None
ROLES_TRIED: tuple[Role, ...] = (None, "viewer", "operator", "admin")
RANK = {None: 0, "viewer": 1, "operator": 2, "admin": 3}

ROUTE_RULES: dict[tuple[str, str], str] = {
    ("GET", "/assets"): "viewer",
    ("GET", "/assets/{asset_id:str}"): "viewer",
    ("GET", "/sites"): "viewer",
    ("GET", "/agents"): "viewer",
    ("GET", "/telemetry/{asset_id:str}"): "viewer",
    ("GET", "/telemetry/{asset_id:str}/history"): "viewer",
    ("POST", "/dispatch"): "operator",
    ("POST", "/dispatch/preview"): "operator",
    ("GET", "/dispatch/history"): "viewer",
    ("GET", "/dispatch/{dispatch_id:str}"): "viewer",
    ("POST", "/dispatch/{dispatch_id:str}/cancel"): "operator",
    ("GET", "/heartbeat/{asset_id:str}"): "viewer",
    ("GET", "/heartbeat/{asset_id:str}/history"): "viewer",
    ("GET", "/events"): "viewer",
    ("GET", "/plugins"): "viewer",
    ("GET", "/healthz"): "open",
    ("GET", "/metrics"): "viewer",  # METRICS_AUTH=viewer, the default
    ("GET", "/tokens"): "admin",
    ("POST", "/tokens"): "admin",
    ("DELETE", "/tokens/{token_id:str}"): "admin",
    ("GET", "/audit"): "admin",
    ("GET", "/alarms"): "viewer",
    ("GET", "/alarms/{alarm_id:str}"): "viewer",
    ("POST", "/alarms/{alarm_id:str}/ack"): "operator",
    ("GET", "/telemetry/export"): "operator",
}
"""The documented rule of every route (docs/headend.md, "REST authentication"). OpenAPI
and documentation pages under /schema and Litestar's automatic OPTIONS are open."""

UNKNOWN_DISPATCH = str(uuid.UUID(int=7))
SPARE_TOKEN_NAME = "spare"

# What each route is asked in the matrix, and its status when the role suffices.
REQUESTS: dict[tuple[str, str], tuple[str, Any, int]] = {
    ("GET", "/assets"): ("/assets", None, 200),
    ("GET", "/assets/{asset_id:str}"): (f"/assets/{BESS_1}", None, 200),
    ("GET", "/sites"): ("/sites", None, 200),
    ("GET", "/agents"): ("/agents", None, 200),
    ("GET", "/telemetry/{asset_id:str}"): (f"/telemetry/{BESS_1}", None, 404),  # none yet
    ("GET", "/telemetry/{asset_id:str}/history"): (f"/telemetry/{BESS_1}/history", None, 200),
    ("POST", "/dispatch"): ("/dispatch", {"asset_id": BESS_1, "mw": 0.5}, 202),
    ("POST", "/dispatch/preview"): ("/dispatch/preview", {"asset_id": BESS_1, "mw": 0.5}, 200),
    ("GET", "/dispatch/history"): ("/dispatch/history", None, 200),
    ("GET", "/dispatch/{dispatch_id:str}"): (f"/dispatch/{UNKNOWN_DISPATCH}", None, 404),
    ("POST", "/dispatch/{dispatch_id:str}/cancel"): (
        f"/dispatch/{UNKNOWN_DISPATCH}/cancel",
        None,
        404,
    ),
    ("GET", "/heartbeat/{asset_id:str}"): (f"/heartbeat/{BESS_1}", None, 404),  # none yet
    ("GET", "/heartbeat/{asset_id:str}/history"): (f"/heartbeat/{BESS_1}/history", None, 200),
    ("GET", "/events"): ("/events", None, 200),
    ("GET", "/plugins"): ("/plugins", None, 200),
    ("GET", "/healthz"): ("/healthz", None, 200),
    ("GET", "/metrics"): ("/metrics", None, 200),
    ("GET", "/tokens"): ("/tokens", None, 200),
    ("POST", "/tokens"): ("/tokens", {"role": "viewer", "name": "matrix"}, 201),
    ("DELETE", "/tokens/{token_id:str}"): ("/tokens/{spare}", None, 200),
    ("GET", "/audit"): ("/audit", None, 200),
    ("GET", "/alarms"): ("/alarms", None, 200),
    ("GET", "/alarms/{alarm_id:str}"): ("/alarms/none", None, 404),
    ("POST", "/alarms/{alarm_id:str}/ack"): ("/alarms/none/ack", None, 404),
    ("GET", "/telemetry/export"): ("/telemetry/export?from=2025-01-01&to=2025-01-02", None, 200),
}


def app_routes(headend: Headend) -> dict[tuple[str, str], str | None]:
    """Every (method, path) the REST app serves, with the rule its handler declares."""
    app = create_app(headend)
    return {
        (method, route.path): access_of(handler)
        for route in app.routes
        for handler in getattr(route, "route_handlers", ())
        for method in handler.http_methods
        if not handler.opt.get(CONSOLE_KEY)  # the console's pages: tests/headend/test_console.py
    }


def expected_rule(method: str, path: str) -> str:
    if method == "OPTIONS" or path == "/schema" or path.startswith("/schema/"):
        return "open"
    return ROUTE_RULES[(method, path)]


# --------------------------------------------------------------------------- no secrets logged


@pytest.fixture
def seen_secrets() -> list[str]:
    """Every token secret a test handled; none may appear in a log record."""
    return []


@pytest.fixture(autouse=True)
def no_secret_in_logs(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture, seen_secrets: list[str]
) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    if "role_tokens" in request.fixturenames:
        seen_secrets.extend(request.getfixturevalue("role_tokens").values())
    yield
    records = caplog.get_records("setup") + caplog.get_records("call")
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.stack_info or ''}" for r in records)
    for secret in seen_secrets:
        assert secret not in text, "a token secret reached a log record"


# --------------------------------------------------------------------------- helpers


async def audit(http: httpx.AsyncClient, headers: dict[str, str], **params: Any) -> list[Any]:
    response = await http.get("/audit", params=params, headers=headers)
    assert response.status_code == 200, response.text
    records: list[Any] = response.json()
    return records


async def token_id_named(http: httpx.AsyncClient, admin: str, name: str) -> str:
    rows = (await http.get("/tokens", headers=bearer(admin))).json()
    return str(next(r["id"] for r in rows if r["name"] == name))


def run_der(*args: str) -> int:
    return der_main(list(args))


# --------------------------------------------------------------------------- the matrix


def test_every_route_has_a_documented_rule(auth_headend: Headend) -> None:
    routes = app_routes(auth_headend)
    undocumented = sorted(
        f"{m} {p}"
        for m, p in routes
        if m != "OPTIONS" and not p.startswith("/schema") and (m, p) not in ROUTE_RULES
    )
    assert not undocumented, f"routes without a rule in ROUTE_RULES (and docs): {undocumented}"
    stale = sorted(f"{m} {p}" for m, p in ROUTE_RULES if (m, p) not in routes)
    assert not stale, f"rules for routes the app no longer has: {stale}"
    metrics = "metrics"  # declared as "metrics": viewer unless METRICS_AUTH=open
    mismatched = {
        key: declared
        for key, declared in routes.items()
        if declared != expected_rule(*key)
        and not (key == ("GET", "/metrics") and declared == metrics)
    }
    assert not mismatched, f"declared rules differ from the documented ones: {mismatched}"


async def test_each_role_gets_the_documented_status_on_every_route(
    auth_headend: Headend,
    auth_http: httpx.AsyncClient,
    role_tokens: dict[str, str],
    seen_secrets: list[str],
) -> None:
    admin = bearer(role_tokens["admin"])
    spare = await auth_http.post(
        "/tokens", json={"role": "viewer", "name": SPARE_TOKEN_NAME}, headers=admin
    )
    assert spare.status_code == 201, spare.text
    seen_secrets.append(spare.json()["token"])

    failures: list[str] = []
    routes = sorted(app_routes(auth_headend))
    for method, template in routes:
        rule = expected_rule(method, template)
        if (method, template) in REQUESTS:
            path, body, allowed_status = REQUESTS[(method, template)]
            path = path.format(spare=spare.json()["id"])
        else:  # /schema pages and OPTIONS: open, any answer but 401/403
            path, body, allowed_status = template.replace("{path:str}", "nope"), None, 0
        for role in ROLES_TRIED:
            headers = bearer(role_tokens[role]) if role else {}
            response = await auth_http.request(method, path, json=body, headers=headers)
            if response.status_code in (201,) and method == "POST" and path == "/tokens":
                seen_secrets.append(response.json()["token"])
            allowed = rule == "open" or RANK[role] >= RANK[rule]
            where = f"{role or 'no token'}: {method} {path} (needs {rule})"
            if allowed:
                ok = (
                    response.status_code == allowed_status
                    if allowed_status
                    else response.status_code not in (401, 403)
                )
                if not ok:
                    failures.append(f"{where}: {response.status_code} {response.text[:200]}")
            elif role is None:
                if response.status_code != 401:
                    failures.append(f"{where}: {response.status_code}, expected 401")
                elif not response.headers.get("WWW-Authenticate", "").startswith("Bearer"):
                    failures.append(f"{where}: 401 without WWW-Authenticate: Bearer")
                elif set(response.json()) != {"status_code", "detail", "extra"}:
                    failures.append(f"{where}: 401 body is not the error body: {response.text}")
            else:
                detail = response.json().get("detail", "") if response.status_code == 403 else ""
                if response.status_code != 403:
                    failures.append(f"{where}: {response.status_code}, expected 403")
                elif f"needs the {rule} role" not in detail:
                    failures.append(f"{where}: 403 detail does not name the role: {detail}")
    assert not failures, "\n".join(failures)


async def test_metrics_needs_no_token_with_metrics_auth_open(
    inventory_path: Path, plugins: Plugins, role_tokens: dict[str, str]
) -> None:
    config = make_config(inventory_path, HEADEND_AUTH="on", METRICS_AUTH="open")
    headend = Headend(config, plugins=plugins)
    await headend.start()
    try:
        async with httpx.AsyncClient(base_url=headend.http_url, timeout=WAIT_S) as http:
            assert (await http.get("/metrics")).status_code == 200
            assert (await http.get("/assets")).status_code == 401
    finally:
        await headend.stop()


async def test_malformed_authorization_and_unknown_tokens_are_401_without_echo(
    auth_http: httpx.AsyncClient,
) -> None:
    bogus = "der_" + "A" * 43
    for headers, detail in (
        ({"Authorization": "Basic dXNlcjpwdw=="}, "is not `Bearer <token>`"),
        ({"Authorization": "Bearer"}, "is not `Bearer <token>`"),
        (bearer(bogus), "unknown token"),
        (bearer("not-even-ours"), "unknown token"),
    ):
        response = await auth_http.get("/assets", headers=headers)
        assert response.status_code == 401
        assert detail in response.json()["detail"]
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
        assert bogus not in response.text and "not-even-ours" not in response.text


async def test_refusals_are_the_error_body_with_a_bearer_challenge(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    """The access check runs as a middleware: its refusals still go through the app's
    exception handlers, and routing still answers unknown paths and methods first."""
    missing = await auth_http.get("/assets")
    assert (missing.status_code, missing.headers["content-type"]) == (401, "application/json")
    assert missing.json() == {
        "status_code": 401,
        "detail": "missing bearer token: send `Authorization: Bearer <token>` (an admin "
        "creates tokens with `der tokens create` or POST /tokens)",
        "extra": None,
    }
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="der-sdk headend"'
    unknown = await auth_http.get("/assets", headers=bearer("der_" + "C" * 43))
    assert unknown.json() == {"status_code": 401, "detail": "unknown token", "extra": None}
    assert unknown.headers["WWW-Authenticate"] == (
        'Bearer realm="der-sdk headend", error="invalid_token"'
    )
    lower = await auth_http.get("/assets", headers={"authorization": "bearer  " + "x"})
    assert lower.json()["detail"] == "unknown token", "scheme in any case, spaces stripped"

    viewer = bearer(role_tokens["viewer"])
    token_id = await token_id_named(auth_http, role_tokens["admin"], "test viewer")
    forbidden = await auth_http.get("/audit", headers=viewer)
    assert (forbidden.status_code, forbidden.headers["content-type"]) == (403, "application/json")
    assert forbidden.json() == {
        "status_code": 403,
        "detail": f"GET /audit needs the admin role; token {token_id} has the viewer role",
        "extra": None,
    }
    assert "WWW-Authenticate" not in forbidden.headers

    for headers in ({}, viewer):
        nowhere = await auth_http.get("/no-such-thing", headers=headers)
        assert nowhere.status_code == 404 and set(nowhere.json()) == {
            "status_code",
            "detail",
            "extra",
        }
        assert (await auth_http.post("/assets", headers=headers)).status_code == 405


async def test_a_route_without_a_rule_needs_admin(
    auth_headend: Headend, role_tokens: dict[str, str]
) -> None:
    """Closed by default even where :func:`check_access_rules` was not called."""

    @get("/forgotten", sync_to_thread=False)
    def forgotten() -> str:
        return "no rule"

    @get("/open", sync_to_thread=False, **access("open"))
    def anybody() -> str:
        return "open"

    app = Litestar(
        route_handlers=[forgotten, anybody],
        middleware=[create_auth_middleware(auth_headend)],
        exception_handlers=EXCEPTION_HANDLERS,
    )
    async with AsyncTestClient(app) as client:
        assert (await client.get("/open")).text == "open"
        assert (await client.get("/forgotten")).status_code == 401
        refused = await client.get("/forgotten", headers=bearer(role_tokens["operator"]))
        assert refused.status_code == 403
        assert "needs the admin role" in refused.json()["detail"]
        allowed = await client.get("/forgotten", headers=bearer(role_tokens["admin"]))
        assert (allowed.status_code, allowed.text) == (200, "no rule")


async def test_tokens_are_identified_by_their_hash_revoked_ones_too(
    tmp_path: Path, seen_secrets: list[str]
) -> None:
    store = TokenFileStore(tmp_path / "tokens.json")
    kept, kept_secret, _, _ = store.create(role="viewer", name="kept")
    gone, gone_secret, _, _ = store.create(role="admin", name="gone")
    store.revoke(gone.id)
    seen_secrets += [kept_secret, gone_secret]
    (tmp_path / "assets.yaml").write_text("sites: []\nassets: []\n")
    auth = RestAuth(make_config(tmp_path / "assets.yaml"))
    await auth.start()
    try:
        tokens = auth.tokens()
        tried = (kept_secret, gone_secret, kept_secret + "x", "der_", "x" + kept_secret)
        for i, secret in enumerate(tried):
            assert auth.identify(secret) == match_secret(tokens, secret), f"secret {i}"
        assert auth.identify(kept_secret) == kept
        revoked = auth.identify(gone_secret)
        assert revoked is not None and revoked.id == gone.id and not revoked.active
        assert auth.identify(hash_secret(kept_secret)) is None, "a hash is not a secret"

        new, new_secret = await auth.create(role="operator", name="new")
        seen_secrets.append(new_secret)
        assert auth.identify(new_secret) == new
        revoked_now, _ = await auth.revoke(kept.id)
        assert auth.identify(kept_secret) == revoked_now and not revoked_now.active
    finally:
        await auth.close()


# --------------------------------------------------------------------------- revocation


async def test_a_token_revoked_over_rest_is_refused_on_the_next_request(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str], seen_secrets: list[str]
) -> None:
    admin = bearer(role_tokens["admin"])
    response = await auth_http.post(
        "/tokens", json={"role": "viewer", "name": "short-lived"}, headers=admin
    )
    assert response.status_code == 201, response.text
    created = response.json()
    secret = created["token"]
    seen_secrets.append(secret)
    assert secret.startswith("der_") and len(secret) >= 40
    assert created["id"].startswith("tok_") and created["role"] == "viewer"
    assert "hash" not in created
    assert response.headers["Cache-Control"] == "no-store"
    assert (await auth_http.get("/assets", headers=bearer(secret))).status_code == 200

    revoked = await auth_http.delete(f"/tokens/{created['id']}", headers=admin)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["active"] is False and revoked.json()["revoked_at"]

    refused = await auth_http.get("/assets", headers=bearer(secret))
    assert refused.status_code == 401
    assert f"token {created['id']} was revoked" in refused.json()["detail"]
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    again = await auth_http.delete(f"/tokens/{created['id']}", headers=admin)
    assert again.status_code == 200, "revoking twice changes nothing"
    missing = await auth_http.delete("/tokens/tok_00000000", headers=admin)
    assert missing.status_code == 404


async def test_a_token_revoked_with_the_cli_is_refused_within_a_second(
    auth_http: httpx.AsyncClient,
    role_tokens: dict[str, str],
    tokens_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    viewer = bearer(role_tokens["viewer"])
    assert (await auth_http.get("/assets", headers=viewer)).status_code == 200
    token_id = await token_id_named(auth_http, role_tokens["admin"], "test viewer")

    code = await asyncio.to_thread(
        run_der, "tokens", "revoke", token_id, "--file", str(tokens_path)
    )
    assert code == 0
    assert f"revoked token {token_id}" in capsys.readouterr().out
    revoked_at = asyncio.get_running_loop().time()

    async def refused() -> bool:
        return (await auth_http.get("/assets", headers=viewer)).status_code == 401

    await eventually(refused, "the CLI-revoked token is refused", deadline_s=1.5)
    assert asyncio.get_running_loop().time() - revoked_at < 2 * RELOAD_INTERVAL_S + 0.5

    async def audited() -> bool:
        records = await audit(auth_http, bearer(role_tokens["admin"]), action="token.revoke")
        return any(r["details"]["token_id"] == token_id for r in records)

    await eventually(audited, "the CLI revocation is in the audit trail")
    record = (await audit(auth_http, bearer(role_tokens["admin"]), action="token.revoke"))[0]
    assert record["actor"]["kind"] == "cli" and "@" in record["actor"]["name"]
    assert record["source"] == "cli" and record["outcome"] == "ok"

    async def left_the_file() -> bool:
        return not (await asyncio.to_thread(TokenFileStore(tokens_path).read)).unaudited

    await eventually(left_the_file, "audited changes leave the file")


async def test_a_token_created_with_the_cli_works_within_a_second_and_is_audited(
    auth_http: httpx.AsyncClient,
    role_tokens: dict[str, str],
    tokens_path: Path,
    capsys: pytest.CaptureFixture[str],
    seen_secrets: list[str],
) -> None:
    import json

    args = ["tokens", "create", "--role", "operator", "--name", "cli-made", "--json"]
    code = await asyncio.to_thread(run_der, *args, "--file", str(tokens_path))
    assert code == 0
    created = json.loads(capsys.readouterr().out)
    secret = created["token"]
    seen_secrets.append(secret)

    async def accepted() -> bool:
        return (await auth_http.get("/assets", headers=bearer(secret))).status_code == 200

    await eventually(accepted, "the CLI-made token is accepted", deadline_s=1.5)
    admin = bearer(role_tokens["admin"])

    async def audited() -> bool:
        records = await audit(auth_http, admin, action="token.create")
        return any(r["details"].get("token_id") == created["id"] for r in records)

    await eventually(audited, "the CLI creation is in the audit trail")
    record = next(
        r
        for r in await audit(auth_http, admin, action="token.create")
        if r["details"]["token_id"] == created["id"]
    )
    assert record["actor"]["kind"] == "cli"
    assert record["details"]["role"] == "operator" and record["details"]["token_name"] == "cli-made"


async def test_cli_changes_made_while_the_headend_was_down_are_audited_at_start(
    inventory_path: Path,
    plugins: Plugins,
    tokens_path: Path,
    capsys: pytest.CaptureFixture[str],
    seen_secrets: list[str],
) -> None:
    assert run_der("tokens", "create", "--role", "admin", "--file", str(tokens_path)) == 0
    secret = capsys.readouterr().out.strip()
    seen_secrets.append(secret)
    assert len(TokenFileStore(tokens_path).read().unaudited) == 1

    headend = Headend(make_config(inventory_path), plugins=plugins)  # auto: a token exists
    await headend.start()
    try:
        async with httpx.AsyncClient(base_url=headend.http_url, timeout=WAIT_S) as http:
            assert (await http.get("/assets")).status_code == 401, "auto is on with a token"
            records = await audit(http, bearer(secret), action="token.create")
        assert [r["actor"]["kind"] for r in records] == ["cli"]
        assert TokenFileStore(tokens_path).read().unaudited == []
    finally:
        await headend.stop()


# --------------------------------------------------------------------------- at rest


async def test_tokens_are_stored_as_hashes_in_a_private_file(
    auth_http: httpx.AsyncClient,
    role_tokens: dict[str, str],
    tokens_path: Path,
    seen_secrets: list[str],
) -> None:
    response = await auth_http.post(
        "/tokens", json={"role": "operator"}, headers=bearer(role_tokens["admin"])
    )
    seen_secrets.append(response.json()["token"])
    text = await asyncio.to_thread(tokens_path.read_text)
    assert stat.S_IMODE(os.stat(tokens_path).st_mode) == 0o600
    for secret in seen_secrets:
        assert secret not in text
        assert hash_secret(secret) in text
    listed = (await auth_http.get("/tokens", headers=bearer(role_tokens["admin"]))).text
    assert "hash" not in listed and all(hash_secret(s) not in listed for s in seen_secrets)


# --------------------------------------------------------------------------- audit trail


async def test_dispatch_token_changes_and_denials_are_audited_and_filterable(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str], seen_secrets: list[str]
) -> None:
    admin = bearer(role_tokens["admin"])
    operator = bearer(role_tokens["operator"])
    created = await auth_http.post(
        "/dispatch", json={"asset_id": BESS_1, "mw": 0.5}, headers=operator
    )
    assert created.status_code == 202, created.text
    unknown = await auth_http.post(
        "/dispatch", json={"asset_id": NOT_IN_INVENTORY, "mw": 0.5}, headers=operator
    )
    assert unknown.status_code == 404
    token = (
        await auth_http.post("/tokens", json={"role": "viewer", "name": "t"}, headers=admin)
    ).json()
    seen_secrets.append(token["token"])
    assert (await auth_http.delete(f"/tokens/{token['id']}", headers=admin)).status_code == 200
    assert (await auth_http.get("/assets")).status_code == 401
    bogus = "der_" + "B" * 43

    dispatches = await audit(auth_http, admin, action="dispatch.create")
    assert [r["outcome"] for r in dispatches] == ["refused", "ok"], "newest first"
    ok = dispatches[1]
    assert ok["actor"]["kind"] == "token" and ok["actor"]["role"] == "operator"
    assert ok["actor"]["name"].endswith("test operator")
    assert ok["source"] == "127.0.0.1"
    assert ok["asset_id"] == BESS_1
    assert ok["details"]["dispatch_id"] == created.json()["dispatch_id"]
    assert ok["details"]["mw"] == 0.5 and ok["details"]["state"] == "submitted"
    assert dispatches[0]["asset_id"] == NOT_IN_INVENTORY
    assert "UnknownTargetError" in dispatches[0]["details"]["reason"]

    (create,) = await audit(auth_http, admin, action="token.create")
    (revoke,) = await audit(auth_http, admin, action="token.revoke")
    for record in (create, revoke):
        assert record["details"]["token_id"] == token["id"]
        assert record["actor"]["role"] == "admin" and record["source"] == "127.0.0.1"
        assert record["outcome"] == "ok"

    (denied,) = await audit(auth_http, admin, action="rest.denied")
    assert denied["outcome"] == "denied" and denied["actor"]["kind"] == "anonymous"
    assert denied["details"]["status"] == 401 and denied["details"]["path"] == "/assets"
    assert denied["source"] == "127.0.0.1"

    await asyncio.sleep(1.0)  # the next refusal from this source gets its own record
    forbidden = await auth_http.get("/audit", headers=bearer(role_tokens["viewer"]))
    assert forbidden.status_code == 403
    refused = await auth_http.get("/assets", headers=bearer(bogus))
    assert refused.status_code == 401
    newest = await audit(auth_http, admin, action="rest.denied", limit=1)
    assert len(newest) == 1 and newest[0]["details"]["status"] == 403
    assert newest[0]["actor"]["role"] == "viewer"

    everything = await audit(auth_http, admin, limit=3)
    assert len(everything) == 3
    assert everything == sorted(everything, key=lambda r: r["ts"], reverse=True)
    assert await audit(auth_http, admin, action="no.such.action") == []
    bad = await auth_http.get("/audit", params={"limit": 0}, headers=admin)
    assert bad.status_code == 400 and "limit" in bad.json()["detail"]
    whole = (await auth_http.get("/audit", params={"limit": 1000}, headers=admin)).text
    assert bogus not in whole and all(s not in whole for s in seen_secrets)


async def test_a_flood_of_refused_requests_is_audited_at_most_once_per_second(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    flood = 40
    for _ in range(flood):
        assert (await auth_http.get("/sites")).status_code == 401
    elapsed = loop.time() - started
    admin = bearer(role_tokens["admin"])

    def refusals(records: list[Any]) -> int:
        # a request's own record counts it plus those not recorded before; a summary
        # record (no status) only those
        return sum(r["details"]["suppressed"] + ("status" in r["details"]) for r in records)

    async def all_counted() -> bool:
        return refusals(await audit(auth_http, admin, action="rest.denied")) == flood

    await eventually(all_counted, "every refusal is counted in the audit trail")
    records = await audit(auth_http, admin, action="rest.denied")
    assert len(records) <= elapsed + 3, f"{len(records)} records for {flood} refusals"


def test_the_denial_limiter_keeps_one_record_per_source_per_second() -> None:
    limiter = DenialLimiter(window_s=1.0, max_per_s=100, max_sources=2)
    assert limiter.admit("a", 0.0) == 0
    assert limiter.admit("a", 0.1) is None
    assert limiter.admit("a", 0.2) is None
    assert limiter.admit("b", 0.3) == 0
    assert limiter.admit("c", 0.4) is None, "beyond max_sources: counted, not recorded"
    assert limiter.admit("b", 0.5) is None
    assert limiter.admit("a", 1.05) == 3, "a's two refusals, and c's with the next record"
    assert limiter.due(1.2) == []
    assert limiter.due(1.4) == [("b", 1)], "b went quiet with a refusal not reported"
    assert limiter.due(3.0) == [], "nothing left to report"
    assert limiter.admit("c", 3.1) == 0, "quiet sources were forgotten, making room"


def test_the_denial_limiter_records_at_most_max_per_s_in_all() -> None:
    limiter = DenialLimiter(window_s=1.0, max_per_s=2)
    assert limiter.admit("x", 0.0) == 0
    assert limiter.admit("y", 0.1) == 0
    assert limiter.admit("z", 0.2) is None
    assert limiter.due(0.5) == [], "still no room this second"
    assert limiter.due(1.25) == [("z", 1)]


# --------------------------------------------------------------------------- modes


async def test_auth_is_off_on_loopback_without_tokens_said_loudly_and_audited_anonymous(
    headend: Headend, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    warnings = [
        r.getMessage()
        for r in caplog.get_records("setup")
        if r.levelno == logging.WARNING and "REST authentication is OFF" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    assert headend.rest_auth.enabled is False
    assert (await http.post("/dispatch", json={"asset_id": BESS_1, "mw": 0.1})).status_code == 202
    (record,) = await audit(http, {}, action="dispatch.create")
    assert record["actor"] == {"kind": "anonymous", "name": "anonymous", "role": None}


async def test_auto_turns_on_with_the_first_token_and_off_when_none_is_active(
    headend: Headend,
    http: httpx.AsyncClient,
    tokens_path: Path,
    capsys: pytest.CaptureFixture[str],
    seen_secrets: list[str],
) -> None:
    args = ["tokens", "create", "--role", "admin", "--name", "first", "--json"]
    assert await asyncio.to_thread(run_der, *args, "--file", str(tokens_path)) == 0
    created = json.loads(capsys.readouterr().out)
    secret = created["token"]
    seen_secrets.append(secret)

    async def turned_on() -> bool:
        return (await http.get("/assets")).status_code == 401

    await eventually(turned_on, "the first token turns authentication on", deadline_s=1.5)
    assert headend.rest_auth.enabled is True
    assert (await http.get("/assets", headers=bearer(secret))).status_code == 200

    revoked = await http.delete(f"/tokens/{created['id']}", headers=bearer(secret))
    assert revoked.status_code == 200
    assert (await http.get("/assets")).status_code == 200, "loopback, no active token: off"


TOKEN_ROUTE_REQUESTS: list[tuple[str, str, Any, int]] = [
    ("GET", "/tokens", None, 200),
    ("POST", "/tokens", {"role": "admin", "name": "minted"}, 201),
    ("DELETE", "/tokens/{token_id}", None, 200),
]
"""Every token route, asked with what an admin would get."""


async def test_no_anonymous_request_reaches_the_token_routes_while_auth_is_off(
    headend: Headend,
    http: httpx.AsyncClient,
    tokens_path: Path,
    capsys: pytest.CaptureFixture[str],
    seen_secrets: list[str],
) -> None:
    """``HEADEND_AUTH=auto`` on loopback with no token: every other route is open, but a
    local process must not mint the first admin token for itself over REST."""
    assert headend.rest_auth.enabled is False
    for method, path, body, _ in TOKEN_ROUTE_REQUESTS:
        path = path.format(token_id="tok_00000000")
        refused = await http.request(method, path, json=body)
        assert refused.status_code == 401, f"{method} {path}: {refused.text}"
        assert refused.headers["WWW-Authenticate"] == 'Bearer realm="der-sdk headend"'
        assert "`der tokens create --role admin`" in refused.json()["detail"]
    assert TokenFileStore(tokens_path).read().tokens == [], "no token was made"
    assert headend.rest_auth.enabled is False
    assert (await http.get("/assets")).status_code == 200, "the other routes stay open"

    # the way in: `der tokens create`, by whoever may write the token file
    args = ["tokens", "create", "--role", "admin", "--file", str(tokens_path)]
    assert await asyncio.to_thread(run_der, *args) == 0
    secret = capsys.readouterr().out.strip()
    seen_secrets.append(secret)

    async def admin_lists_tokens() -> bool:
        return (await http.get("/tokens", headers=bearer(secret))).status_code == 200

    await eventually(admin_lists_tokens, "the CLI-made admin token is accepted", deadline_s=1.5)
    made = await http.post("/tokens", json={"role": "viewer"}, headers=bearer(secret))
    assert made.status_code == 201, made.text
    seen_secrets.append(made.json()["token"])


async def test_the_token_routes_need_an_admin_token_even_with_auth_off(
    inventory_path: Path,
    plugins: Plugins,
    role_tokens: dict[str, str],
    tokens_path: Path,
    seen_secrets: list[str],
) -> None:
    spare = TokenFileStore(tokens_path).create(role="viewer", name=SPARE_TOKEN_NAME)[0]
    headend = Headend(make_config(inventory_path, HEADEND_AUTH="off"), plugins=plugins)
    await headend.start()
    try:
        async with httpx.AsyncClient(base_url=headend.http_url, timeout=WAIT_S) as http:
            assert (await http.get("/audit")).status_code == 200, "off: other routes open"
            for method, path, body, admin_status in TOKEN_ROUTE_REQUESTS:
                path = path.format(token_id=spare.id)
                where = f"{method} {path}"
                anonymous = await http.request(method, path, json=body)
                assert anonymous.status_code == 401, f"{where}: {anonymous.text}"
                for role in ("viewer", "operator"):
                    headers = bearer(role_tokens[role])
                    weak = await http.request(method, path, json=body, headers=headers)
                    assert weak.status_code == 403, f"{role}: {where}: {weak.text}"
                    assert "needs the admin role" in weak.json()["detail"]
                headers = bearer(role_tokens["admin"])
                admin = await http.request(method, path, json=body, headers=headers)
                assert admin.status_code == admin_status, f"admin: {where}: {admin.text}"
                if method == "POST":
                    seen_secrets.append(admin.json()["token"])
            (record,) = await audit(http, {}, action="token.create")
            assert (record["actor"]["kind"], record["actor"]["role"]) == ("token", "admin")
    finally:
        await headend.stop()


async def test_auto_is_on_when_a_token_exists(
    inventory_path: Path, plugins: Plugins, role_tokens: dict[str, str]
) -> None:
    headend = Headend(make_config(inventory_path), plugins=plugins)
    await headend.start()
    try:
        async with httpx.AsyncClient(base_url=headend.http_url, timeout=WAIT_S) as http:
            assert (await http.get("/assets")).status_code == 401
            assert (await http.get("/healthz")).status_code == 200
            ok = await http.get("/assets", headers=bearer(role_tokens["viewer"]))
            assert ok.status_code == 200
    finally:
        await headend.stop()


async def test_auth_on_without_tokens_warns_and_refuses_everything_but_open_routes(
    inventory_path: Path, plugins: Plugins, caplog: pytest.LogCaptureFixture
) -> None:
    headend = Headend(make_config(inventory_path, HEADEND_AUTH="on"), plugins=plugins)
    await headend.start()
    try:
        assert any("ON with no active token" in r.getMessage() for r in caplog.records)
        async with httpx.AsyncClient(base_url=headend.http_url, timeout=WAIT_S) as http:
            assert (await http.get("/assets")).status_code == 401
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/schema/openapi.json")).status_code == 200
    finally:
        await headend.stop()


def test_auth_off_beyond_loopback_is_refused_unless_insecure(inventory_path: Path) -> None:
    def config(**env: str) -> HeadendConfig:
        return HeadendConfig.from_env({"ASSETS_PATH": str(inventory_path), **env})

    with pytest.raises(DerSdkError, match=r"HEADEND_AUTH=off.*HEADEND_INSECURE"):
        check_auth_config(config(HEADEND_AUTH="off", HEADEND_HTTP_ADDR="0.0.0.0:3001"))
    check_auth_config(
        config(HEADEND_AUTH="off", HEADEND_HTTP_ADDR="0.0.0.0:3001", HEADEND_INSECURE="1")
    )
    check_auth_config(config(HEADEND_AUTH="off", HEADEND_HTTP_ADDR="[::1]:3001"))
    check_auth_config(config(HEADEND_AUTH="off", HEADEND_HTTP_ADDR="localhost:3001"))


async def test_auto_beyond_loopback_is_on_even_without_tokens(tmp_path: Path) -> None:
    (tmp_path / "assets.yaml").write_text("sites: []\nassets: []\n")
    config = HeadendConfig.from_env(
        {
            "ASSETS_PATH": str(tmp_path / "assets.yaml"),
            "HEADEND_HTTP_ADDR": "0.0.0.0:3001",
            "HEADEND_TOKENS_FILE": str(tmp_path / "tokens.json"),
        }
    )
    auth = RestAuth(config)
    await auth.start()
    try:
        assert auth.enabled is True
    finally:
        await auth.close()


# --------------------------------------------------------------------------- the token file


async def test_a_malformed_token_file_stops_the_start_naming_it(
    inventory_path: Path, plugins: Plugins, tokens_path: Path
) -> None:
    await asyncio.to_thread(tokens_path.write_text, '{"version": 1, "tokens": [{"id": "t"}]}')
    headend = Headend(make_config(inventory_path), plugins=plugins)
    with pytest.raises(DerSdkError, match=rf"token file {tokens_path} is not valid: .*tokens\[0\]"):
        await headend.start()


async def test_a_token_file_broken_while_running_keeps_the_tokens_read_before(
    auth_http: httpx.AsyncClient,
    role_tokens: dict[str, str],
    tokens_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await asyncio.to_thread(tokens_path.write_text, "{ not json")

    def complained() -> bool:
        return any("keeping the tokens read before" in r.getMessage() for r in caplog.records)

    async def logged() -> bool:
        return complained()

    await eventually(logged, "the broken file is reported")
    ok = await auth_http.get("/assets", headers=bearer(role_tokens["viewer"]))
    assert ok.status_code == 200


# --------------------------------------------------------------------------- OpenAPI


async def test_openapi_declares_the_bearer_scheme_and_the_role_of_each_operation(
    auth_http: httpx.AsyncClient,
) -> None:
    response = await auth_http.get("/schema/openapi.json")
    assert response.status_code == 200, "OpenAPI needs no token"
    schema = response.json()
    scheme = schema["components"]["securitySchemes"]["BearerToken"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    paths = schema["paths"]
    assert paths["/assets"]["get"]["security"] == [{"BearerToken": ["viewer"]}]
    assert paths["/dispatch"]["post"]["security"] == [{"BearerToken": ["operator"]}]
    assert paths["/tokens"]["post"]["security"] == [{"BearerToken": ["admin"]}]
    assert paths["/audit"]["get"]["security"] == [{"BearerToken": ["admin"]}]
    assert "security" not in paths["/healthz"]["get"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            if path != "/healthz":
                assert operation.get("security"), f"{method.upper()} {path} declares no security"


def test_the_roles_table_of_the_docs_matches_the_rules() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "headend.md").read_text()
    section = docs.split("### Roles", 1)[1].split("\n### ", 1)[0]
    documented = {
        (method, path): needs.split()[0].replace("none", "open")
        for method, path, needs in re.findall(r"^\| `(\w+) (\S+)` \| ([^|]+) \|$", section, re.M)
    }
    expected = {(m, re.sub(r":\w+\}", "}", p)): rule for (m, p), rule in ROUTE_RULES.items()}
    assert documented == expected


def test_an_app_with_a_route_without_a_rule_is_refused() -> None:
    @get("/forgotten", sync_to_thread=False)
    def forgotten() -> str:
        return "no rule"

    app = Litestar(route_handlers=[forgotten])
    with pytest.raises(RuntimeError, match="GET /forgotten"):
        check_access_rules(app)
