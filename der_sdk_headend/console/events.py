"""Live updates for the operator console: one server-sent event stream per browser.

The headend owns one :class:`LiveHub` (made in ``Headend._start``). It is fed by

- ingest: every time the latest sample of an asset changes (``TelemetryIngest.submit``
  on this replica, ``merge_latest`` for samples other replicas stored in bus mode), and
- dispatch: every dispatch record change this replica writes (``Dispatcher._record``); in
  bus mode a dispatch changed by another replica reaches this one by a slow re-read of
  storage (:data:`DISPATCH_POLL_S`) while a console listens to dispatches.

Nothing is done per sample while no console listens: the hub hooks itself into ingest only
while a client is connected, and then costs one dictionary store per changed sample. Every
:data:`FLUSH_INTERVAL_S` the hub hands what changed to each client (coalesced per asset:
the latest sample wins; per dispatch: the latest record wins), so a console gets at most
two messages a second however fast telemetry arrives.

``GET /console/events`` is the stream (viewer role, cookie or bearer as every console
page). Query parameters choose the topics: ``assets`` (comma-separated asset ids, or ``*``
for all), ``sites`` (comma-separated site ids: their assets), ``dispatch=1`` (dispatch
record changes; with ``assets`` or ``sites`` only those touching them unless
``dispatch=all``). Events:

- ``samples``: a JSON list of the latest samples of the subscribed assets that changed.
- ``dispatch``: a JSON list of dispatch records (as ``GET /dispatch/{id}``, without
  events) that changed.
- ``resync``: the client fell behind (or the hub dropped what it held for it); reload the
  page's data from REST, then carry on with the stream.
- ``bye``: the stream ends (server stopping, token revoked, signed out).

A comment line every :data:`HEARTBEAT_S` keeps proxies from closing an idle stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Request, get
from litestar.di import NamedDependency
from litestar.exceptions import ServiceUnavailableException, ValidationException
from litestar.params import FromQuery
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from der_sdk.models import Dispatch, TelemetrySample
from der_sdk.tasks import cancel_and_wait
from der_sdk_headend.audit import Actor
from der_sdk_headend.console.auth import page
from der_sdk_headend.rest.auth import actor_of

if TYPE_CHECKING:
    from der_sdk.inventory import Inventory
    from der_sdk.storage.contract import StorageBackend
    from der_sdk_headend.rest.auth import RestAuth
    from der_sdk_headend.service import Headend

__all__ = [
    "DISPATCH_POLL_S",
    "FLUSH_INTERVAL_S",
    "HEARTBEAT_S",
    "MAX_CLIENTS",
    "MAX_PENDING_DISPATCHES",
    "SLOW_CLIENT_S",
    "LiveClient",
    "LiveHub",
    "Subscription",
    "console_events",
]

log = logging.getLogger("der.headend.console")

FLUSH_INTERVAL_S = 0.5
"""How often the hub hands changes to its clients: at most this often per client."""
HEARTBEAT_S = 15.0
"""A comment line after this long without an event, so proxies keep the stream open."""
MAX_PENDING_DISPATCHES = 200
"""Distinct dispatches held for one client between two reads; beyond it: ``resync``."""
SLOW_CLIENT_S = 10.0
"""A client that has not taken what it was given for this long is dropped to ``resync``:
what it holds is cleared and it gets nothing more until it reads again."""
DISPATCH_POLL_S = 5.0
"""In bus mode: how often storage is re-read for dispatches other replicas changed."""
DISPATCH_POLL_LIMIT = 100
MAX_CLIENTS = 500
"""Open streams per headend; one more is refused (503) rather than slowing everyone."""
RECHECK_S = 5.0
"""How often a stream checks that its token is still active (revoked: the stream ends)."""

_encode = msgspec.json.Encoder().encode


class Subscription(msgspec.Struct, frozen=True, kw_only=True):
    """What one client listens to: a set of assets (``None``: all), and dispatches."""

    assets: frozenset[str] | None = frozenset()
    dispatch: bool = False
    dispatch_all: bool = False

    @classmethod
    def parse(
        cls,
        inventory: Inventory,
        *,
        assets: str | None,
        sites: str | None,
        dispatch: str | None,
    ) -> Subscription:
        """The subscription of the query parameters ``assets``, ``sites`` and ``dispatch``.

        :raises ValidationException: an unknown asset or site id, or a bad ``dispatch``.
        """
        chosen: set[str] | None = set()
        if assets is not None and assets.strip() == "*":
            chosen = None
        elif assets:
            ids = _split(assets)
            unknown = [a for a in ids if a not in inventory.assets]
            if unknown:
                raise ValidationException(
                    f"query parameter assets: unknown asset id(s) {', '.join(unknown[:5])}"
                )
            assert chosen is not None
            chosen.update(ids)
        if sites and chosen is not None:
            ids = _split(sites)
            unknown = [s for s in ids if s not in inventory.sites]
            if unknown:
                raise ValidationException(
                    f"query parameter sites: unknown site id(s) {', '.join(unknown[:5])}"
                )
            wanted = set(ids)
            chosen.update(a.asset_id for a in inventory.assets.values() if a.site_id in wanted)
        flag = (dispatch or "").strip().lower()
        if flag not in ("", "0", "1", "true", "all"):
            raise ValidationException(
                f"query parameter dispatch: {dispatch!r} is not one of 0, 1, all"
            )
        on = flag in ("1", "true", "all")
        # dispatch alone (no assets, no sites) means every dispatch
        dispatch_all = flag == "all" or (on and not assets and not sites)
        return cls(
            assets=None if chosen is None else frozenset(chosen),
            dispatch=on,
            dispatch_all=dispatch_all,
        )

    def wants_dispatch(self, dispatch: Dispatch) -> bool:
        if not self.dispatch:
            return False
        if self.dispatch_all or self.assets is None:
            return True
        return any(t.asset_id in self.assets for t in dispatch.targets) or (
            dispatch.asset_id is not None and dispatch.asset_id in self.assets
        )


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class _Prepared(ServerSentEventMessage):
    """An event encoded ahead (``samples``: JSON of up to a fleet's samples, which the
    generic encoder would copy and split by lines once more)."""

    def __init__(self, raw: bytes) -> None:
        super().__init__(data=None)
        self.raw = raw

    def encode(self) -> bytes:
        return self.raw


class LiveClient:
    """One open stream: what it listens to, and what changed since it last read.

    Memory is bounded: samples are held one per subscribed asset (the latest wins),
    dispatches up to :data:`MAX_PENDING_DISPATCHES`; beyond that, or when the client has not
    read for :data:`SLOW_CLIENT_S`, what it holds is dropped and it gets ``resync``.
    """

    def __init__(self, subscription: Subscription, actor: Actor) -> None:
        self.subscription = subscription
        self.actor = actor
        self.samples: dict[str, bytes] = {}  # asset id -> its latest sample, as JSON
        self.dispatches: dict[str, Dispatch] = {}
        self.resync = False
        self.closed = False
        self.close_reason = ""
        self.last_read = time.monotonic()
        self._wake = asyncio.Event()

    @property
    def pending(self) -> int:
        """Samples and dispatches held for this client, not yet read."""
        return len(self.samples) + len(self.dispatches)

    @property
    def waiting(self) -> bool:
        return bool(self.samples or self.dispatches or self.resync)

    def offer(self, samples: dict[str, bytes], dispatches: dict[str, Dispatch], now: float) -> None:
        """Take the hub's changes of one flush (what this client listens to): samples
        already encoded as JSON, once for every client."""
        if self.closed:
            return
        if self.resync:
            return  # dropped to resync: nothing more until it reads
        if self.waiting and now - self.last_read > SLOW_CLIENT_S:
            self._drop()
            return
        wanted = self.subscription.assets
        if samples:
            if wanted is None:
                self.samples.update(samples)
            elif len(wanted) < len(samples):
                for asset_id in wanted:
                    sample = samples.get(asset_id)
                    if sample is not None:
                        self.samples[asset_id] = sample
            else:
                for asset_id, sample in samples.items():
                    if asset_id in wanted:
                        self.samples[asset_id] = sample
        if dispatches and self.subscription.dispatch:
            for dispatch_id, dispatch in dispatches.items():
                if self.subscription.wants_dispatch(dispatch):
                    self.dispatches[dispatch_id] = dispatch
            if len(self.dispatches) > MAX_PENDING_DISPATCHES:
                self._drop()
                return
        if self.waiting:
            self._wake.set()

    def _drop(self) -> None:
        self.samples.clear()
        self.dispatches.clear()
        self.resync = True
        self._wake.set()

    def close(self, reason: str) -> None:
        """End the stream after what it is sending now (``bye`` with ``reason``)."""
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self._wake.set()

    async def wait(self, timeout_s: float) -> bool:
        """Wait until something is waiting or the client is closed; ``False`` on timeout."""
        if self.waiting or self.closed:
            return True
        self._wake.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()
        except TimeoutError:
            return False
        return True

    def take(self) -> list[ServerSentEventMessage]:
        """The events for what is waiting (and clear it)."""
        self.last_read = time.monotonic()
        events: list[ServerSentEventMessage] = []
        if self.resync:
            self.resync = False
            events.append(ServerSentEventMessage(event="resync", data="fell behind; reload"))
        if self.samples:
            joined = b",".join(self.samples.values())
            self.samples = {}
            events.append(_Prepared(b"event: samples\r\ndata: [" + joined + b"]\r\n\r\n"))
        if self.dispatches:
            data = _encode(list(self.dispatches.values()))
            self.dispatches = {}
            events.append(_Prepared(b"event: dispatch\r\ndata: " + data + b"\r\n\r\n"))
        self._wake.clear()
        return events


class LiveHub:
    """Fans ingest's latest samples and dispatch changes out to the console's streams.

    :param attach: called with the hub's sample callback when the first client connects,
        and with ``None`` when the last one leaves (the headend points it at ingest), so
        ingest pays nothing while no console listens.
    :param storage: re-read for dispatches other replicas changed when ``poll_dispatches``.
    """

    def __init__(
        self,
        *,
        attach: Callable[[Callable[[TelemetrySample], None] | None], None],
        storage: StorageBackend | None = None,
        poll_dispatches: bool = False,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self._attach = attach
        self._storage = storage
        self._poll_dispatches = poll_dispatches
        self.flush_interval_s = flush_interval_s
        self.max_clients = max_clients
        self.clients: set[LiveClient] = set()
        self._samples: dict[str, TelemetrySample] = {}
        self._dispatches: dict[str, Dispatch] = {}
        self._seen: dict[str, Any] = {}  # dispatch id -> updated_at, for the storage poll
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.flushes = 0

    # ------------------------------------------------------------------ feeds

    def offer_sample(self, sample: TelemetrySample) -> None:
        """A new latest sample (ingest's hot path while a client listens: one store)."""
        self._samples[sample.asset_id] = sample

    def offer_dispatch(self, dispatch: Dispatch) -> None:
        """A dispatch record changed (the dispatcher calls this after storing it)."""
        if self.clients:
            self._dispatches[dispatch.dispatch_id] = dispatch
            if self._poll_dispatches:  # not sent again by the next storage re-read
                self._seen[dispatch.dispatch_id] = dispatch.updated_at

    # ------------------------------------------------------------------ clients

    def connect(self, subscription: Subscription, actor: Actor) -> LiveClient:
        """A new client; hooks the hub into ingest if it is the first.

        :raises RuntimeError: the hub is closed or full (the route answers 503).
        """
        if self._closed:
            raise RuntimeError("the headend is stopping")
        if len(self.clients) >= self.max_clients:
            raise RuntimeError(f"{self.max_clients} console streams are open already")
        client = LiveClient(subscription, actor)
        first = not self.clients
        self.clients.add(client)
        if first:
            self._attach(self.offer_sample)
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._run(), name="headend-console-hub")
        return client

    def disconnect(self, client: LiveClient) -> None:
        self.clients.discard(client)
        if not self.clients:
            self._attach(None)
            self._samples.clear()
            self._dispatches.clear()

    def close_where(self, match: Callable[[LiveClient], bool], reason: str) -> int:
        """End the streams ``match`` picks (e.g. a signed-out session's); how many."""
        closing = [c for c in self.clients if match(c)]
        for client in closing:
            client.close(reason)
        return len(closing)

    async def close(self) -> None:
        """End every stream and stop (the headend is stopping)."""
        self._closed = True
        self.close_where(lambda _: True, "the headend is stopping")
        self._attach(None)
        task, self._task = self._task, None
        await cancel_and_wait([task])

    # ------------------------------------------------------------------ fan-out

    def flush(self) -> None:
        """Hand what changed since the last flush to every client."""
        latest, self._samples = self._samples, {}
        dispatches, self._dispatches = self._dispatches, {}
        if not latest and not dispatches:
            return
        # encoded once here, not once per client: 50 consoles of the whole fleet would
        # otherwise encode every sample 50 times
        samples = {asset_id: _encode(sample) for asset_id, sample in latest.items()}
        now = time.monotonic()
        for client in list(self.clients):
            client.offer(samples, dispatches, now)
        self.flushes += 1

    async def _run(self) -> None:
        next_poll = time.monotonic() + DISPATCH_POLL_S
        while self.clients:
            await asyncio.sleep(self.flush_interval_s)
            if self._poll_dispatches and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + DISPATCH_POLL_S
                if any(c.subscription.dispatch for c in self.clients):
                    await self._poll_storage()
            self.flush()

    async def _poll_storage(self) -> None:
        """Bus mode: take dispatches changed by other replicas from storage."""
        if self._storage is None:
            return
        try:
            recent = await self._storage.dispatch_history(limit=DISPATCH_POLL_LIMIT)
        except Exception as exc:  # storage trouble: /healthz reports it; try next time
            log.debug("console: re-reading dispatches failed: %r", exc)
            return
        for dispatch in recent:
            if self._seen.get(dispatch.dispatch_id) != dispatch.updated_at:
                self._seen[dispatch.dispatch_id] = dispatch.updated_at
                self._dispatches[dispatch.dispatch_id] = dispatch
        if len(self._seen) > 10 * DISPATCH_POLL_LIMIT:
            keep = {d.dispatch_id for d in recent}
            self._seen = {k: v for k, v in self._seen.items() if k in keep}


# ----------------------------------------------------------------------------- the route


def _token_still_active(auth: RestAuth, actor: Actor) -> bool:
    """Whether the token behind ``actor`` is still active (anonymous: while auth is off)."""
    if actor.kind != "token":
        return not auth.enabled
    for token in auth.tokens():
        if token.label() == actor.name:
            return token.active
    return False


async def _stream(
    headend: Headend, hub: LiveHub, client: LiveClient
) -> AsyncIterator[ServerSentEventMessage]:
    auth = headend.rest_auth
    checked = time.monotonic()
    quiet_since = time.monotonic()
    try:
        yield ServerSentEventMessage(comment="connected", retry=3000, data=None)
        while not client.closed:
            ready = await client.wait(min(HEARTBEAT_S, RECHECK_S))
            now = time.monotonic()
            if now - checked >= RECHECK_S:
                checked = now
                if not _token_still_active(auth, client.actor):
                    client.close("the token was revoked or authentication turned on")
            if client.closed:
                break
            if ready:
                events = client.take()
                for event in events:
                    yield event
                if events:
                    quiet_since = now
            if now - quiet_since >= HEARTBEAT_S:
                quiet_since = now
                yield ServerSentEventMessage(comment="keep-alive", data=None)
        yield ServerSentEventMessage(event="bye", data=client.close_reason or "closed")
    finally:
        hub.disconnect(client)


@get(
    "/console/events",
    **page("viewer"),
)
async def console_events(
    request: Request[Any, Any, Any],
    headend: NamedDependency[Headend],
    assets: FromQuery[str | None] = None,
    sites: FromQuery[str | None] = None,
    dispatch: FromQuery[str | None] = None,
) -> ServerSentEvent:
    """The console's one live stream per browser."""
    subscription = Subscription.parse(
        headend.inventory, assets=assets, sites=sites, dispatch=dispatch
    )
    hub = headend.live_hub
    try:
        client = hub.connect(subscription, actor_of(request))
    except RuntimeError as exc:
        raise ServiceUnavailableException(f"cannot open a console stream: {exc}") from None
    return ServerSentEvent(
        _stream(headend, hub, client),
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
