"""The console's alarms and schedules, server side (docs/console.md): the header badge
counts active, unacknowledged alarms by severity; the Alarms page filters; an operator
acknowledges (audited as over REST) and a viewer cannot; schedules show their steps and
state, and an operator cancels one after confirming it (audited), a viewer cannot.

Alarms are raised through the headend's own alarm book (the agent's path over gRPC is
tested in test_alarms.py); browser flows are in tests/console.
"""

from __future__ import annotations

import html
import re
from datetime import timedelta
from typing import Any

import httpx
import pytest
from headend_kit import (
    BESS_1,
    BESS_2,
    NOT_IN_INVENTORY,
    PV_1,
    SITE_A,
    SITE_B,
    bearer,
    csrf_of,
    post_form,
)
from test_console_dispatch import COOKIE, console

from der_sdk.models import utc_now
from der_sdk_headend import Headend
from der_sdk_headend.alarms.state import Condition

__all__ = ["console"]  # the fixture, shared with test_console_dispatch


async def raise_alarm(
    headend: Headend, asset_id: str, code: str, severity: str = "major", *, site_id: str = SITE_A
) -> str:
    alarm = await headend.alarms.apply(
        Condition(
            asset_id=asset_id,
            site_id=site_id,
            code=code,
            active=True,
            at=utc_now(),
            severity=severity,  # type: ignore[arg-type]
            text=f"{code} on the device",
        )
    )
    assert alarm is not None
    return alarm.alarm_id


async def still_unacknowledged(headend: Headend, alarm_id: str) -> bool:
    stored = await headend.storage.get_alarm(alarm_id)
    assert stored is not None, alarm_id
    return stored.acknowledged_at is None


async def post(
    client: httpx.AsyncClient, path: str, fields: dict[str, str] | None = None, *, csrf: bool = True
) -> httpx.Response:
    data = dict(fields or {})
    if csrf:
        data["csrf_token"] = await csrf_of(client, "/console/alarms")
    return await client.post(path, data=data, headers={"HX-Request": "true"})


async def trail(client: httpx.AsyncClient, action: str) -> list[dict[str, Any]]:
    admin = bearer(client.cookies[COOKIE])
    response = await client.get("/audit", params={"action": action}, headers=admin)
    assert response.status_code == 200, response.text
    records: list[dict[str, Any]] = response.json()
    return records


def badge_counts(text: str) -> dict[str, int]:
    return {
        severity: int(n) for severity, n in re.findall(r'data-severity="([a-z]+)"[^>]*>(\d+)', text)
    }


# --------------------------------------------------------------------------- alarms


async def test_the_badge_counts_active_unacknowledged_alarms_by_severity(
    auth_headend: Headend, console: dict[str, httpx.AsyncClient]
) -> None:
    viewer, operator = console["viewer"], console["operator"]
    assert badge_counts((await viewer.get("/console/alarms/badge")).text) == {"none": 0}

    await raise_alarm(auth_headend, BESS_1, "over_temp", "critical")
    acked = await raise_alarm(auth_headend, BESS_2, "inverter_trip", "major")
    await raise_alarm(auth_headend, BESS_1, "fan_fault", "major")
    await raise_alarm(auth_headend, PV_1, "door_open", "warning", site_id=SITE_B)
    assert (await post(operator, f"/console/alarms/{acked}/ack")).status_code == 200

    counts = badge_counts((await viewer.get("/console/alarms/badge")).text)
    assert counts == {"critical": 1, "major": 1, "warning": 1}
    page = (await viewer.get("/")).text
    assert 'id="alarm-badge"' in page and 'hx-get="/console/alarms/badge"' in page


async def test_the_alarms_page_filters_by_state_severity_and_site(
    auth_headend: Headend, console: dict[str, httpx.AsyncClient]
) -> None:
    viewer = console["viewer"]
    hot = await raise_alarm(auth_headend, BESS_1, "over_temp", "critical")
    trip = await raise_alarm(auth_headend, BESS_2, "inverter_trip", "major")
    door = await raise_alarm(auth_headend, PV_1, "door_open", "warning", site_id=SITE_B)
    await auth_headend.alarms.apply(
        Condition(asset_id=BESS_2, site_id=SITE_A, code="inverter_trip", active=False, at=utc_now())
    )

    def shown(response: httpx.Response) -> set[str]:
        assert response.status_code == 200, response.text
        return set(re.findall(r'<tr id="alarm-([0-9a-f-]+)"', response.text))

    assert shown(await viewer.get("/console/alarms")) == {hot, door}, "active by default"
    assert shown(await viewer.get("/console/alarms?state=all")) == {hot, trip, door}
    assert shown(await viewer.get("/console/alarms?state=cleared")) == {trip}
    assert shown(await viewer.get("/console/alarms?severity=critical")) == {hot}
    assert shown(await viewer.get(f"/console/alarms?state=all&site={SITE_A}")) == {hot, trip}
    partial = await viewer.get("/console/alarms?state=all", headers={"HX-Request": "true"})
    assert "<html" not in partial.text, "an htmx request gets the table alone"
    assert shown(partial) == {hot, trip, door}
    assert shown(await viewer.get(f"/console/assets/{BESS_2}/alarms")) == {trip}

    refused = await viewer.get("/console/alarms?severity=dire")
    assert refused.status_code == 400
    assert "unknown severity 'dire'" in html.unescape(refused.text)
    assert (await viewer.get(f"/console/assets/{NOT_IN_INVENTORY}/alarms")).status_code == 404


async def test_an_operator_acknowledges_in_the_console_audited_as_over_rest(
    auth_headend: Headend, console: dict[str, httpx.AsyncClient]
) -> None:
    operator = console["operator"]
    alarm_id = await raise_alarm(auth_headend, BESS_1, "over_temp", "critical")
    page = (await operator.get("/console/alarms")).text
    assert f'hx-post="/console/alarms/{alarm_id}/ack"' in page

    response = await post(operator, f"/console/alarms/{alarm_id}/ack")

    assert response.status_code == 200, response.text
    assert response.headers["HX-Trigger"] == "der:alarms", "the badge re-reads at once"
    assert "test operator" in response.text and "/ack" not in response.text
    stored = await auth_headend.storage.get_alarm(alarm_id)
    assert stored is not None and "test operator" in (stored.acknowledged_by or "")
    again = await post(console["admin"], f"/console/alarms/{alarm_id}/ack")
    assert again.status_code == 200
    records = await trail(console["admin"], "alarm.ack")
    assert [(r["outcome"], r["details"]["alarm_id"]) for r in records] == [
        ("already", alarm_id),
        ("ok", alarm_id),
    ]
    assert records[1]["actor"]["role"] == "operator"


async def test_a_viewer_sees_no_acknowledge_and_its_forged_post_is_refused(
    auth_headend: Headend, console: dict[str, httpx.AsyncClient]
) -> None:
    viewer = console["viewer"]
    alarm_id = await raise_alarm(auth_headend, BESS_1, "over_temp", "critical")
    for path in ("/console/alarms", f"/console/assets/{BESS_1}/alarms"):
        page = (await viewer.get(path)).text
        assert alarm_id in page and '/ack"' not in page and ">Acknowledge<" not in page, path

    forged = await post(viewer, f"/console/alarms/{alarm_id}/ack")

    assert forged.status_code == 403, forged.text
    assert await still_unacknowledged(auth_headend, alarm_id)


async def test_an_acknowledgement_without_the_csrf_token_is_refused(
    auth_headend: Headend, console: dict[str, httpx.AsyncClient]
) -> None:
    alarm_id = await raise_alarm(auth_headend, BESS_1, "over_temp", "critical")

    for fields in ({}, {"csrf_token": "forged"}):
        refused = await post(
            console["operator"], f"/console/alarms/{alarm_id}/ack", fields, csrf=False
        )
        assert refused.status_code == 403, refused.text

    assert await still_unacknowledged(auth_headend, alarm_id)


async def test_acknowledging_an_unknown_alarm_is_a_404_and_audited_refused(
    auth_headend: Headend, console: dict[str, httpx.AsyncClient]
) -> None:
    response = await post(console["operator"], "/console/alarms/no-such-alarm/ack")

    assert response.status_code == 404
    assert "unknown alarm no-such-alarm" in response.text
    records = await trail(console["admin"], "alarm.ack")
    assert [(r["outcome"], r["details"]["alarm_id"]) for r in records] == [
        ("refused", "no-such-alarm")
    ]


async def test_the_asset_page_includes_its_alarms_and_schedules(
    auth_headend: Headend, console: dict[str, httpx.AsyncClient]
) -> None:
    page = (await console["viewer"].get(f"/console/assets/{BESS_1}")).text

    assert f'hx-get="/console/assets/{BESS_1}/alarms"' in page
    assert f'hx-get="/console/schedules?asset_id={BESS_1}"' in page


# --------------------------------------------------------------------------- schedules


async def schedule(
    client: httpx.AsyncClient, body: dict[str, Any], *, start_in: timedelta = timedelta(hours=1)
) -> dict[str, Any]:
    start = utc_now() + start_in
    response = await client.post(
        "/dispatch",
        json={"start_at": start.isoformat(), **body},
        headers=bearer(client.cookies[COOKIE]),
    )
    assert response.status_code == 202, response.text
    record: dict[str, Any] = response.json()
    return record


async def test_schedules_show_start_steps_per_target_and_state(
    auth_headend: Headend, console: dict[str, httpx.AsyncClient]
) -> None:
    operator = console["operator"]
    site = await schedule(
        operator,
        {"site_id": SITE_A, "steps": [{"offset_s": 0, "mw": 1}, {"offset_s": 5400, "mw": -1}]},
    )
    one = await schedule(operator, {"asset_id": PV_1, "mw": 0.2, "duration_s": 600})
    await operator.post(
        "/dispatch", json={"asset_id": BESS_2, "mw": 0.1}, headers=bearer(operator.cookies[COOKIE])
    )

    listed = await console["viewer"].get("/console/schedules")

    assert listed.status_code == 200
    text = html.unescape(listed.text)
    rows = re.findall(r'<tr id="schedule-([0-9a-f-]+)"', text)
    assert rows == [one["dispatch_id"], site["dispatch_id"]], "schedules only, newest first"
    site_row = text[text.index(f'id="schedule-{site["dispatch_id"]}"') :]
    assert site_row.count('class="schedule-target"') == len(site["targets"])
    steps = [re.sub(r"<[^>]+>", "", li) for li in re.findall(r"<li data-step.*?</li>", site_row)]
    first = site["targets"][0]
    assert steps[:2] == [
        f"{label} → {step['mw']:g} MW pending"
        for label, step in zip(("+0 s", "+1 h 30 min"), first["steps"], strict=True)
    ]
    assert 'data-status="pending"' in site_row and "data-schedule-state>scheduled" in site_row
    assert site["start_at"][:19].replace("T", " ") in site_row
    for_asset = await console["viewer"].get("/console/schedules", params={"asset_id": PV_1})
    assert re.findall(r'<tr id="schedule-([0-9a-f-]+)"', for_asset.text) == [one["dispatch_id"]]
    assert (
        await console["viewer"].get(f"/console/schedules?site_id={NOT_IN_INVENTORY}")
    ).status_code == 404


async def test_a_superseded_schedule_names_the_dispatch_that_replaced_it(
    auth_headend: Headend, console: dict[str, httpx.AsyncClient]
) -> None:
    operator = console["operator"]
    old = await schedule(
        operator, {"asset_id": BESS_1, "mw": 0.2, "duration_s": 600}, start_in=timedelta(hours=2)
    )
    new = await schedule(operator, {"asset_id": BESS_1, "mw": 0.3, "duration_s": 7200})

    text = (await console["viewer"].get("/console/schedules")).text

    row = text[text.index(f'id="schedule-{old["dispatch_id"]}"') :].split("</tr>")[0]
    assert "data-schedule-state>superseded" in row
    assert f'data-superseded-by="{new["dispatch_id"]}"' in row


async def test_an_operator_cancels_a_schedule_after_confirming_it_audited(
    auth_headend: Headend, console: dict[str, httpx.AsyncClient]
) -> None:
    operator = console["operator"]
    record = await schedule(operator, {"asset_id": BESS_1, "mw": 0.2, "duration_s": 600})
    dispatch_id = record["dispatch_id"]
    assert (
        f'hx-post="/console/dispatch/{dispatch_id}/cancel"'
        in (await operator.get("/console/schedules")).text
    )

    asked = await post(operator, f"/console/dispatch/{dispatch_id}/cancel")
    assert asked.status_code == 200 and "Confirm cancel" in asked.text
    stored = await auth_headend.storage.get_dispatch(dispatch_id)
    assert stored is not None and stored.state == "scheduled", "nothing cancelled unconfirmed"

    done = await post(operator, f"/console/dispatch/{dispatch_id}/cancel", {"confirm": "yes"})

    assert done.status_code == 200, done.text
    assert "data-schedule-state>cancelled" in done.text and "Cancel" not in done.text
    stored = await auth_headend.storage.get_dispatch(dispatch_id)
    assert stored is not None and stored.state == "cancelled"
    again = await post(operator, f"/console/dispatch/{dispatch_id}/cancel", {"confirm": "yes"})
    assert again.status_code == 200 and 'role="alert"' in again.text
    assert "cannot be cancelled" in html.unescape(again.text)
    records = await trail(console["admin"], "dispatch.cancel")
    assert [(r["outcome"], r["details"]["via"]) for r in records] == [
        ("refused", "console"),
        ("ok", "console"),
    ]
    assert records[1]["actor"]["role"] == "operator"


async def test_a_viewer_sees_no_cancel_and_its_forged_cancel_is_refused(
    auth_headend: Headend, console: dict[str, httpx.AsyncClient]
) -> None:
    record = await schedule(console["operator"], {"asset_id": BESS_1, "mw": 0.2})
    dispatch_id = record["dispatch_id"]
    viewer = console["viewer"]
    listed = (await viewer.get("/console/schedules")).text
    assert dispatch_id in listed and "/cancel" not in listed

    forged = await post(viewer, f"/console/dispatch/{dispatch_id}/cancel", {"confirm": "yes"})
    assert forged.status_code == 403
    no_csrf = await post(
        console["operator"],
        f"/console/dispatch/{dispatch_id}/cancel",
        {"confirm": "yes"},
        csrf=False,
    )
    assert no_csrf.status_code == 403

    stored = await auth_headend.storage.get_dispatch(dispatch_id)
    assert stored is not None and stored.state == "scheduled"


@pytest.mark.parametrize("confirm", ["", "yes"])
async def test_cancelling_an_unknown_dispatch_is_a_404(
    auth_headend: Headend, console: dict[str, httpx.AsyncClient], confirm: str
) -> None:
    response = await post(
        console["operator"], f"/console/dispatch/{NOT_IN_INVENTORY}/cancel", {"confirm": confirm}
    )

    assert response.status_code == 404
    assert f"unknown dispatch {NOT_IN_INVENTORY}" in response.text


# --------------------------------------------------------------------------- schedule form


def start_field(delta: timedelta = timedelta(hours=1)) -> str:
    """A start an hour ahead as the page's datetime-local field sends it (UTC, no zone)."""
    return (utc_now() + delta).replace(tzinfo=None, microsecond=0).isoformat()


async def test_the_dispatch_form_previews_a_schedule_by_the_rest_planning_and_sends_it(
    http: httpx.AsyncClient,
) -> None:
    start = start_field()
    fields = {"target": f"site:{SITE_A}", "start_at": start, "steps": "0 1\n1800 -1.5\n"}
    rest = await http.post(
        "/dispatch/preview",
        json={
            "site_id": SITE_A,
            "start_at": start + "Z",
            "steps": [{"offset_s": 0, "mw": 1}, {"offset_s": 1800, "mw": -1.5}],
        },
    )
    assert rest.status_code == 200, rest.text

    preview = await post_form(http, "/console/dispatch/preview", fields)

    assert preview.status_code == 200, preview.text
    text = html.unescape(preview.text)
    assert 'id="preview-steps"' in text and "a schedule of 2 steps runs on the agent" in text
    for index, step in enumerate(rest.json()["steps"]):
        row = re.search(rf'<tr data-step="{index}">(.*?)</tr>', text, re.S)
        assert row, index
        cells = re.sub(r"<[^>]+>", " ", row.group(1))
        assert f"+{step['offset_s']:g}" in cells and f"{step['mw']:g}" in cells
        for share in step["shares"].values():
            assert f" {share:g}" in cells
    assert (await http.get("/dispatch/history")).json() == [], "a preview stores nothing"

    sent = await post_form(http, "/console/dispatch", {**fields, "confirm": "yes"})

    assert sent.status_code == 202, sent.text
    (record,) = (await http.get("/dispatch/history")).json()
    assert record["state"] == "scheduled" and record["source"] == "console"
    assert record["start_at"].startswith(start)
    assert [(s["offset_s"], s["mw"]) for s in record["steps"]] == [(0, 1), (1800, -1.5)]


async def test_a_schedule_from_the_form_is_sent_only_once_confirmed(
    http: httpx.AsyncClient,
) -> None:
    fields = {"target": f"asset:{BESS_1}", "mw": "0.1", "start_at": start_field()}

    asked = await post_form(http, "/console/dispatch", fields)

    assert asked.status_code == 200 and 'id="dispatch-confirm-reason"' in asked.text
    assert (await http.get("/dispatch/history")).json() == []


@pytest.mark.parametrize(
    ("fields", "named", "beside"),
    [
        ({"steps": "0 0.5\n60 abc"}, "form field `steps`, line 2: '60 abc' is not", "steps"),
        ({"steps": "0 0.5\n60 9"}, "(line 2 of the steps)", "steps"),
        ({"steps": "0 0.5\n60 1\n30 1"}, "steps[2].offset_s must be more", "steps"),
        ({"start_at": "tomorrow", "mw": "0.5"}, "form field `start_at`: 'tomorrow'", "start-at"),
        ({"start_at": "2020-01-01T00:00", "mw": "0.5"}, "is in the past", "start-at"),
        ({"start_at": "", "steps": "0 0.5"}, "steps need a start time", "start-at"),
    ],
    ids=["line", "limits", "order", "start", "past", "no-start"],
)
async def test_a_bad_schedule_in_the_form_is_refused_next_to_its_field(
    http: httpx.AsyncClient, fields: dict[str, str], named: str, beside: str
) -> None:
    body = {"target": f"asset:{BESS_1}", "start_at": start_field(), **fields}

    response = await post_form(http, "/console/dispatch/preview", body)

    assert response.status_code == 400, response.text
    text = html.unescape(response.text)
    assert named in text
    field = re.search(rf'<p id="dispatch-{beside}-error"[^>]*hx-swap-oob="true">([^<]*)</p>', text)
    assert field and named in field.group(1), text
    assert (await http.get("/dispatch/history")).json() == []


async def test_without_htmx_acknowledge_and_cancel_go_back_to_their_page(
    auth_headend: Headend, console: dict[str, httpx.AsyncClient]
) -> None:
    operator = console["operator"]
    alarm_id = await raise_alarm(auth_headend, BESS_1, "over_temp", "critical")
    record = await schedule(operator, {"asset_id": BESS_1, "mw": 0.2})
    token = await csrf_of(operator, "/console/alarms")

    acked = await operator.post(f"/console/alarms/{alarm_id}/ack", data={"csrf_token": token})
    path = f"/console/dispatch/{record['dispatch_id']}/cancel"
    cancelled = await operator.post(path, data={"csrf_token": token, "confirm": "yes"})
    again = await operator.post(path, data={"csrf_token": token, "confirm": "yes"})

    assert (acked.status_code, acked.headers["location"]) == (303, "/console/alarms")
    assert not await still_unacknowledged(auth_headend, alarm_id)
    assert (cancelled.status_code, cancelled.headers["location"]) == (303, "/console/dispatch")
    assert again.status_code == 409 and "cannot be cancelled" in html.unescape(again.text)
    assert "<html" in again.text, "a plain form post gets the console's error page"
