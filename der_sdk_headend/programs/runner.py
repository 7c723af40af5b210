"""The headend's program runner: builds the program sources configured under
``programs:`` in the inventory and keeps them running (docs/programs.md).

For each program it

* validates the options into the source's options Struct and builds the source with a
  :class:`~der_sdk_headend.programs.context.HeadendProgramContext`;
* runs ``run()`` as a supervised task: one that raises (or returns before the headend
  stops) is logged with the program, the source and the plugin's package, and started
  again after a backoff (1 s growing to 60 s; reset after a run that lasted a minute);
* passes each change of a dispatch the program made to ``dispatch_changed``, in order, on
  a task of its own;
* keeps the program's health as the source reports it: a source that lost its server
  makes ``/healthz`` degraded naming the program and raises ``program_comms_loss`` for
  the program's assets, cleared when it reports its server back (an asset is cleared once
  no program controlling it is down);
* closes the sources when the headend stops, before the agents' streams end.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from der_sdk.backoff import Backoff
from der_sdk.errors import DerSdkError
from der_sdk.inventory import Inventory, ProgramConfig
from der_sdk.models import Asset, Dispatch, TelemetrySample, utc_now
from der_sdk.plugins import Plugins
from der_sdk.programs import PROGRAM_COMMS_LOSS, ProgramSource, program_source_name
from der_sdk.storage.contract import StorageBackend
from der_sdk.tasks import cancel_and_wait
from der_sdk_headend.alarms import AlarmBook, Condition
from der_sdk_headend.audit import Auditor
from der_sdk_headend.dispatch import Dispatcher
from der_sdk_headend.programs.context import HeadendProgramContext

__all__ = ["RESTART_INITIAL_S", "RESTART_MAX_S", "ProgramHealth", "ProgramRunner"]

log = logging.getLogger("der.headend.programs")

RESTART_INITIAL_S = 1.0
"""The wait before a failed program source is started again; it grows to
:data:`RESTART_MAX_S`."""
RESTART_MAX_S = 60.0
STABLE_RUN_S = 60.0
"""A run that lasted this long before it failed starts the backoff again from the first
delay."""
CLOSE_TIMEOUT_S = 5.0
"""How long a program source's ``close()`` and ``run()`` get to finish at shutdown."""


class ProgramHealth(msgspec.Struct, kw_only=True):
    """One program as ``/healthz`` shows it.

    ``connected``: whether its source reaches its upstream server (``None``: not reported
    yet); ``detail`` what the source said last; ``since`` when ``connected`` last changed;
    ``restarts`` how often its ``run()`` failed and was started again.
    """

    name: str
    source: str
    connected: bool | None = None
    detail: str = "starting"
    since: datetime | None = None
    restarts: int = 0


@dataclass(eq=False)
class _Program:
    config: ProgramConfig
    package: str
    assets: tuple[Asset, ...]
    source: ProgramSource
    health: ProgramHealth
    changes: asyncio.Queue[Dispatch] = field(default_factory=asyncio.Queue)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class ProgramRunner:
    """Runs the configured programs of one headend (module docstring)."""

    def __init__(
        self,
        inventory: Inventory,
        plugins: Plugins,
        *,
        dispatcher: Dispatcher,
        storage: StorageBackend,
        auditor: Auditor,
        alarms: AlarmBook,
        latest: Callable[[str], TelemetrySample | None],
        restart: Backoff | None = None,
    ) -> None:
        self._inventory = inventory
        self._plugins = plugins
        self._dispatcher = dispatcher
        self._storage = storage
        self._auditor = auditor
        self._alarms = alarms
        self._latest = latest
        self._restart = restart or Backoff(RESTART_INITIAL_S, RESTART_MAX_S)
        self._programs: dict[str, _Program] = {}
        self._alarm_queue: asyncio.Queue[tuple[Asset, bool, str]] = asyncio.Queue()
        self._alarm_task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = asyncio.Event()  # ends a restart's backoff at shutdown

    # ------------------------------------------------------------------ start

    def build(self) -> None:
        """Build every configured program's source (no I/O).

        :raises DerSdkError: an unknown source, options that do not convert, or a factory
            that failed; the message names the program, the line and the plugin.
        """
        where = self._inventory.path
        for config in self._inventory.programs:
            at = f"{where}:{config.line}" if config.line else where
            try:
                kind = self._plugins.program_sources.get(config.source)
            except DerSdkError as exc:
                raise DerSdkError(f"{at}: program {config.name!r}: {exc}") from None
            package = self._plugins.program_sources.provider(config.source)
            try:
                options = (
                    msgspec.convert(dict(config.options), kind.options)
                    if kind.options is not None
                    else None
                )
            except msgspec.ValidationError as exc:
                raise DerSdkError(
                    f"{at}: program {config.name!r}: invalid options for program source "
                    f"{config.source!r}: {exc}"
                ) from None
            sites, assets = self._inventory.program_scope(config)
            health = ProgramHealth(name=config.name, source=config.source)
            context = HeadendProgramContext(
                config,
                sites=sites,
                assets=assets,
                dispatcher=self._dispatcher,
                storage=self._storage,
                auditor=self._auditor,
                latest=self._latest,
                health=functools.partial(self._report, config.name),
            )
            try:
                source = kind.factory(context, options)
            except Exception as exc:
                raise DerSdkError(
                    f"{at}: program {config.name!r}: program source {config.source!r} "
                    f"({package}) could not be built: {type(exc).__name__}: {exc}"
                ) from exc
            self._programs[config.name] = _Program(
                config=config,
                package=package,
                assets=tuple(assets),
                source=source,
                health=health,
            )
        if self._programs:
            self._dispatcher.record_listeners.append(self._on_record)

    def start(self) -> None:
        """Start every built program's tasks: its run, its lifecycle reports."""
        if self._programs and self._alarm_task is None:
            self._alarm_task = asyncio.create_task(self._alarm_loop(), name="programs-alarms")
        for program in self._programs.values():
            name = program.config.name
            program.tasks = [
                asyncio.create_task(self._supervise(program), name=f"program-{name}"),
                asyncio.create_task(self._report_changes(program), name=f"program-{name}-changes"),
            ]
            log.info(
                "program %s started: source %s (%s), %d asset(s)",
                name,
                program.config.source,
                program.package,
                len(program.assets),
            )

    # ------------------------------------------------------------------ status

    def health(self) -> list[ProgramHealth]:
        """Every program's health, in configuration order (copies)."""
        return [copy.copy(p.health) for p in self._programs.values()]

    def health_reason(self) -> str | None:
        """Why ``/healthz`` is degraded because of programs, or ``None``."""
        down = [p.health for p in self._programs.values() if p.health.connected is False]
        if not down:
            return None
        return "; ".join(
            f"program {h.name} ({h.source}) has lost its server: {h.detail}; it keeps "
            "running the schedule it has"
            for h in down
        )

    def _report(self, name: str, ok: bool, detail: str) -> None:
        program = self._programs.get(name)
        if program is None or self._closing:
            return
        health = program.health
        changed = health.connected is not ok
        health.detail = detail
        if not changed:
            return
        health.connected = ok
        health.since = utc_now()
        if ok:
            log.info("program %s: its server is reachable: %s", name, detail)
        else:
            log.warning(
                "program %s: lost its server: %s; the schedule it has keeps running", name, detail
            )
        # The first "ok" clears too: an alarm a previous run left active (a clear with
        # nothing active changes nothing).
        for asset in program.assets:
            self._alarm_queue.put_nowait((asset, not ok, f"program {name}: {detail}"))

    async def _alarm_loop(self) -> None:
        while True:
            asset, active, text = await self._alarm_queue.get()
            if not active and any(
                p.health.connected is False and asset in p.assets for p in self._programs.values()
            ):
                continue  # another program controlling the asset is still down
            condition = Condition(
                asset_id=asset.asset_id,
                site_id=asset.site_id,
                code=PROGRAM_COMMS_LOSS,
                active=active,
                at=utc_now(),
                severity="major",
                text=text,
            )
            try:
                await self._alarms.apply(condition)
            except Exception as exc:
                log.error(
                    "%s alarm of asset %s not stored: %s: %s",
                    PROGRAM_COMMS_LOSS,
                    asset.asset_id,
                    type(exc).__name__,
                    exc,
                )

    # ------------------------------------------------------------------ tasks

    async def _supervise(self, program: _Program) -> None:
        name = program.config.name
        attempt = 0
        while not self._closing:
            started = time.monotonic()
            failure: str
            try:
                await program.source.run()
                if self._closing:
                    return
                failure = "run() returned before the headend stopped"
                log.warning(
                    "program %s: source %s (%s): %s",
                    name,
                    program.config.source,
                    program.package,
                    failure,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failure = f"run() raised {type(exc).__name__}: {exc}"
                log.exception(
                    "program %s: source %s (%s): run() raised",
                    name,
                    program.config.source,
                    program.package,
                )
            if time.monotonic() - started >= STABLE_RUN_S:
                attempt = 0
            attempt += 1
            delay = self._restart.delay(attempt)
            program.health.restarts += 1
            self._report(name, False, f"{failure}; started again in {delay:.1f} s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._closed.wait()

    async def _report_changes(self, program: _Program) -> None:
        while True:
            dispatch = await program.changes.get()
            try:
                await program.source.dispatch_changed(dispatch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "program %s: source %s (%s): dispatch_changed(%s) raised; the next "
                    "change is still reported",
                    program.config.name,
                    program.config.source,
                    program.package,
                    dispatch.dispatch_id,
                )

    def _on_record(self, dispatch: Dispatch) -> None:
        for program in self._programs.values():
            if dispatch.source == program_source_name(program.config.name):
                program.changes.put_nowait(copy.deepcopy(dispatch))
                return

    # ------------------------------------------------------------------ stop

    async def close(self) -> None:
        """Close every source and end its tasks; safe to call more than once."""
        if self._closing:
            return
        self._closing = True
        self._closed.set()
        with contextlib.suppress(ValueError):
            self._dispatcher.record_listeners.remove(self._on_record)
        for program in self._programs.values():
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await program.source.close()
            except Exception:
                log.exception(
                    "program %s: source %s (%s): close() failed",
                    program.config.name,
                    program.config.source,
                    program.package,
                )
        runs = [p.tasks[0] for p in self._programs.values() if p.tasks]
        if runs:  # run() returns once closed; give it the time, then cancel what is left
            await asyncio.wait(runs, timeout=CLOSE_TIMEOUT_S)
        tasks = [t for p in self._programs.values() for t in p.tasks]
        if self._alarm_task is not None:
            tasks.append(self._alarm_task)
        await cancel_and_wait(tasks)
