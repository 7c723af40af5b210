"""``/alarms``: list, read and acknowledge alarms (docs/alarms.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, get_args

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIType
from litestar.params import FromPath, FromQuery, QueryParameter

from der_sdk.models import ALARM_SEVERITIES, Alarm, AlarmState
from der_sdk_headend.rest.auth import access, actor_of, client_source
from der_sdk_headend.rest.openapi import NEEDS_STORAGE
from der_sdk_headend.rest.params import MAX_LIMIT, LimitQuery, check_limit, filter_ids
from der_sdk_headend.rest.schemas import ErrorBody

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["AlarmsController", "acknowledge_audited"]

_STATES: tuple[str, ...] = get_args(AlarmState)
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def _choice(name: str, value: str | None, allowed: tuple[str, ...]) -> str | None:
    if value is None or value == "":
        return None
    if value not in allowed:
        raise ValidationException(
            f"query parameter `{name}`: unknown {name} {value!r}; one of {', '.join(allowed)}"
        )
    return value


def _enum_query(name: str, allowed: tuple[str, ...], description: str) -> Any:
    return QueryParameter(
        name=name,
        description=description,
        schema_extra={"one_of": None, "type": OpenAPIType.STRING, "enum": list(allowed)},
    )


class AlarmsController(Controller):
    path = "/alarms"
    tags = ["alarms"]

    @get(
        "/",
        summary="Alarms, newest raised first",
        description="One alarm per asset and condition code while it lives: `state` "
        "`active` or `cleared`, `raise_count` (how often it was raised again within the "
        "de-bounce time), `acknowledged_at`/`acknowledged_by`. Filters: `state`, "
        "`severity`, `site_id`, `asset_id`, `code`, `acknowledged` (`true` or `false`). "
        f"`limit` 1..{MAX_LIMIT}, default 100; for the next page pass the last alarm's "
        "`alarm_id` as `after`.",
        **access("viewer"),
        **NEEDS_STORAGE,
    )
    async def list_alarms(
        self,
        headend: NamedDependency[Headend],
        state_filter: Annotated[
            str | None, _enum_query("state", _STATES, "Keep alarms in this state.")
        ] = None,
        severity_filter: Annotated[
            str | None, _enum_query("severity", ALARM_SEVERITIES, "Keep this severity.")
        ] = None,
        site_id: FromQuery[str | None] = None,
        asset_id: FromQuery[str | None] = None,
        code: FromQuery[str | None] = None,
        acknowledged_filter: Annotated[
            str | None,
            _enum_query("acknowledged", ("true", "false"), "Keep (un)acknowledged alarms."),
        ] = None,
        after: FromQuery[str | None] = None,
        limit: LimitQuery = 100,
    ) -> list[Alarm]:
        state = _choice("state", state_filter, _STATES)
        severity = _choice("severity", severity_filter, ALARM_SEVERITIES)
        acknowledged = None
        if acknowledged_filter:
            acknowledged = _BOOLEANS.get(acknowledged_filter.lower())
            if acknowledged is None:
                raise ValidationException(
                    f"query parameter `acknowledged`: {acknowledged_filter!r} is not true or false"
                )
        # Ids not (or no longer) in the inventory are searched as given: alarms outlive
        # inventory changes.
        asset_id, site_id = filter_ids(headend.inventory, asset_id, site_id)
        return await headend.storage.alarms(
            state=state,  # type: ignore[arg-type]
            severity=severity,  # type: ignore[arg-type]
            site_id=site_id,
            asset_id=asset_id,
            code=code or None,
            acknowledged=acknowledged,
            after=after or None,
            limit=check_limit(limit),
        )

    @get(
        "/{alarm_id:str}",
        summary="One alarm",
        responses={404: ResponseSpec(ErrorBody, description="no such alarm")},
        **access("viewer"),
        **NEEDS_STORAGE,
    )
    async def get_one(self, headend: NamedDependency[Headend], alarm_id: FromPath[str]) -> Alarm:
        alarm = await headend.storage.get_alarm(alarm_id)
        if alarm is None:
            raise NotFoundException(f"unknown alarm {alarm_id}")
        return alarm

    @post(
        "/{alarm_id:str}/ack",
        status_code=200,
        summary="Acknowledge an alarm",
        description="Sets `acknowledged_at` and `acknowledged_by` (the token's name), active "
        "or cleared alike, and writes `alarm.ack` to the audit trail. Idempotent: an alarm "
        "acknowledged before is returned as it is (200, header `Already-Acknowledged: "
        "true`), keeping who acknowledged it first. No body.",
        responses={404: ResponseSpec(ErrorBody, description="no such alarm")},
        **access("operator"),
        **NEEDS_STORAGE,
    )
    async def acknowledge(
        self,
        request: Request[Any, Any, Any],
        headend: NamedDependency[Headend],
        alarm_id: FromPath[str],
    ) -> Response[Alarm]:
        result = await acknowledge_audited(headend, request, alarm_id)
        if result is None:
            raise NotFoundException(f"unknown alarm {alarm_id}")
        alarm, changed = result
        headers = {} if changed else {"Already-Acknowledged": "true"}
        return Response(alarm, status_code=200, headers=headers)


async def acknowledge_audited(
    headend: Headend, request: Request[Any, Any, Any], alarm_id: str
) -> tuple[Alarm, bool] | None:
    """Acknowledge ``alarm_id`` as ``request``'s caller and record it in the audit trail
    (``alarm.ack``: ``ok``, ``already`` or ``refused`` for an unknown alarm).

    ``POST /alarms/{id}/ack`` and the operator console both acknowledge through here.

    :return: the alarm and whether this call acknowledged it (``False``: it was before);
        ``None`` for an unknown alarm.
    """
    actor, source = actor_of(request), client_source(request)
    result = await headend.alarms.acknowledge(alarm_id, actor.name)
    if result is None:
        await headend.auditor.record(
            "alarm.ack",
            actor=actor,
            source=source,
            outcome="refused",
            message=f"acknowledgement of unknown alarm {alarm_id} by {actor.describe()}",
            alarm_id=alarm_id,
            reason="unknown alarm",
        )
        return None
    alarm, changed = result
    await headend.auditor.record(
        "alarm.ack",
        actor=actor,
        source=source,
        outcome="ok" if changed else "already",
        message=f"alarm {alarm.alarm_id} ({alarm.code}, {alarm.severity}) of asset "
        f"{alarm.asset_id} acknowledged by {actor.describe()}"
        + ("" if changed else f"; already acknowledged by {alarm.acknowledged_by}"),
        asset_id=alarm.asset_id,
        site_id=alarm.site_id,
        alarm_id=alarm.alarm_id,
        code=alarm.code,
    )
    return alarm, changed
