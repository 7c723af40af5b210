"""Error responses: every error is JSON with a ``detail`` that says what and where."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.types import ExceptionHandlersMap

from der_sdk.errors import UnknownNameError
from der_sdk.inventory import Inventory
from der_sdk.models import Asset
from der_sdk_headend.dispatch import (
    CancelConflictError,
    IdempotencyConflictError,
    InvalidDispatchError,
    UnknownTargetError,
)
from der_sdk_headend.rest.schemas import ErrorBody

__all__ = ["EXCEPTION_HANDLERS", "known_asset"]

log = logging.getLogger("der.headend.rest")


def known_asset(inventory: Inventory, asset_id: str) -> Asset:
    """The inventory asset ``asset_id``, or a 404 ``unknown asset X``."""
    try:
        return inventory.asset(asset_id)
    except UnknownNameError:
        raise NotFoundException(f"unknown asset {asset_id}") from None


def _body(
    status_code: int, detail: str, extra: Any = None, headers: dict[str, str] | None = None
) -> Response[ErrorBody]:
    return Response(
        ErrorBody(status_code=status_code, detail=detail, extra=extra),
        status_code=status_code,
        headers=headers,
    )


def _describe_validation(exc: ValidationException) -> str:
    """One sentence from Litestar's per-field messages, naming each field."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    parts: list[str] = []
    for item in extra:
        if not isinstance(item, dict):
            continue
        message = str(item.get("message", "invalid value"))
        key = item.get("key")
        source = item.get("source")
        source = getattr(source, "value", source)  # Litestar passes a ParamType enum
        if source == "body" and key in (None, "data"):
            parts.append(f"invalid request body: {message}")
        elif source == "body":
            parts.append(f"invalid request body at `$.{key}`: {message}")
        elif key:
            parts.append(f"invalid {source or 'request'} parameter `{key}`: {message}")
        else:
            parts.append(message)
    return "; ".join(parts) or str(exc.detail)


def _validation_error(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[ErrorBody]:
    return _body(400, _describe_validation(exc), exc.extra)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    return _body(exc.status_code, str(exc.detail), exc.extra, exc.headers)  # WWW-Authenticate


def _invalid_dispatch(
    request: Request[Any, Any, Any], exc: InvalidDispatchError
) -> Response[ErrorBody]:
    return _body(400, str(exc))


def _unknown_target(
    request: Request[Any, Any, Any], exc: UnknownTargetError
) -> Response[ErrorBody]:
    return _body(404, str(exc))


def _idempotency_conflict(
    request: Request[Any, Any, Any], exc: IdempotencyConflictError | CancelConflictError
) -> Response[ErrorBody]:
    return _body(409, str(exc))


def _storage_unavailable(exc: Exception) -> bool:
    """Errors that mean "storage cannot answer now" rather than a bug."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return True
    return type(exc).__module__.startswith("asyncpg") and "Connection" in type(exc).__name__


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    where = f"{request.method} {request.url.path}"
    if _storage_unavailable(exc):
        log.warning("%s: storage unavailable: %s: %s", where, type(exc).__name__, exc)
        return _body(
            503,
            f"storage is unavailable for {where} ({type(exc).__name__}: {exc}); nothing "
            "was changed; retry later (see /healthz)",
        )
    log.error("%s failed", where, exc_info=exc)
    return _body(
        500, f"internal error while handling {where}: {type(exc).__name__}; see the headend log"
    )


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    ValidationException: _validation_error,
    HTTPException: _http_error,
    InvalidDispatchError: _invalid_dispatch,
    UnknownTargetError: _unknown_target,
    IdempotencyConflictError: _idempotency_conflict,
    CancelConflictError: _idempotency_conflict,
    Exception: _internal_error,
}
