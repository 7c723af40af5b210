"""Which IEEE 2030.5 Response each change of a program dispatch calls for."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import msgspec
from der_sdk_ieee2030_5 import Ieee20305Options, Ieee20305Source
from der_sdk_ieee2030_5.source import external_id, parse_external_id
from envoy_schema.server.schema.sep2.response import ResponseType

from der_sdk.models import Asset, Dispatch, Site, TelemetrySample
from der_sdk.programs import ProgramContext, ProgramDispatch

LFDI = "A" * 40
R = ResponseType


class QuietContext(ProgramContext):
    """A context that is never asked for anything in these tests."""

    def __init__(self) -> None:
        self.program = "utility"
        self.sites: list[Site] = []
        self.assets: list[Asset] = []
        self.log = logging.getLogger("test")

    async def schedule(self, request: ProgramDispatch) -> Dispatch:
        raise AssertionError("not used")

    async def cancel(self, external_id: str, reason: str) -> Dispatch | None:
        raise AssertionError("not used")

    async def open_dispatches(self) -> list[Dispatch]:
        return []

    async def latest(self, asset_id: str) -> TelemetrySample | None:
        return None

    def report_health(self, ok: bool, detail: str) -> None:
        pass


def source() -> Ieee20305Source:
    options = msgspec.convert(
        {
            "server_url": "http://127.0.0.1:1/dcap",
            "allow_plain_http": True,
            "end_devices": [{"site_id": "s", "lfdi": LFDI}],
        },
        Ieee20305Options,
    )
    return Ieee20305Source(QuietContext(), options)


def dispatch(state: str, **fields: Any) -> Dispatch:
    now = datetime.now(UTC)
    return Dispatch(
        dispatch_id=fields.pop("dispatch_id", "d1"),
        mw=1.0,
        state=state,  # type: ignore[arg-type]
        created_at=now,
        updated_at=now,
        external_id=external_id(LFDI, "C1", 0),
        **fields,
    )


def test_started_completed_and_refused_states() -> None:
    s = source()
    assert s.response_for(dispatch("scheduled"), last=True) is None
    assert s.response_for(dispatch("active"), last=True) == R.EVENT_STARTED
    assert s.response_for(dispatch("completed"), last=True) == R.EVENT_COMPLETED
    # an earlier window of a control interrupted by a higher one: not the end yet
    assert s.response_for(dispatch("completed"), last=False) is None
    assert s.response_for(dispatch("rejected"), last=True) == R.REJECTED_INVALID_EVENT
    assert s.response_for(dispatch("expired"), last=True) == R.REJECTED_EVENT_RECEIVED_LATE


def test_an_operator_taking_the_asset_is_an_opt_out_but_the_source_s_own_moves_are_not() -> None:
    s = source()
    s._made.add("d2")
    assert s.response_for(dispatch("superseded", superseded_by="d2"), last=True) is None
    assert (
        s.response_for(dispatch("superseded", superseded_by="manual"), last=True)
        == R.USER_CHOSE_OPT_OUT
    )
    assert s.response_for(dispatch("cancelled"), last=True) == R.USER_CHOSE_OPT_OUT
    s._cancelling.add("d1")
    assert s.response_for(dispatch("cancelled"), last=True) is None


def test_external_ids_name_the_end_device_the_control_and_the_window() -> None:
    assert external_id(LFDI, "C1", 0) == f"{LFDI}/C1"
    assert external_id(LFDI, "C1", 2) == f"{LFDI}/C1#2"
    assert parse_external_id(f"{LFDI}/C1#2") == (LFDI, "C1", 2)
    assert parse_external_id(f"{LFDI}/C1") == (LFDI, "C1", 0)
    assert parse_external_id("evening-peak") is None
