"""The edge agent: adapters, edge services, the sampler, the stores and the headend link.

:class:`Agent` is assembled from already-loaded parts (tests, the launcher) or from
environment settings (:meth:`Agent.from_settings`). Its tasks:

* the **sampler** reads every adapter concurrently every ``telemetry_interval_s``, whether
  or not the headend is reachable, numbers each sample per asset (``seq`` increases by one
  per reading of that asset), hands the batch to every edge service and commits it to the
  durable telemetry queue;
* the **link** (:mod:`der_sdk_agent.link`) sends the queue, the outbox and the journal's
  outcomes to the headend and feeds setpoints into the dispatch path
  (:mod:`der_sdk_agent.dispatch`);
* the **upkeep** drops telemetry past the queue's age bound, prunes the dispatch journal
  and, while the queue holds a backlog, logs its figures once a minute;
* the **condition recorder** commits the conditions adapters raise and clear (each
  adapter's :class:`~der_sdk.conditions.ConditionQueue`) to the outbox as events of kind
  ``condition_raised`` / ``condition_cleared``, which the link sends like any other event.

The three stores (:mod:`der_sdk_agent.store`: the telemetry queue, the command journal
and the outbox) share one buffer file. Where it lives: the ``buffer_path`` argument, else
the agent config's
``buffer.path``, else in memory (not durable). The CLI (:meth:`Agent.from_settings`) puts
it at ``AGENT_BUFFER_PATH``, else ``buffer.path``, else :data:`DEFAULT_BUFFER_PATH`.
``{agent_id}`` in a path is replaced by the agent id.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

import der_sdk
from der_sdk.agent_config import (
    AgentConfig,
    EdgeServiceConfig,
    load_agent_config,
    validate_agent_config,
)
from der_sdk.errors import DerSdkError, UnknownNameError
from der_sdk.extensions import EdgeService, EdgeServiceContext, EdgeServiceType
from der_sdk.inventory import load_inventory
from der_sdk.models import Asset, TelemetrySample
from der_sdk.plugins import Plugins, load_plugins
from der_sdk.tasks import cancel_and_wait
from der_sdk_agent.adapters import (
    AdapterRuntime,
    adapter_names,
    build_adapters,
    convert_options,
    read_all,
)
from der_sdk_agent.dispatch import Dispatcher, DispatchOutcome
from der_sdk_agent.link import Backoff, HeadendLink
from der_sdk_agent.schedule import ScheduleRunner
from der_sdk_agent.settings import AgentSettings, resolve_served_assets
from der_sdk_agent.store import MEMORY, BufferFile, CommandJournal, Outbox, TelemetryQueue
from der_sdk_agent.tls import LinkSecurity

__all__ = ["DEFAULT_BUFFER_PATH", "Agent", "AgentStats", "buffer_path_for"]

log = logging.getLogger("der.agent")

SERVICE_STOP_TIMEOUT_S = 10.0
UPKEEP_EVERY_S = 60.0
"""The upkeep's period: age bound, journal pruning, the backlog status line."""
DEFAULT_BUFFER_PATH = "der-data/agent-{agent_id}.sqlite3"
"""The CLI's buffer file, relative to the working directory."""


def buffer_path_for(template: str, agent_id: str) -> str:
    """``template`` with ``{agent_id}`` replaced by ``agent_id`` made safe for a file name."""
    return template.replace("{agent_id}", re.sub(r"[^A-Za-z0-9._-]", "_", agent_id))


@dataclass(frozen=True, kw_only=True)
class AgentStats:
    """A snapshot of the agent's counters.

    ``headend`` is the address the agent is registered with (``None`` while
    disconnected); ``reconnects`` counts registrations after the first; ``last_ack_seq``
    is the highest telemetry batch ``seq`` the headend acknowledged on the current
    stream. The ``buffer_*`` figures are what the buffer holds (sent or not, not yet
    acknowledged); ``samples_dropped`` and ``batches_dropped`` count what its bounds
    dropped since the buffer file was created; ``replay_batches`` is the backlog the
    current stream is still to send. ``unacked_*`` and ``unreported_outcomes`` wait for
    the headend's acknowledgement. ``clock_offset_s`` is the agent's clock offset from
    the headend's (headend minus agent), ``None`` until measured; ``schedules`` counts the
    schedules not finished.
    """

    connected: bool
    headend: str | None
    reconnects: int
    failed_attempts: int
    batches_sent: int
    last_ack_seq: int
    stream_id: str
    buffer_batches: int
    buffer_samples: int
    buffer_bytes: int
    buffer_oldest_age_s: float
    samples_dropped: int
    batches_dropped: int
    replay_batches: int
    unacked_events: int
    unacked_local_dispatches: int
    unreported_outcomes: int
    clock_offset_s: float | None = None
    schedules: int = 0


@dataclass(frozen=True)
class _ServicePlan:
    name: str
    package: str
    service_type: EdgeServiceType
    options: Any


class Agent:
    """One edge agent: serves ``assets`` of ``site_id`` over one stream to ``headend``
    (one address, or several: a sequence or a comma-separated list; the link moves to the
    next when one fails, see :mod:`der_sdk_agent.headends`).

    Construction builds the adapters and validates edge service options (a bad config
    fails here, naming the asset or service); nothing connects until :meth:`start`.

    :param buffer_path: the buffer file (``{agent_id}`` is replaced); default: the config's
        ``buffer.path``, else in memory. The file is opened by :meth:`start` (or the first
        :meth:`sample_once` or local command), not here.
    :param clock: the agent's wall clock (tests pass one that is off); schedules run by
        it, and its offset from the headend's is measured and reported.
    :param security: TLS, client certificate and token for the link
        (:class:`~der_sdk_agent.tls.LinkSecurity`); default: plaintext, no token.
    """

    def __init__(
        self,
        *,
        agent_id: str,
        site_id: str,
        assets: Sequence[Asset],
        headend: str | Sequence[str],
        config: AgentConfig,
        plugins: Plugins,
        buffer_path: str | None = None,
        rng: random.Random | None = None,
        security: LinkSecurity | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not assets:
            raise DerSdkError(f"agent {agent_id}: no assets to serve")
        strangers = sorted(a.asset_id for a in assets if a.site_id != site_id)
        if strangers:
            raise DerSdkError(
                f"agent {agent_id} serves site {site_id}, but assets {', '.join(strangers)} "
                f"belong to another site; one agent serves one site"
            )
        self.agent_id = agent_id
        self.site_id = site_id
        self.assets: tuple[Asset, ...] = tuple(sorted(assets, key=lambda a: a.asset_id))
        self.config = config
        self.plugins = plugins

        self._conditions_queued = asyncio.Event()
        self._conditions_lock = asyncio.Lock()
        self.adapters: dict[str, AdapterRuntime] = build_adapters(
            self.assets,
            config,
            plugins,
            timeout_s=config.telemetry_interval_s,
            on_condition=self._conditions_queued.set,
        )
        try:
            policy = plugins.split_policies.get(config.split_policy)
        except UnknownNameError as exc:
            raise DerSdkError(f"agent config split_policy: {exc}") from None
        template = buffer_path if buffer_path is not None else config.buffer.path
        self.buffer = BufferFile(
            buffer_path_for(template, agent_id) if template is not None else MEMORY,
            sync=config.buffer.sync,
        )
        self.outbox = Outbox(self.buffer)
        self.journal = CommandJournal(self.buffer)
        self.telemetry = TelemetryQueue(
            self.buffer,
            self.outbox,
            max_bytes=config.buffer.max_bytes,
            max_age_s=config.buffer.max_age_s,
        )
        self.dispatcher = Dispatcher(
            agent_id=agent_id,
            site_id=site_id,
            runtimes=self.adapters,
            policy=policy,
            journal=self.journal,
            outbox=self.outbox,
            controls={t.name: t.control for t in plugins.asset_types},
        )
        self.link = HeadendLink(
            headend=headend,
            agent_id=agent_id,
            site_id=site_id,
            adapters=adapter_names(self.adapters),
            sdk_version=der_sdk.__version__,
            plugin_versions=plugins.versions(),
            telemetry=self.telemetry,
            journal=self.journal,
            outbox=self.outbox,
            dispatcher=self.dispatcher,
            heartbeat_interval_s=config.heartbeat_interval_s,
            backoff=Backoff(
                config.reconnect_initial_s, config.reconnect_max_s, rng or random.Random()
            ),
            replay_samples_per_s=config.buffer.replay_samples_per_s,
            link_loss_hold_s=config.link_loss_hold_s,
            link_loss_fallback=config.link_loss_fallback,
            security=security,
            clock=clock,
        )
        self.dispatcher.schedules = ScheduleRunner(
            self.dispatcher,
            self.journal,
            clock=clock,
            clock_offset=lambda: self.link.clock_offset_s,
            clock_offset_max_s=config.clock_offset_max_s,
        )
        self.headends = self.link.headends
        self.headend = ",".join(self.headends)
        self._service_plans = [self._plan_service(entry) for entry in config.edge_services]
        self.services: list[tuple[str, EdgeService]] = []
        self._sample_seq: dict[str, int] = {a.asset_id: 0 for a in self.assets}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopper: asyncio.Task[None] | None = None
        self._started = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self._service_errors_logged: set[str] = set()
        self._buffer_error_logged_at = -UPKEEP_EVERY_S

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_settings(cls, settings: AgentSettings, plugins: Plugins | None = None) -> Agent:
        """Load the inventory, the agent config and (unless given) the plugins.

        Reads files with blocking I/O: call it at start-up.

        :raises DerSdkError: a file is invalid, or an id, adapter, option, policy or
            service is unknown; the message says which and where.
        """
        plugins = plugins if plugins is not None else load_plugins()
        inventory = load_inventory(settings.assets_path, asset_types=plugins.asset_types.names())
        config = load_agent_config(settings.agent_config_path)
        served = resolve_served_assets(settings, inventory, config_agent_id=config.agent_id)
        validate_agent_config(config, plugins, inventory, [a.asset_id for a in served.assets])
        overrides: dict[str, float] = {}
        if settings.telemetry_interval_s is not None:
            overrides["telemetry_interval_s"] = settings.telemetry_interval_s
        if settings.heartbeat_interval_s is not None:
            overrides["heartbeat_interval_s"] = settings.heartbeat_interval_s
        if settings.clock_offset_max_s is not None:
            overrides["clock_offset_max_s"] = settings.clock_offset_max_s
        if overrides:  # after validation: a replaced config forgets its file lines
            config = msgspec.structs.replace(config, **overrides)
        return cls(
            agent_id=served.agent_id,
            site_id=served.site_id,
            assets=served.assets,
            headend=settings.headend,
            config=config,
            plugins=plugins,
            buffer_path=settings.buffer_path or config.buffer.path or DEFAULT_BUFFER_PATH,
            security=LinkSecurity.from_settings(settings, config),
        )

    def _plan_service(self, entry: EdgeServiceConfig) -> _ServicePlan:
        try:
            service_type = self.plugins.edge_services.get(entry.name)
        except UnknownNameError as exc:
            raise DerSdkError(
                f"agent config edge_services: {exc}; install the plugin that provides it"
            ) from None
        package = self.plugins.edge_services.provider(entry.name)
        options = convert_options(
            entry.options, service_type.options, what=f"edge service {entry.name!r} ({package})"
        )
        return _ServicePlan(entry.name, package, service_type, options)

    # ------------------------------------------------------------------ lifecycle

    def stats(self) -> AgentStats:
        """A snapshot of the counters."""
        link = self.link.stats
        buffer = self.telemetry.stats(link.replay_from_seq)
        return AgentStats(
            connected=link.connected,
            headend=link.headend,
            reconnects=link.reconnects,
            failed_attempts=link.failed_attempts,
            batches_sent=link.batches_sent,
            last_ack_seq=link.last_ack_seq,
            stream_id=self.telemetry.stream_id,
            buffer_batches=buffer.batches,
            buffer_samples=buffer.samples,
            buffer_bytes=buffer.bytes,
            buffer_oldest_age_s=buffer.oldest_age_s,
            samples_dropped=buffer.dropped_samples,
            batches_dropped=buffer.dropped_batches,
            replay_batches=buffer.replay_batches,
            unacked_events=self.outbox.events.count,
            unacked_local_dispatches=self.link.unacked_local_dispatches,
            unreported_outcomes=self.journal.unreported_count,
            clock_offset_s=self.link.clock_offset_s,
            schedules=len(self.journal.schedules),
        )

    async def start(self) -> None:
        """Open the buffer, connect the adapters, start the edge services, then the
        sampler and the link.

        A buffer that cannot be opened (locked by another agent, not a buffer file) stops
        the start with :class:`DerSdkError` naming the file. An adapter that fails to
        connect is retried on the next poll and does not stop the start. A service that
        fails to start does: everything started is stopped again and
        :class:`DerSdkError` names the service and its package.
        """
        if self._started or self._stopping:
            raise DerSdkError(f"agent {self.agent_id} was already started; build a new one")
        self._started = True
        try:
            await self.buffer.open()
        except BaseException:
            await self.stop()
            raise
        if not self.buffer.durable:
            log.info(
                "agent %s: telemetry buffer in memory: not durable; set buffer.path in the "
                "agent config to keep it across restarts",
                self.agent_id,
            )
        log.info(
            "agent %s starting: site %s, %d asset(s) (%s), headend %s over %s",
            self.agent_id,
            self.site_id,
            len(self.assets),
            ", ".join(f"{a}={n}" for a, n in adapter_names(self.adapters).items()),
            self.headend,
            self.link.security.describe(),
        )
        for headend in self.headends:
            self.link.security.warn_if_exposed(headend)
        await asyncio.gather(*(rt.connect() for rt in self.adapters.values()))
        try:
            await self._start_services()
        except BaseException:
            await self.stop()
            raise
        self._tasks = [
            asyncio.create_task(self._sampler(), name=f"der-agent-sampler-{self.agent_id}"),
            asyncio.create_task(self.link.run(), name=f"der-agent-link-{self.agent_id}"),
            asyncio.create_task(self._upkeep(), name=f"der-agent-upkeep-{self.agent_id}"),
            asyncio.create_task(
                self._condition_recorder(), name=f"der-agent-conditions-{self.agent_id}"
            ),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_done)

    async def _start_services(self) -> None:
        for plan in self._service_plans:
            context = EdgeServiceContext(
                agent_id=self.agent_id,
                site_id=self.site_id,
                assets=self.assets,
                options=plan.options,
                dispatch=self.dispatcher.local_dispatch,
            )
            try:
                service = plan.service_type.factory(context)
                await service.start()
            except Exception as exc:
                raise DerSdkError(
                    f"agent {self.agent_id}: edge service {plan.name!r} ({plan.package}) "
                    f"failed to start: {type(exc).__name__}: {exc}"
                ) from exc
            self.services.append((plan.name, service))
            log.info(
                "agent %s: edge service %r (%s) started", self.agent_id, plan.name, plan.package
            )

    async def stop(self) -> None:
        """Stop everything: tasks, the stream, services, adapters. Safe to call twice."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            await cancel_and_wait(self._tasks)
            await self.dispatcher.close()
            for name, service in reversed(self.services):
                try:
                    async with asyncio.timeout(SERVICE_STOP_TIMEOUT_S):
                        await service.stop()
                except Exception:
                    log.exception("agent %s: edge service %r failed to stop", self.agent_id, name)
            self.services.clear()
            await asyncio.gather(*(rt.close() for rt in self.adapters.values()))
            if self.buffer.accepting:
                await self.record_conditions()  # what was raised since the last poll
            await self.buffer.close()
        finally:
            self._stopped.set()
            log.info("agent %s stopped", self.agent_id)

    async def run(self) -> None:
        """Start, then wait until :meth:`stop` is called (or the agent fails)."""
        await self.start()
        await self._stopped.wait()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def wait_connected(self) -> None:
        """Return once registered with the headend (wrap in ``asyncio.timeout``)."""
        await self.link.wait_connected()

    async def dispatch(
        self,
        *,
        asset_id: str | None = None,
        site_id: str | None = None,
        mw: float,
        duration_s: float | None = None,
    ) -> DispatchOutcome:
        """A local command through the agent's dispatch path (as edge services send)."""
        return await self.dispatcher.local_dispatch(asset_id, site_id, mw, duration_s)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        log.critical(
            "agent %s: task %s ended unexpectedly%s; stopping the agent",
            self.agent_id,
            task.get_name(),
            f": {type(exc).__name__}: {exc}" if exc else "",
            exc_info=exc,
        )
        self._stopper = asyncio.get_running_loop().create_task(self.stop())

    # ------------------------------------------------------------------ sampler

    async def _sampler(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.telemetry_interval_s
        next_at = loop.time()
        while True:
            await self.sample_once()
            next_at += interval
            now = loop.time()
            if next_at < now:  # a slow poll: skip the missed ticks rather than burst
                next_at = now
            await asyncio.sleep(next_at - now)

    async def sample_once(self) -> list[TelemetrySample]:
        """Read every adapter once, number the samples, share them and commit them to the
        buffer (opened on first use)."""
        readings = await read_all(list(self.adapters.values()))
        samples: list[TelemetrySample] = []
        for sample in readings:
            seq = self._sample_seq[sample.asset_id] + 1
            self._sample_seq[sample.asset_id] = seq
            samples.append(msgspec.structs.replace(sample, seq=seq))
        for name, service in self.services:
            try:
                service.on_telemetry(samples)
            except Exception:
                level = logging.DEBUG if name in self._service_errors_logged else logging.ERROR
                self._service_errors_logged.add(name)
                log.log(
                    level,
                    "agent %s: edge service %r failed in on_telemetry",
                    self.agent_id,
                    name,
                    exc_info=True,
                )
        try:
            await self.telemetry.append(samples)
            await self.record_conditions()  # those the reads raised, recorded right away
        except Exception:
            now = time.monotonic()
            if now - self._buffer_error_logged_at >= UPKEEP_EVERY_S:
                self._buffer_error_logged_at = now
                log.exception(
                    "agent %s: telemetry buffer %s failed; this poll's samples are lost",
                    self.agent_id,
                    self.buffer.path,
                )
        return samples

    # ------------------------------------------------------------------ conditions

    async def _condition_recorder(self) -> None:
        while True:
            await self._conditions_queued.wait()
            await self.record_conditions()

    async def record_conditions(self) -> int:
        """Commit every condition change the adapters queued to the outbox, oldest first
        per asset; the number committed. A change that cannot be committed (the buffer
        failed) is logged and lost, like a poll's samples."""
        if not self._conditions_queued.is_set():  # every queued change sets it
            return 0
        async with self._conditions_lock:
            self._conditions_queued.clear()
            recorded = 0
            for asset_id, runtime in self.adapters.items():
                changes = runtime.conditions.drain()
                for index, change in enumerate(changes):
                    try:
                        await self.outbox.add_event(
                            change.kind,
                            change.message,
                            asset_id=asset_id,
                            data={"code": change.code, "severity": change.severity},
                            ts=change.ts,
                        )
                    except asyncio.CancelledError:
                        # Stopping: what is not committed yet is recorded by stop().
                        runtime.conditions.restore(changes[index:])
                        raise
                    except Exception:
                        log.exception(
                            "agent %s: asset %s: recording %s %s failed",
                            self.agent_id,
                            asset_id,
                            change.kind,
                            change.code,
                        )
                        continue
                    recorded += 1
                    log.info(
                        "asset %s: %s %s (%s): %s",
                        asset_id,
                        change.kind,
                        change.code,
                        change.severity,
                        change.message,
                    )
            return recorded

    # ------------------------------------------------------------------ upkeep

    async def _upkeep(self) -> None:
        while True:
            await asyncio.sleep(UPKEEP_EVERY_S)
            try:
                await self.telemetry.maintain()
                await self.journal.maintain()
            except Exception:
                log.exception("agent %s: telemetry buffer upkeep failed", self.agent_id)
            self._log_backlog()

    def _log_backlog(self) -> None:
        stats = self.telemetry.stats(self.link.stats.replay_from_seq)
        if stats.oldest_age_s <= 2 * self.config.telemetry_interval_s:
            return
        log.info(
            "agent %s: telemetry buffer holds %d batch(es), %d sample(s), %.1f MiB; oldest "
            "%.0f s old; %d to replay; %d sample(s) in %d batch(es) dropped since the buffer "
            "was created; headend %s",
            self.agent_id,
            stats.batches,
            stats.samples,
            stats.bytes / (1024 * 1024),
            stats.oldest_age_s,
            stats.replay_batches,
            stats.dropped_samples,
            stats.dropped_batches,
            "connected" if self.link.stats.connected else "unreachable",
        )
