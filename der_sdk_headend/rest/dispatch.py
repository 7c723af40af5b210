"""``/dispatch``: create a dispatch, follow it, list past ones."""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Any, get_args

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIType
from litestar.params import FromPath, FromQuery, HeaderParameter, JSONBody, QueryParameter

from der_sdk.deprecations import warn_deprecated
from der_sdk.models import Dispatch, DispatchRequest, DispatchState, Event
from der_sdk_headend.dispatch import (
    CancelConflictError,
    IdempotencyConflictError,
    InvalidDispatchError,
    UnknownTargetError,
)
from der_sdk_headend.dispatch.planning import DispatchPreview
from der_sdk_headend.rest.auth import access, actor_of, client_source
from der_sdk_headend.rest.body import encode_json
from der_sdk_headend.rest.openapi import NEEDS_STORAGE
from der_sdk_headend.rest.params import LimitQuery, check_limit, filter_ids
from der_sdk_headend.rest.schemas import DispatchDetail, ErrorBody
from der_sdk_headend.rest.state import headend_of

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["DispatchController", "cancel_audited", "submit_audited"]

_STATES: tuple[str, ...] = get_args(DispatchState)
_STATE_FILTERS = [*_STATES, "pending"]
"""What ``state`` accepts: a lifecycle state, or ``pending`` (``submitted`` before 0.2)."""
_REFUSALS = (InvalidDispatchError, UnknownTargetError, IdempotencyConflictError)
"""Errors that refuse a dispatch for what was asked (4xx), not because the headend failed."""


def _describe(target: dict[str, str | None]) -> str:
    return " ".join(f"{key.removesuffix('_id')} {value}" for key, value in target.items())


def _what(data: DispatchRequest) -> str:
    """The request in a few words for the audit trail: ``5 MW`` or ``a schedule of 3
    step(s) from <start_at>``."""
    if data.start_at is not None or data.steps is not None:
        steps = len(data.steps) if data.steps is not None else 1
        start = data.start_at.isoformat() if data.start_at is not None else "?"
        return f"a schedule of {steps} step(s) from {start}"
    return f"{data.mw:g} MW" if data.mw is not None else "no MW"


async def submit_audited(
    headend: Headend,
    request: Request[Any, Any, Any],
    data: DispatchRequest,
    *,
    via: str,
    idempotency_key: str | None = None,
) -> tuple[Dispatch, bool]:
    """Submit ``data`` to the dispatcher as ``request``'s caller and record it in the
    audit trail (``dispatch.create``: ``ok``, ``replayed``, ``refused`` or ``failed``).

    ``POST /dispatch`` (``via="rest"``) and the operator console (``via="console"``)
    both dispatch through here, so both are audited alike; ``via`` becomes the record's
    ``source`` and the audit record's ``via``.

    :return: the record, and whether it was created (``False``: a replayed key).
    :raises InvalidDispatchError, UnknownTargetError, IdempotencyConflictError: refused
        (audited ``refused``); any other error is audited ``failed`` and raised.
    """
    auditor = headend.auditor
    actor, source = actor_of(request), client_source(request)
    target: dict[str, str | None] = (
        {"asset_id": data.asset_id} if data.asset_id else {"site_id": data.site_id}
    )

    def done(dispatch: Dispatch, created: bool) -> Event:
        """The audit record of a dispatch created (``ok``) or replayed."""
        return auditor.event(
            "dispatch.create",
            actor=actor,
            source=source,
            outcome="ok" if created else "replayed",
            message=f"dispatch {dispatch.dispatch_id} of {_what(data)} to {_describe(target)} "
            f"{'created' if created else 'replayed (Idempotency-Key)'} by {actor.describe()}"
            f"{' in the console' if via == 'console' else ''}: {dispatch.state}",
            dispatch_id=dispatch.dispatch_id,
            mw=data.mw,
            state=dispatch.state,
            via=via,
            **target,
        )

    def created_audit(dispatch: Dispatch) -> Event:
        # Stored with the dispatch, in its transaction (one round trip, not two).
        return done(dispatch, True)

    try:
        dispatch, created = await headend.dispatcher.submit(
            data, source=via, idempotency_key=idempotency_key, audit=created_audit
        )
    except Exception as exc:
        refused = isinstance(exc, _REFUSALS)
        await auditor.record(
            "dispatch.create",
            actor=actor,
            source=source,
            outcome="refused" if refused else "failed",
            message=f"dispatch of {_what(data)} to {_describe(target)} "
            f"{'refused' if refused else 'failed'} for {actor.describe()}: {exc}",
            mw=data.mw,
            start_at=data.start_at.isoformat() if data.start_at is not None else None,
            reason=f"{type(exc).__name__}: {exc}",
            via=via,
            **target,
        )
        raise
    if not created:
        await auditor.store(done(dispatch, False))
    return dispatch, created


async def cancel_audited(
    headend: Headend, request: Request[Any, Any, Any], dispatch_id: str, *, via: str = "rest"
) -> Dispatch | None:
    """Cancel ``dispatch_id`` as ``request``'s caller and record it in the audit trail
    (``dispatch.cancel``: ``ok``, or ``refused`` when it cannot be cancelled).

    ``POST /dispatch/{id}/cancel`` (``via="rest"``) and the operator console
    (``via="console"``) both cancel through here.

    :return: the record, ``None`` for an unknown dispatch.
    :raises CancelConflictError: final already, or an immediate dispatch already sent.
    """
    actor, source = actor_of(request), client_source(request)
    try:
        dispatch = await headend.dispatcher.cancel(dispatch_id, by=actor.describe())
    except CancelConflictError as exc:
        await headend.auditor.record(
            "dispatch.cancel",
            actor=actor,
            source=source,
            outcome="refused",
            message=f"cancel of dispatch {dispatch_id} refused for {actor.describe()}: {exc}",
            dispatch_id=dispatch_id,
            reason=str(exc),
            via=via,
        )
        raise
    if dispatch is None:
        return None
    await headend.auditor.record(
        "dispatch.cancel",
        actor=actor,
        source=source,
        outcome="ok",
        message=f"dispatch {dispatch_id} cancel requested by {actor.describe()}"
        f"{' in the console' if via == 'console' else ''}: {dispatch.state}",
        dispatch_id=dispatch_id,
        state=dispatch.state,
        asset_id=dispatch.asset_id,
        site_id=dispatch.site_id if dispatch.asset_id is None else None,
        via=via,
    )
    return dispatch


class DispatchController(Controller):
    path = "/dispatch"
    tags = ["dispatch"]

    @post(
        "/",
        status_code=202,
        summary="Dispatch MW to an asset or a site",
        description="`asset_id` wins over `site_id`. `mw` means what the asset's control "
        "kind says (a setpoint, an export limit >= 0, an import limit <= 0; the wrong sign is "
        "400). A site target is split by `policy`, else the site's `split_policy`, else "
        "the configured one (an unknown name is 400), each share within what its asset can "
        "take now (limits narrowed by its latest telemetry). Returns the "
        "record (202): `sent` when routed to a live agent, `submitted` until the agent "
        "connects; then `acked` and one of `applied`, `rejected`, `failed`, `expired`, "
        "`superseded` (`GET /dispatch/{id}` has every change with its time). `ttl_s` or "
        "`expires_at`: never applied after that. With an `Idempotency-Key` header a "
        "repeated request returns the first one's record (200, header "
        "`Idempotent-Replayed: true`); the same key with a different body is 409.",
        # Answers pre-encoded bytes (see below); the schema still says what they are.
        responses={
            202: ResponseSpec(Dispatch, description=HTTPStatus.ACCEPTED.description),
            200: ResponseSpec(Dispatch, description="a repeated Idempotency-Key: the record"),
            404: ResponseSpec(ErrorBody, description="no such asset or site: `detail` names it"),
            409: ResponseSpec(ErrorBody, description="Idempotency-Key used for another body"),
        },
        **access("operator"),
        **NEEDS_STORAGE,
    )
    async def create(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[DispatchRequest],
        idempotency_key: Annotated[
            str | None,
            HeaderParameter(
                name="Idempotency-Key",
                description="Makes retries safe: the same key returns the same dispatch.",
            ),
        ] = None,
    ) -> Response[bytes]:
        # The headend from the app's state, not by injection, and the record encoded here
        # (the JSON Litestar makes of a returned Dispatch), as on GET /telemetry/{id}.
        dispatch, created = await submit_audited(
            headend_of(request), request, data, via="rest", idempotency_key=idempotency_key
        )
        body = encode_json(dispatch)
        if created:
            return Response(body, status_code=202, media_type="application/json")
        return Response(
            body,
            status_code=200,
            media_type="application/json",
            headers={"Idempotent-Replayed": "true"},
        )

    @post(
        "/{dispatch_id:str}/cancel",
        status_code=202,
        summary="Cancel a dispatch (a schedule, or one not sent yet)",
        description="Targets not sent yet become `cancelled` at once. A schedule's targets "
        "on an agent get a cancel command (now, or when the agent connects): the agent "
        "stops the schedule, returns the asset to its default (0 MW, or the value nearest "
        "0 its limits allow) and reports `cancelled`; `GET /dispatch/{id}` then shows it. "
        "Returns the record (202). A dispatch in a final state is 409 naming the state, "
        "and so is an immediate dispatch already sent to its agent.",
        responses={
            404: ResponseSpec(ErrorBody, description="no such dispatch"),
            409: ResponseSpec(ErrorBody, description="final already: `detail` names its state"),
        },
        **access("operator"),
        **NEEDS_STORAGE,
    )
    async def cancel(
        self,
        request: Request[Any, Any, Any],
        headend: NamedDependency[Headend],
        dispatch_id: FromPath[str],
    ) -> Response[Dispatch]:
        dispatch = await cancel_audited(headend, request, dispatch_id)
        if dispatch is None:
            raise NotFoundException(f"unknown dispatch {dispatch_id}")
        return Response(dispatch, status_code=202)

    @post(
        "/preview",
        status_code=200,
        summary="Preview a dispatch: the targets it would produce, nothing sent",
        description="Takes the same body as `POST /dispatch`, checks it the same way (the "
        "same 400 and 404 answers) and plans it the same way: the split by the chosen "
        "`policy` for a site, each share within what its asset can take now. Returns the "
        "`targets` (each with its asset's `min_mw` and `max_mw`, its control `kind`, the "
        "`available_min_mw`/`available_max_mw` it can take now with their `basis`, and a "
        "`reason` when the share was clamped or sits at a limit) and the `unallocated_mw` "
        "that `POST "
        "/dispatch` would produce now. Nothing is stored, sent to an agent or written to "
        "the audit trail, and no dispatch id is given; the split is computed again by "
        "`POST /dispatch` (the inventory is the same unless the headend restarted).",
        responses={
            404: ResponseSpec(ErrorBody, description="no such asset or site: `detail` names it"),
        },
        **access("operator"),
        **NEEDS_STORAGE,
    )
    async def preview(
        self, headend: NamedDependency[Headend], data: JSONBody[DispatchRequest]
    ) -> DispatchPreview:
        return headend.dispatcher.preview(data)

    @get("/history", summary="Past dispatches, newest first", **access("viewer"), **NEEDS_STORAGE)
    async def history(
        self,
        headend: NamedDependency[Headend],
        asset_id: FromQuery[str | None] = None,
        site_id: FromQuery[str | None] = None,
        state_filter: Annotated[
            str | None,
            QueryParameter(
                name="state",
                description="Keep one lifecycle state (`pending` is the name of `submitted` "
                "before 0.2).",
                schema_extra={"one_of": None, "type": OpenAPIType.STRING, "enum": _STATE_FILTERS},
            ),
        ] = None,
        limit: LimitQuery = 100,
    ) -> list[Dispatch]:
        state = state_filter
        if state == "pending":  # the name before 0.2; kept for old scripts until 0.3
            warn_deprecated("GET /dispatch/history?state=pending")
            state = "submitted"
        if state is not None and state not in _STATES:
            raise ValidationException(
                f"query parameter `state`: unknown state {state!r}; one of {', '.join(_STATES)}"
            )
        asset_id, site_id = filter_ids(headend.inventory, asset_id, site_id)
        return await headend.storage.dispatch_history(
            asset_id=asset_id,
            site_id=site_id,
            state=state,
            limit=check_limit(limit),
        )

    @get(
        "/{dispatch_id:str}",
        summary="One dispatch with its state changes",
        **access("viewer"),
        **NEEDS_STORAGE,
    )
    async def get_one(
        self, headend: NamedDependency[Headend], dispatch_id: FromPath[str]
    ) -> DispatchDetail:
        dispatch = await headend.storage.get_dispatch(dispatch_id)
        if dispatch is None:
            raise NotFoundException(f"unknown dispatch {dispatch_id}")
        events = await headend.storage.dispatch_events(dispatch_id)
        return DispatchDetail(**msgspec.structs.asdict(dispatch), events=events)
