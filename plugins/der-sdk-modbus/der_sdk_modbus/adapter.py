"""The ``modbus`` adapter: a profile-driven Modbus TCP device with its own poller.

Each adapter polls its device on its own schedule (``poll_interval_s``) in a task that
:meth:`ModbusAdapter.connect` starts and :meth:`ModbusAdapter.close` stops. ``read()``
hands out each poll's sample once; asked again before the next poll it polls at once if
the poller is idle, and if a poll is still under way (a slow device) it waits at most
50 ms before repeating the last reading as ``uncertain``. So one slow or dead device never
holds up the agent's other assets, and a sample's timestamp is when its poll started. A
read that finds no new poll (or one over half an interval old) also moves the poller's
cadence to just before the reads, so that reads at the poll interval find their poll done
and wait for nothing.

Quality rules:

* a poll is all or nothing: every coalesced read of it succeeds, or the sample is ``bad``
  with the reason (timeout, exception response and its code, lost connection) and no
  value at all, so a 32- or 64-bit value or a value and its scale factor are never mixed
  from two polls;
* a good reading older than a poll can take is reported ``bad`` as stale, never
  re-stamped;
* a broken connection is opened again at the next poll; while the device stays
  unreachable the attempts back off up to ``reconnect_max_s`` (default: the poll
  interval, so a device that comes back is read again within one poll).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import msgspec

from der_sdk.extensions import Adapter, AdapterContext, DeviceProfile, SetpointResult
from der_sdk.models import TelemetrySample, utc_now
from der_sdk_modbus.coalesce import ReadBlock, plan_reads
from der_sdk_modbus.link import ModbusFault, ModbusLink
from der_sdk_modbus.options import ModbusOptions, options_from
from der_sdk_modbus.pack import find_profile, modbus_profiles
from der_sdk_modbus.points import (
    Point,
    PointMap,
    ProfileError,
    Table,
    Value,
    compile_profile,
    merge_points,
    sunspec_models_of,
)
from der_sdk_modbus.sunspec import (
    SunSpecModel,
    SunSpecScanError,
    choose_model_profiles,
    model_bases,
    scan,
)

__all__ = ["ModbusAdapter"]

log = logging.getLogger("der.modbus")

T = TypeVar("T")

_STALE_SLACK_S = 0.5
_IN_FLIGHT_WAIT_S = 0.05
"""How long read() waits for a poll already under way before repeating the last reading."""
_CANCEL_RETRY_S = 0.2
_DRIFT_S = 0.05
"""How late a poll's timer may fire and the cadence still count from when it was due."""
_LEAD_MIN_S = 0.05
"""The least a poll is made ahead of the read() it is for (see ``_poll_forever``)."""
_RETRY_EXCEPTION_CODES = frozenset({0x05, 0x06})  # acknowledge, busy: ask again


class _NotReady(Exception):
    """No connection now; the message says why and when the next attempt is."""


@dataclass(frozen=True, slots=True)
class _Reading:
    """The outcome of one poll: a good sample, or why there is none."""

    started: float  # loop time
    ts: datetime
    sample: TelemetrySample | None
    reason: str | None = None


class ModbusAdapter(Adapter):
    """One Modbus TCP device for one asset.

    :param context: the asset, its :class:`~der_sdk_modbus.options.ModbusOptions` and the
        installed device profiles.
    :param wall_clock: the timestamp source of samples (inject one in tests).
    :raises ProfileError: the named profile is not installed or is not a valid Modbus
        profile (raised when the agent builds its adapters, before any I/O).
    """

    def __init__(
        self, context: AdapterContext, *, wall_clock: Callable[[], datetime] = utc_now
    ) -> None:
        self.asset = context.asset
        self.options: ModbusOptions = options_from(context.options)
        self._wall_clock = wall_clock
        self._installed = modbus_profiles(context.profiles)
        self._named: DeviceProfile | None = None
        self._map: PointMap | None = None
        opts = self.options
        self._link = ModbusLink(opts.host, opts.port, opts.unit_id, opts.timeout_s)
        self._gap_tolerance = opts.gap_tolerance
        self._plan: list[ReadBlock] = []
        self._static_plan: list[ReadBlock] = []
        self._reads: list[_Read] = []
        self._static_reads: list[_Read] = []
        self._static_values: dict[Point, Value] = {}
        self._prepared = False
        self._latest: _Reading | None = None
        self._generation = 0  # polls published so far
        self._returned = 0  # the generation read() last handed out
        self._polling = False
        self._task: asyncio.Task[None] | None = None
        # plain futures and timer handles rather than Events and timeout contexts: they
        # are made at every poll of every device
        self._waiters: list[asyncio.Future[None]] = []  # resolved when a poll is published
        self._poll_asked = False  # read() asked the poller to poll now
        self._sleeper: asyncio.Future[None] | None = None  # the poller's wait for its tick
        self._io = asyncio.Lock()
        self._connect_failures = 0
        self._skip_polls = 0
        self._last_failure = "not connected yet"
        self._rng = random.Random()
        self.sunspec_models: list[SunSpecModel] = []
        """The SunSpec models the last scan found (empty without ``sunspec_scan``)."""
        self.polls = 0
        self.failed_polls = 0
        self.reads_waited = 0
        """Calls of :meth:`read` that found no new poll and waited for one."""
        self._read_waited_at: float | None = None  # loop time of the last such read()
        self._poll_took_s = 0.0  # how long the last poll took
        if opts.profile is not None:
            self._named = find_profile(context.profiles, opts.profile, opts.profile_version)
            if opts.sunspec_scan:
                # check what can be checked before the scan
                _point_map([self._named], {}, [self._label_of(self._named)])
            else:
                self._use(_point_map([self._named], None, [self._label_of(self._named)]))

    # ---------------------------------------------------------------- introspection

    @property
    def endpoint(self) -> str:
        return self._link.endpoint

    @property
    def requests(self) -> int:
        """Requests sent to the device so far."""
        return self._link.requests

    @property
    def read_plan(self) -> list[ReadBlock]:
        """The coalesced reads of one poll (known once the profile is resolved)."""
        return list(self._plan)

    @property
    def point_map(self) -> PointMap | None:
        return self._map

    @staticmethod
    def _label_of(profile: DeviceProfile) -> str:
        return f"{profile.name} {profile.version}"

    def _use(self, point_map: PointMap) -> None:
        if not point_map.feeds_mw:
            raise ProfileError(
                f"device profile(s) {', '.join(point_map.profiles)} have no readable point "
                "feeding mw; every asset reports its power"
            )
        self._map = point_map
        self._replan()

    def _replan(self) -> None:
        assert self._map is not None
        opts = self.options
        readable: list[tuple[Table, int, int]] = []
        if self.sunspec_models and self._gap_tolerance > 0:
            readable.append(
                ("holding", self.sunspec_models[0].address, self.sunspec_models[-1].end)
            )
        self._plan, self._static_plan = (
            plan_reads(
                points,
                max_registers=opts.max_read_registers,
                max_bits=opts.max_read_bits,
                gap_tolerance=self._gap_tolerance,
                readable=readable,
            )
            for points in (self._map.polled, self._map.static)
        )
        self._reads, self._static_reads = _reads(self._plan), _reads(self._static_plan)

    # ---------------------------------------------------------------- Adapter

    async def connect(self) -> None:
        """Start polling, and wait (briefly) for the first poll's outcome.

        Never raises for a device fault: a device that cannot be reached gives ``bad``
        samples saying why, and the poller keeps trying.
        """
        if self._task is None or self._task.done():
            self._waiters = []
            self._task = asyncio.create_task(
                self._poll_forever(), name=f"der-modbus-poll-{self.asset.asset_id}"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._read_wait_s
        try:
            # past the deadline the poller carries on; read() says what is going on meanwhile
            while self._latest is None and (remaining := deadline - loop.time()) > 0:
                await self._next_publish(remaining)
        except asyncio.CancelledError:
            await self.close()  # the caller gave up on us: leave nothing running
            raise

    async def read(self) -> TelemetrySample:
        """The newest poll's sample, each poll's once.

        Asked again before the next poll: polls now if the poller is idle and returns that;
        while a poll is still running (a slow device) waits briefly, then returns the last
        reading again, ``uncertain`` and with its own timestamp, so a slow device never
        holds the agent up. A failed poll gives a ``bad`` sample saying why.
        """
        if self._task is None or self._task.done():
            return self._bad(self._wall_clock(), f"{self._where}: adapter not connected")
        if self._generation == self._returned:  # nothing new since the last read()
            self.reads_waited += 1
            self._read_waited_at = asyncio.get_running_loop().time()
            if self._polling:  # a poll is on its way: a slow device is not waited for
                wait_s = min(_IN_FLIGHT_WAIT_S, self._read_wait_s)
            else:  # the poller is idle: poll now and report that
                self._ask_for_poll()
                wait_s = self._poll_budget_s
            await self._next_publish(wait_s)
        return self._newest()

    def read_nowait(self) -> TelemetrySample | None:
        """What :meth:`read` returns when a poll made since the last read is ready (the
        poller runs just ahead of the reads), else ``None``: :meth:`read` waits for one."""
        if self._task is None or self._task.done() or self._generation == self._returned:
            return None
        return self._newest()

    def _newest(self) -> TelemetrySample:
        """The newest poll's sample (marked ``uncertain`` when :meth:`read` already
        returned it), or a ``bad`` one saying why there is none."""
        latest = self._latest
        if latest is None:
            return self._bad(
                self._wall_clock(), f"{self._where}: no reading yet ({self._last_failure})"
            )
        repeated = self._generation == self._returned
        self._returned = self._generation
        if latest.sample is None:
            return self._bad(latest.ts, latest.reason or "unknown failure")
        now = asyncio.get_running_loop().time()
        age = now - latest.started
        if age > self.options.poll_interval_s / 2 and not repeated:
            # a poll made just after the last read: the poller runs an interval behind the
            # reads; moved ahead of them (as after a read that waited), the next read gets
            # a reading made just before it
            self._read_waited_at = now
        if age > self._max_age_s:
            return self._bad(
                self._wall_clock(),
                f"{self._where}: stale: the last good poll is {age:.1f} s old "
                f"(polled every {self.options.poll_interval_s:g} s); the device is not "
                "answering in time",
            )
        if repeated:
            return msgspec.structs.replace(
                latest.sample,
                quality="uncertain",
                quality_reason=(
                    f"{self._where}: no new reading since {latest.ts.isoformat()}: the device "
                    "answers slower than it is read"
                ),
            )
        return latest.sample

    async def apply_setpoint(self, mw: float, duration_s: float | None = None) -> SetpointResult:
        """Write ``mw`` (clamped to the asset's limits) to the profile's ``mw_setpoint``
        register, scaled to the device's unit and scale factor, then its enable registers.

        ``duration_s`` is not sent to the device: the agent returns the asset to 0 MW when
        it ends.
        """
        if not math.isfinite(mw):
            return SetpointResult(status="rejected", reason=f"setpoint {mw} is not a number")
        notes: list[str] = []
        asset = self.asset
        if asset.max_mw > asset.min_mw and not asset.min_mw <= mw <= asset.max_mw:
            mw = asset.clamp(mw)
            notes.append(f"clamped to [{asset.min_mw:g}, {asset.max_mw:g}] MW")
        async with self._io:
            try:
                await self._ensure_ready(force=True)
            except (_NotReady, ModbusFault, SunSpecScanError, ProfileError) as exc:
                return SetpointResult(status="failed", reason=f"{self._where}: {exc}")
            assert self._map is not None
            point = self._map.setpoint
            if point is None or point.codec is None:
                return SetpointResult(
                    status="rejected",
                    reason=f"device profile(s) {', '.join(self._map.profiles)} have no "
                    "writable point feeding mw_setpoint; this device takes no setpoints here",
                )
            try:
                scale_factor = await self._read_scale_factor(point)
                raw = point.to_raw(mw, scale_factor)
                registers = point.codec.encode(raw)
            except ValueError as exc:
                return SetpointResult(
                    status="rejected",
                    reason=f"{mw:g} MW cannot be written to {point.label()}: {exc}",
                )
            except ModbusFault as exc:
                return SetpointResult(status="failed", reason=f"{self._where}: {exc}")
            try:
                await self._request(
                    lambda: self._link.write_registers(
                        point.address, registers, point.write_function
                    )
                )
                for enable, value in point.enable:
                    await self._write_value(enable, value)
            except ModbusFault as exc:
                return SetpointResult(status="failed", reason=f"{self._where}: {exc}")
        applied = point.to_field(raw, scale_factor)
        applied_mw = float(applied) if isinstance(applied, int | float) else mw
        if not math.isclose(applied_mw, mw, rel_tol=1e-9, abs_tol=1e-12):
            notes.append(f"rounded to the register's resolution: {applied_mw:g} MW")
        return SetpointResult(
            status="applied", applied_mw=applied_mw, reason="; ".join(notes) or None
        )

    async def close(self) -> None:
        """Stop polling and close the connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        self._link.close()  # before waiting: whatever the poller awaits on the wire ends now
        while task is not None and not task.done():
            # again if need be: a library may drop a cancellation that meets an answer
            await asyncio.wait({task}, timeout=_CANCEL_RETRY_S)
            task.cancel()
        if task is not None and not task.cancelled():
            task.exception()  # retrieved; the poller logs its own errors
        self._prepared = False
        self._latest = None
        self._polling = False

    # ---------------------------------------------------------------- polling

    @property
    def _where(self) -> str:
        return f"modbus {self._link.endpoint}"

    @property
    def _poll_budget_s(self) -> float:
        """The longest one poll can take: every request timing out and retried (a scan
        and a reconnect counted in)."""
        opts = self.options
        requests = max(1, len(self._plan)) + 2
        return (opts.retries + 1) * opts.timeout_s * requests + _STALE_SLACK_S

    @property
    def _read_wait_s(self) -> float:
        """How long connect() waits for the first poll, and read() for a poll already
        under way: half a poll interval at most, so neither outlasts the agent's telemetry
        interval (which is at least the poll interval when configured as documented)."""
        return min(self.options.poll_interval_s / 2, self._poll_budget_s)

    @property
    def _max_age_s(self) -> float:
        """The oldest a good reading may be: a poll interval plus the longest a poll takes."""
        return self.options.poll_interval_s + self._poll_budget_s

    async def _poll_forever(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.options.poll_interval_s
        next_at = loop.time()
        while True:
            self._poll_asked = False
            # the next poll is due an interval after this one was due when its timer woke
            # it (a timer that fires a little late does not make the cadence drift), else
            # an interval after it starts, whether a read() asked for it or a slow poll
            # overran: reads never add polls to the cadence, they shift it
            now = loop.time()
            next_at = next_at + interval if 0 <= now - next_at < _DRIFT_S else now + interval
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not end the polling silently
                log.exception("asset %s: %s: poll failed", self.asset.asset_id, self._where)
                self._publish(
                    _Reading(
                        loop.time(),
                        self._wall_clock(),
                        None,
                        f"{self._where}: internal error: {exc!r}",
                    )
                )
            if self._poll_asked:
                continue  # read() asked for a poll while this one ran
            read_at, self._read_waited_at = self._read_waited_at, None
            if read_at is not None:
                # a read() found nothing new and waited: the reads come at that phase;
                # poll a little more than a poll takes ahead of the next one, so that it
                # finds this poll's reading ready and waits for nothing
                lead = min(interval / 2, max(_LEAD_MIN_S, 2 * self._poll_took_s))
                next_at = read_at + interval - lead
            # the next tick (at once after a slow poll that overran the interval), or
            # read() asking for a poll now
            sleeper = self._sleeper = loop.create_future()
            timer = loop.call_at(next_at, _resolve, sleeper)
            try:
                await sleeper
            finally:
                timer.cancel()
                self._sleeper = None

    def _ask_for_poll(self) -> None:
        self._poll_asked = True
        sleeper = self._sleeper
        if sleeper is not None and not sleeper.done():
            sleeper.set_result(None)

    async def _next_publish(self, timeout_s: float) -> None:
        """Wait until the next poll is published, ``timeout_s`` at most."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(timeout_s, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if self._waiters and waiter in self._waiters:  # timed out, or cancelled
                self._waiters.remove(waiter)

    async def poll_once(self) -> None:
        """Poll the device once and keep the outcome for :meth:`read`."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        ts = self._wall_clock()
        self.polls += 1
        self._polling = True
        try:
            async with self._io:
                try:
                    await self._ensure_ready()
                    assert self._map is not None
                    values = await self._read_blocks(self._reads)
                except (_NotReady, ModbusFault, SunSpecScanError, ProfileError) as exc:
                    self._record_failure(started, ts, f"{self._where}: {exc}")
                    return
                point_map = self._map
        finally:
            self._polling = False
        values.update(self._static_values)
        fields, missing = point_map.telemetry(values)
        mw = fields.get("mw")
        if not isinstance(mw, int | float):
            self._record_failure(
                started,
                ts,
                f"{self._where}: the device reports no value for mw "
                f"(not implemented marker in {', '.join(missing) or 'mw'})",
            )
            return
        setpoint = fields.get("mw_setpoint")
        sample = TelemetrySample(
            asset_id=self.asset.asset_id,
            site_id=self.asset.site_id,
            ts=ts,
            mw=float(mw),
            mw_setpoint=float(setpoint) if isinstance(setpoint, int | float) else None,
            online=bool(fields.get("online", True)),
            status=_text(fields.get("status")),
            fault_code=_text(fields.get("fault_code")),
            quality="good",
            details=fields["details"],
        )
        if self._latest is not None and self._latest.sample is None:
            log.info("asset %s: %s recovered", self.asset.asset_id, self._where)
        self._publish(_Reading(started, ts, sample))

    def _publish(self, reading: _Reading) -> None:
        """Make ``reading`` the latest and wake whoever waits for one."""
        self._poll_took_s = asyncio.get_running_loop().time() - reading.started
        self._latest = reading
        self._generation += 1
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _record_failure(self, started: float, ts: datetime, reason: str) -> None:
        self.failed_polls += 1
        previous = self._latest.reason if self._latest is not None else None
        if reason != previous:
            log.warning("asset %s: %s", self.asset.asset_id, reason)
        self._publish(_Reading(started, ts, None, reason))

    def _bad(self, ts: datetime, reason: str) -> TelemetrySample:
        return TelemetrySample(
            asset_id=self.asset.asset_id,
            site_id=self.asset.site_id,
            ts=ts,
            mw=0.0,
            mw_setpoint=None,
            online=False,
            quality="bad",
            quality_reason=reason,
        )

    # ---------------------------------------------------------------- connection

    async def _ensure_ready(self, *, force: bool = False) -> None:
        """Connected, profile resolved, static points read; else raise why not.

        :param force: try now even while backing off (a setpoint is worth a try).
        """
        if self._link.connected and self._prepared:
            return
        if self._skip_polls > 0 and not force:
            self._skip_polls -= 1
            wait = (self._skip_polls + 1) * self.options.poll_interval_s
            raise _NotReady(f"{self._last_failure}; next connection attempt in {wait:.1f} s")
        try:
            if not self._link.connected:
                await self._link.connect()
            await self._prepare()
        except (ModbusFault, SunSpecScanError, ProfileError) as exc:
            self._link.close()
            self._prepared = False
            self._connect_failures += 1
            self._last_failure = str(exc)
            self._skip_polls = self._backoff_polls(self._connect_failures)
            raise
        self._connect_failures = 0
        self._skip_polls = 0

    def _backoff_polls(self, failures: int) -> int:
        """Polls to skip before the next connection attempt: doubling per failure up to
        ``reconnect_max_s``, with equal jitter. With the default (one poll interval) every
        poll tries, so a device that comes back is read within one poll."""
        interval = self.options.poll_interval_s
        limit = max(0, int((self.options.reconnect_max_s or interval) / interval) - 1)
        cap = min(limit, 2 ** min(failures - 1, 30) - 1)
        return self._rng.randint(cap // 2, cap) if cap > 0 else 0

    async def _prepare(self) -> None:
        """After each connect: scan SunSpec models (when asked) and read static points."""
        self._prepared = False
        if self.options.sunspec_scan:
            await self._resolve_sunspec()
        if self._static_reads:
            self._static_values = await self._read_blocks(self._static_reads)
        self._prepared = True

    async def _resolve_sunspec(self) -> None:
        _, models = await scan(self._read_holding)
        self.sunspec_models = models
        bases = model_bases(models)
        found = ", ".join(str(m.model_id) for m in models) or "none"
        if self._named is not None:
            missing = sunspec_models_of(self._named) - set(bases)
            if missing:
                log.info(
                    "asset %s: %s: SunSpec models %s of profile %s not on the device "
                    "(found %s); their points are left out",
                    self.asset.asset_id,
                    self._where,
                    ", ".join(map(str, sorted(missing))),
                    self._named.name,
                    found,
                )
            profiles = [self._named]
        else:
            profiles, without = choose_model_profiles(models, self._installed)
            if without:
                log.info(
                    "asset %s: %s: no installed profile for SunSpec model(s) %s; skipped",
                    self.asset.asset_id,
                    self._where,
                    ", ".join(map(str, without)),
                )
            if not profiles:
                raise ProfileError(
                    f"SunSpec scan found models {found}, none with an installed profile"
                )
        point_map = _point_map(profiles, bases, [self._label_of(p) for p in profiles])
        if not point_map.feeds_mw:
            raise ProfileError(
                f"SunSpec scan found models {found}; none of their profiles "
                f"({', '.join(point_map.profiles)}) has a point feeding mw"
            )
        self._map = point_map
        self._replan()
        log.debug(
            "asset %s: %s: SunSpec models %s; %d read(s) per poll",
            self.asset.asset_id,
            self._where,
            found,
            len(self._plan),
        )

    # ---------------------------------------------------------------- requests

    async def _read_holding(self, address: int, count: int) -> list[int] | list[bool]:
        return await self._request(lambda: self._link.read("holding", address, count))

    async def _request(self, call: Callable[[], Awaitable[T]], attempt: int = 0) -> T:
        """``call()``, retried ``retries`` times after a timeout, a lost connection or a
        busy device (reconnecting first when the connection broke); ``attempt``: attempts
        already made."""
        while True:
            try:
                return await call()
            except ModbusFault as fault:
                if not self._retry(fault, attempt):
                    raise
                attempt += 1
                if fault.breaks_connection:
                    await self._link.connect()

    def _retry(self, fault: ModbusFault, attempt: int) -> bool:
        """Whether a request that failed with ``fault`` on attempt ``attempt`` (from 0) is
        tried again."""
        retry = fault.kind in ("timeout", "disconnected", "protocol") or (
            fault.kind == "exception" and fault.code in _RETRY_EXCEPTION_CODES
        )
        return retry and attempt < self.options.retries

    async def _read_blocks(self, reads: Sequence[_Read]) -> dict[Point, Value]:
        values: dict[Point, Value] = {}
        link = self._link
        for block, decoders in reads:
            try:
                try:  # the first attempt directly; retries through _request
                    data = await link.read(block.table, block.start, block.count)
                except ModbusFault as fault:
                    if not self._retry(fault, 0):
                        raise
                    if fault.breaks_connection:
                        await link.connect()
                    data = await self._request(
                        lambda block=block: link.read(block.table, block.start, block.count),  # type: ignore[misc]
                        attempt=1,
                    )
            except ModbusFault as fault:
                if fault.code == 0x02 and block.has_gaps and self._gap_tolerance > 0:
                    self._gap_tolerance = 0
                    self._replan()
                    log.warning(
                        "asset %s: %s refuses reads across unmapped registers; reading "
                        "only mapped registers from now on (gap_tolerance 0)",
                        self.asset.asset_id,
                        self._where,
                    )
                raise
            for point, offset, decode in decoders:
                values[point] = bool(data[offset]) if decode is None else decode(data, offset)
        return values

    async def _read_scale_factor(self, point: Point) -> int | None:
        scale = point.scale_point
        if scale is None or scale.codec is None:
            return None
        data = await self._request(lambda: self._link.read(scale.table, scale.address, scale.count))
        value = scale.codec.decode([int(v) for v in data])
        if not isinstance(value, int):
            raise ValueError(f"its scale factor {scale.label()} has no value")
        return value

    async def _write_value(self, point: Point, value: int) -> None:
        if point.codec is None:
            await self._request(
                lambda: self._link.write_coil(point.address, bool(value), point.write_function)
            )
            return
        registers = point.codec.encode(value)
        await self._request(
            lambda: self._link.write_registers(point.address, registers, point.write_function)
        )


_Decoder = Callable[[Sequence[int], int], Value]
_Read = tuple[ReadBlock, tuple[tuple[Point, int, _Decoder | None], ...]]
"""One request of a poll and how each point's value comes out of its answer."""


def _reads(plan: Sequence[ReadBlock]) -> list[_Read]:
    return [
        (
            block,
            tuple(
                (p, p.address - block.start, p.codec.reader() if p.codec is not None else None)
                for p in block.points
            ),
        )
        for block in plan
    ]


_COMPILED: dict[tuple[Any, ...], tuple[tuple[DeviceProfile, ...], PointMap]] = {}
_COMPILED_MAX = 256


def _point_map(
    profiles: Sequence[DeviceProfile],
    bases: Mapping[int, tuple[int, int]] | None,
    labels: Sequence[str],
) -> PointMap:
    """The point map of ``profiles`` (merged, the first winning each field) at the SunSpec
    ``bases`` a scan found, compiled once per process for each such pair: an agent with
    thousands of devices of one kind compiles their profiles once, not at every device's
    connection (at 1,000 devices connecting together, compiling each took the event loop
    long enough for their first requests to time out and be retried, over and over). A
    point map is never changed once built, so adapters share it."""
    key = (
        tuple(id(p) for p in profiles),
        None if bases is None else tuple(sorted(bases.items())),
        tuple(labels),
    )
    held = _COMPILED.get(key)
    if held is not None and all(a is b for a, b in zip(held[0], profiles, strict=True)):
        return held[1]
    point_map = PointMap.build(merge_points(compile_profile(p, bases) for p in profiles), labels)
    if len(_COMPILED) >= _COMPILED_MAX:
        _COMPILED.clear()
    _COMPILED[key] = (tuple(profiles), point_map)
    return point_map


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
