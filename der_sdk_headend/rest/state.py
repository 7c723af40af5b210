"""The headend in the app's state, for routes that take it without dependency injection.

Every handler may get the headend as the ``headend`` dependency; resolving it costs a few
microseconds per request, which counts on the hot read route ``GET /telemetry/{id}``.
That route reads it from the app's state instead (:func:`headend_of`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from litestar.datastructures import State

if TYPE_CHECKING:
    from litestar import Request

    from der_sdk_headend.service import Headend

__all__ = ["app_state", "headend_of"]

HEADEND_KEY = "headend"


def app_state(headend: Headend) -> State:
    """The initial state of the app of ``headend``."""
    return State({HEADEND_KEY: headend})


def headend_of(request: Request[Any, Any, Any]) -> Headend:
    """The headend whose app answers ``request``."""
    return cast("Headend", request.app.state[HEADEND_KEY])
