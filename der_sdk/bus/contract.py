"""The message bus contract: what several headend replicas share through a bus backend.

A bus carries four things, each with its own guarantees (the conformance suite,
:class:`der_sdk.testing.BusConformance`, checks them):

**Commands** (:meth:`MessageBus.send_command`, :meth:`MessageBus.serve_commands`)
    Request and reply to one replica, by its id: a replica serves the commands for the
    agents whose streams it holds. At most once, never stored: the sender learns that the
    holder took the command (its reply), that no replica serves that id
    (:class:`NoResponderError`), that the holder failed (:class:`CommandFailedError`) or
    that the outcome is unknown (:class:`CommandTimeoutError`, :class:`BusUnavailableError`).
    Make commands idempotent (a dispatch id) so that sending one again is safe.

**Presence** (:class:`PresenceTable`)
    A shared key-value table, for example agent id → the replica that holds its stream.
    Every entry expires ``presence_max_age_s`` after it was last written (one age for the
    whole table: NATS 2.9 has no per-key age), so a holder refreshes its entries well
    within that age, and the entries of a replica that died expire on their own. Writes
    carry revisions, so a holder refreshes or releases only what it still holds.

**Telemetry stream** (:class:`TelemetryStream`)
    A durable, bounded queue of opaque batches between the replicas that receive telemetry
    and the writers that store it. :meth:`TelemetryStream.publish` returns once the batch
    is stored durably; each batch goes to one consumer at a time and stays until it is
    acknowledged; a batch not acknowledged within ``telemetry_ack_wait_s`` is delivered
    again (at least once: the writer deduplicates). When the stream is full, publish
    raises :class:`StreamFullError`: backpressure for the publisher, never a silent drop.

**Fan-out** (:meth:`MessageBus.broadcast`, :meth:`MessageBus.subscribe`)
    A topic that every subscriber of every replica receives (latest telemetry, events).
    At most once, never stored: a subscriber that was not listening, or fell behind,
    misses messages; publish what supersedes itself.

Conventions that hold for every backend:

* Payloads are ``bytes``; the caller chooses the encoding (msgspec). No backend type (no
  NATS message, no client) crosses this contract.
* Names live in a namespace (:attr:`BusOptions.namespace`): subjects, the stream and the
  presence table of one namespace never see another's, so deployments (and tests) can
  share one server.
* Methods are coroutines and never block the event loop. Callbacks and iterators run on
  the loop that called :meth:`MessageBus.connect`.
* A bus that cannot reach its server raises :class:`BusUnavailableError` from calls that
  need it, reports ``state == "reconnecting"`` meanwhile, and carries on by itself when
  the server is back.
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Literal

import msgspec

from der_sdk.errors import DerSdkError

if TYPE_CHECKING:
    from der_sdk.plugins import Plugins

__all__ = [
    "BusError",
    "BusOptions",
    "BusState",
    "BusUnavailableError",
    "CommandFailedError",
    "CommandHandler",
    "CommandTimeoutError",
    "FanoutSubscription",
    "MessageBus",
    "MessageTooLargeError",
    "NoResponderError",
    "PresenceChange",
    "PresenceConflictError",
    "PresenceEntry",
    "PresenceTable",
    "PresenceWatch",
    "PublishAck",
    "StreamBacklog",
    "StreamConsumer",
    "StreamFullError",
    "StreamMessage",
    "Subscription",
    "TelemetryStream",
    "check_key",
    "check_name",
    "check_topic",
    "open_bus",
]

BusState = Literal["connected", "reconnecting", "closed"]
"""``connected``; ``reconnecting`` (the link to the server is down and the bus is trying
again by itself); ``closed`` (not connected yet, or closed)."""

CommandHandler = Callable[[bytes], Awaitable[bytes]]
"""Serves one command: gets its payload, returns the reply. An exception it raises reaches
the sender as :class:`CommandFailedError` with the exception's message."""

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_TOPIC = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_KEY = re.compile(r"[-/_=A-Za-z0-9]+(\.[-/_=A-Za-z0-9]+)*")


def _check(kind: str, value: str, pattern: re.Pattern[str], allowed: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"bus {kind} {value!r} is not valid: use {allowed}")
    return value


def check_name(kind: str, value: str) -> str:
    """``value`` if it is a valid namespace or replica id (letters, digits, ``-``, ``_``);
    :class:`ValueError` naming ``kind`` and the value if not."""
    return _check(kind, value, _TOKEN, "letters, digits, '-' and '_'")


def check_topic(topic: str) -> str:
    """``topic`` if it is a valid fan-out topic: names joined by dots (``telemetry.latest``)."""
    return _check("topic", topic, _TOPIC, "names of letters, digits, '-' and '_' joined by '.'")


def check_key(key: str) -> str:
    """``key`` if it is a valid presence key: letters, digits and ``-_/=``, with single
    dots between them."""
    return _check("presence key", key, _KEY, "letters, digits, '-', '_', '/', '=' and inner '.'")


# =========================================================================== errors


class BusError(DerSdkError):
    """Base of the errors a bus raises on purpose."""


class BusUnavailableError(BusError):
    """The bus cannot reach its server now (not connected, reconnecting, closed, or a
    request got no answer). For a publish or a command the outcome is unknown: send again
    (with the same ``msg_id`` for a publish, which is then stored once)."""


class NoResponderError(BusError):
    """No replica serves commands for the replica id the command was sent to: that replica
    is gone (or never was). Nothing was delivered."""


class CommandTimeoutError(BusError):
    """The replica did not reply in time: the command may or may not have been taken."""


class CommandFailedError(BusError):
    """The replica's handler raised; the message is the handler's."""


class StreamFullError(BusError):
    """The telemetry stream holds as many messages or bytes as its limits allow: the batch
    was **not** stored. Wait (the writers free space as they acknowledge) and publish it
    again; tell the producer to hold on meanwhile."""


class MessageTooLargeError(BusError, ValueError):
    """A payload is larger than the bus carries in one message
    (:attr:`MessageBus.max_message_bytes`): split it."""


class PresenceConflictError(BusError):
    """A presence entry changed since the revision given (another replica claimed the key,
    or it expired): the caller no longer holds it."""

    def __init__(self, key: str, revision: int, current: int | None) -> None:
        self.key = key
        self.revision = revision
        self.current = current
        now = "it is gone (expired or released)" if current is None else f"it is at {current}"
        super().__init__(f"presence key {key!r} is no longer at revision {revision}: {now}")


# =========================================================================== options


class BusOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What the caller chooses for a bus: its namespace and limits. Where and how to connect
    (server, credentials) is the URL's business.

    Raises :class:`ValueError` naming the field when a value is out of range.
    """

    namespace: str = "der"
    """Prefix of every subject, stream and table name of this bus (letters, digits, ``-``,
    ``_``). Buses with different namespaces on one server do not see each other."""

    presence_max_age_s: float = 30.0
    """Seconds a presence entry lives after its last write. Refresh entries at least every
    third of this."""

    telemetry_max_bytes: int = 1024**3
    """Bytes the telemetry stream may hold (unacknowledged batches); at the limit, publish
    raises :class:`StreamFullError`."""

    telemetry_max_messages: int = 1_000_000
    """Batches the telemetry stream may hold; at the limit, publish raises
    :class:`StreamFullError`."""

    telemetry_ack_wait_s: float = 30.0
    """Seconds a consumer has to acknowledge a batch (or report progress) before it is
    delivered again."""

    duplicate_window_s: float = 120.0
    """Seconds within which a second publish with the same ``msg_id`` is recognised as a
    duplicate and not stored again."""

    def __post_init__(self) -> None:
        check_name("namespace", self.namespace)
        for field in (
            "presence_max_age_s",
            "telemetry_ack_wait_s",
            "duplicate_window_s",
            "telemetry_max_bytes",
            "telemetry_max_messages",
        ):
            value = getattr(self, field)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"BusOptions.{field} must be more than 0, got {value!r}")


# =========================================================================== records


class PresenceEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One presence entry: its value and revision (which grows with every write to the
    table)."""

    key: str
    value: bytes
    revision: int


class PresenceChange(msgspec.Struct, frozen=True, kw_only=True):
    """A change to a presence table, as a watcher sees it.

    ``put``: written (claimed or refreshed), ``entry`` is the new entry. ``delete``:
    released. ``expired``: not refreshed within the max age, so gone (the replica that
    wrote it probably died). ``entry`` is ``None`` for the last two.
    """

    kind: Literal["put", "delete", "expired"]
    key: str
    entry: PresenceEntry | None = None


class PublishAck(msgspec.Struct, frozen=True, kw_only=True):
    """A batch is stored durably at ``sequence``. ``duplicate``: a batch with the same
    ``msg_id`` was stored before (at ``sequence``) and this one was not stored again."""

    sequence: int
    duplicate: bool = False


class StreamBacklog(msgspec.Struct, frozen=True, kw_only=True):
    """What the telemetry stream holds now (unacknowledged batches) and its limits."""

    messages: int
    bytes: int
    max_messages: int
    max_bytes: int


# =========================================================================== parts


class Subscription(abc.ABC):
    """Something the bus delivers to until it is closed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop receiving; idempotent. :meth:`MessageBus.close` closes it too."""


class FanoutSubscription(Subscription):
    """The messages of one fan-out topic, in publish order per publisher, as an async
    iterator of payloads; iteration ends when the subscription (or the bus) closes."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> bytes: ...


class PresenceWatch(Subscription):
    """A watch on a presence table: :attr:`initial` is the table when the watch started,
    and iterating yields every change after that, in revision order, ending when the watch
    (or the bus) closes. No change between the snapshot and the first yielded change is
    lost or repeated.

    Expiry is reported within about a second after an entry's age passed (a backend may
    need to look before it reports it: NATS does not announce expiries).
    """

    initial: dict[str, PresenceEntry]

    def __aiter__(self) -> AsyncIterator[PresenceChange]:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> PresenceChange: ...


class PresenceTable(abc.ABC):
    """A shared key-value table whose entries expire ``max_age_s`` after their last write.

    Keys: letters, digits and ``-_/=``, with single dots between them (:func:`check_key`);
    values: small ``bytes``.
    Entries survive the restart of a replica (not its death: then they expire) and, on
    NATS, a restart of the server.
    """

    @property
    @abc.abstractmethod
    def max_age_s(self) -> float:
        """Seconds an entry lives after its last write."""

    @abc.abstractmethod
    async def claim(self, key: str, value: bytes) -> int:
        """Write ``key`` whoever held it (the newest holder wins, as when an agent moves to
        another replica); return the new revision."""

    @abc.abstractmethod
    async def refresh(self, key: str, value: bytes, revision: int) -> int:
        """Write ``key`` again, which restarts its age, only if it is still at ``revision``;
        return the new revision.

        :raises PresenceConflictError: someone else wrote it since, or it expired or was
            released: the caller no longer holds it (claim it again if it should).
        """

    @abc.abstractmethod
    async def release(self, key: str, revision: int) -> bool:
        """Delete ``key`` if it is still at ``revision``; ``False`` when it is not (another
        replica holds it now, or it is gone): nothing is deleted then."""

    @abc.abstractmethod
    async def get(self, key: str) -> PresenceEntry | None:
        """The entry of ``key``, or ``None`` when there is none (released or expired)."""

    @abc.abstractmethod
    async def entries(self) -> dict[str, PresenceEntry]:
        """Every live entry, by key."""

    @abc.abstractmethod
    async def watch(self) -> PresenceWatch:
        """Start watching the whole table (close the watch when done)."""


class StreamMessage(abc.ABC):
    """One batch delivered to a consumer. Acknowledge it once it is safely stored (after
    the database committed); until then it counts against the stream's limits."""

    #: The payload, as published.
    data: bytes
    #: Its position in the stream (the :attr:`PublishAck.sequence` it was stored at).
    sequence: int
    #: How many times it was delivered, this time included (1 the first time).
    deliveries: int

    @abc.abstractmethod
    async def ack(self) -> None:
        """The batch is done: remove it from the stream. Returns once the server recorded
        it. Acknowledging twice, or after it was delivered again, does no harm."""

    @abc.abstractmethod
    async def nak(self, delay_s: float = 0.0) -> None:
        """The batch could not be handled now: deliver it again after ``delay_s`` seconds
        (to any consumer)."""

    @abc.abstractmethod
    async def in_progress(self) -> None:
        """Still working on it: restart its acknowledgement wait."""


class StreamConsumer(Subscription):
    """One writer's end of the telemetry stream. All consumers of a stream share the work:
    each batch is delivered to one of them at a time, oldest first (a redelivered batch
    may come after newer ones)."""

    @abc.abstractmethod
    async def fetch(self, max_messages: int = 100, timeout_s: float = 1.0) -> list[StreamMessage]:
        """Up to ``max_messages`` batches: waits up to ``timeout_s`` for the first one, then
        returns what is there. An empty list when none came in time.

        :raises BusUnavailableError: the server cannot be reached.
        """


class TelemetryStream(abc.ABC):
    """The durable, bounded stream of telemetry batches (see the module docstring)."""

    @abc.abstractmethod
    async def publish(self, payload: bytes, *, msg_id: str | None = None) -> PublishAck:
        """Store ``payload`` durably; return once it is (on NATS: on disk, as JetStream file
        storage acknowledges it).

        :param msg_id: an idempotency key (for example agent id and batch sequence): a
            second publish with the same key within ``duplicate_window_s`` is not stored
            again and returns ``duplicate=True``.
        :raises StreamFullError: the stream is at its limits; nothing was stored.
        :raises MessageTooLargeError: ``payload`` exceeds :attr:`MessageBus.max_message_bytes`.
        :raises BusUnavailableError: no acknowledgement (server unreachable): the batch may
            or may not be stored; publish again with the same ``msg_id``.
        """

    @abc.abstractmethod
    async def consumer(self) -> StreamConsumer:
        """A new consumer, sharing the work with every other consumer of this stream (on
        every replica)."""

    @abc.abstractmethod
    async def backlog(self) -> StreamBacklog:
        """What the stream holds now, and its limits (for ``/metrics`` and health)."""


class MessageBus(abc.ABC):
    """A connection to a message bus, shared by one replica's parts.

    Lifecycle: created unconnected by its backend's factory, :meth:`connect` once (it
    creates the namespace's stream and presence table on the server if they are missing,
    and applies the options' limits to them), :meth:`close` once at shutdown.
    :attr:`presence` and :attr:`telemetry` are usable between the two.
    """

    #: Short name shown in logs and ``/healthz`` (``memory``, ``nats``).
    name: str = "bus"

    def __init__(self, options: BusOptions) -> None:
        self.options = options

    # ------------------------------------------------------------------ lifecycle

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect and prepare the namespace's stream and presence table.

        :raises BusUnavailableError: the server cannot be reached; the message names it.
        :raises BusError: the server refused the stream or table (for example a limit it
            does not allow); the message says which and why.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every subscription, consumer and watch of this bus, then the connection.
        Idempotent. What the server stores stays."""

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Delete the namespace's stream (with its unacknowledged batches) and presence
        table from the server: for tests and decommissioning, never in normal operation."""

    @property
    @abc.abstractmethod
    def state(self) -> BusState:
        """Whether the bus is connected now; never blocks."""

    @property
    @abc.abstractmethod
    def max_message_bytes(self) -> int:
        """The largest payload one message carries (on NATS, the server's ``max_payload``
        less room for headers)."""

    # ------------------------------------------------------------------ commands

    @abc.abstractmethod
    async def serve_commands(self, replica: str, handler: CommandHandler) -> Subscription:
        """Serve the commands sent to ``replica`` (a token, unique per running replica).

        ``handler`` is awaited for each command, one at a time in arrival order; keep it
        quick (queue the work and reply). Close the subscription to stop serving: once
        ``close()`` returned, senders get :class:`NoResponderError`.
        """

    @abc.abstractmethod
    async def send_command(self, replica: str, payload: bytes, *, timeout_s: float = 5.0) -> bytes:
        """Send a command to ``replica``; return its handler's reply.

        :raises NoResponderError: no replica serves ``replica`` (it is gone).
        :raises CommandFailedError: its handler raised.
        :raises CommandTimeoutError: no reply within ``timeout_s``; outcome unknown.
        :raises BusUnavailableError: the server cannot be reached; outcome unknown.
        """

    # ------------------------------------------------------------------ presence, telemetry

    @property
    @abc.abstractmethod
    def presence(self) -> PresenceTable:
        """The namespace's presence table (entries live ``options.presence_max_age_s``)."""

    @property
    @abc.abstractmethod
    def telemetry(self) -> TelemetryStream:
        """The namespace's telemetry stream."""

    # ------------------------------------------------------------------ fan-out

    @abc.abstractmethod
    async def broadcast(self, topic: str, payload: bytes) -> None:
        """Send ``payload`` to every current subscriber of ``topic`` on every replica, this
        bus's own subscriptions included. At most once; returns without waiting for them.

        :raises BusUnavailableError: the server cannot be reached (nothing was sent).
        """

    @abc.abstractmethod
    async def subscribe(self, topic: str) -> FanoutSubscription:
        """Receive what is broadcast to ``topic`` from now on (at most once: on NATS, what
        another connection broadcasts in the first milliseconds may be missed)."""


def open_bus(url: str, plugins: Plugins, options: BusOptions | None = None) -> MessageBus:
    """Create (not connect) the bus for ``url`` through the ``der_bus_backends`` hook.

    :raises der_sdk.errors.UnknownNameError: no installed backend handles the URL scheme.
    """
    return plugins.bus_for_url(url).factory(url, options or BusOptions())
