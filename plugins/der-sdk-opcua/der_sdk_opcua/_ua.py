"""Typed constructors for asyncua's ``ua`` values.

asyncua annotates node ids, status codes and timestamps with its own ``int``, ``str`` and
``datetime`` subclasses (``ua.UInt32``, ``ua.String``, ``ua.DateTime``); these helpers take
plain Python values so the rest of the plugin stays readable under ``mypy --strict``.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime
from typing import cast

from asyncua import ua
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes

__all__ = [
    "AttributeIds",
    "ObjectIds",
    "StatusCodes",
    "data_value",
    "node_id",
    "quiet_asyncua",
    "status",
    "stop_server",
]


def status(code: int) -> ua.StatusCode:
    """The status code ``code`` (a ``StatusCodes`` value)."""
    return ua.StatusCode(ua.UInt32(code))


def node_id(identifier: str | int, namespace: int) -> ua.NodeId:
    """A string (or numeric) node id in namespace index ``namespace``."""
    if isinstance(identifier, int):
        return ua.NodeId(ua.Int32(identifier), ua.Int16(namespace))
    return ua.NodeId(ua.String(identifier), ua.Int16(namespace))


def data_value(
    variant: ua.Variant,
    *,
    code: ua.StatusCode | None = None,
    source_ts: datetime | None = None,
    server_ts: datetime | None = None,
) -> ua.DataValue:
    """A DataValue; timestamps are left out unless given (some servers refuse them)."""
    return ua.DataValue(
        variant,
        StatusCode=code if code is not None else ua.StatusCode(),
        SourceTimestamp=cast("ua.DateTime | None", source_ts),
        ServerTimestamp=cast("ua.DateTime | None", server_ts),
    )


async def stop_server(server: Server) -> None:
    """Stop an asyncua server and close the sessions clients left open.

    ``Server.stop()`` closes the connections, but a session outlives its connection (a
    client may come back and reactivate it), so each keeps a timeout task and its
    subscriptions keep publishing tasks until the session times out, long after the server
    is gone.
    """
    await server.stop()
    sessions = getattr(server.iserver, "_external_sessions", {})
    for session in list(sessions.values()):
        with contextlib.suppress(Exception):
            await session.close_session(True)


def quiet_asyncua() -> None:
    """asyncua logs every request and publish at INFO, which drowns an agent's log: lower
    it to WARNING, unless the application set a level for the ``asyncua`` logger itself."""
    logger = logging.getLogger("asyncua")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
