"""The edge agent: adapters, edge services, the sampler, the outbox and the headend link.

:class:`Agent` is assembled from already-loaded parts (tests, the launcher) or from
environment settings (:meth:`Agent.from_settings`). Its tasks:

* the **sampler** reads every adapter concurrently every ``telemetry_interval_s``, whether
  or not the headend is reachable, numbers each sample per asset (``seq`` increases by one
  per reading of that asset), hands the batch to every edge service and queues it in the
  bounded outbox;
* the **link** (:mod:`der_sdk_agent.link`) drains the outbox to the headend and feeds
  setpoints into the dispatch path (:mod:`der_sdk_agent.dispatch`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
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
from der_sdk_agent.adapters import AdapterRuntime, adapter_names, build_adapters, convert_options
from der_sdk_agent.dispatch import Dispatcher, DispatchOutcome
from der_sdk_agent.link import Backoff, HeadendLink
from der_sdk_agent.outbox import DEFAULT_OUTBOX_MAX_SAMPLES, Outbox
from der_sdk_agent.settings import AgentSettings, resolve_served_assets

__all__ = ["Agent", "AgentStats"]

log = logging.getLogger("der.agent")

SERVICE_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True, kw_only=True)
class AgentStats:
    """A snapshot of the agent's counters.

    ``reconnects`` counts registrations after the first; ``last_ack_seq`` is the highest
    telemetry batch ``seq`` the headend acknowledged on the current stream.
    """

    connected: bool
    reconnects: int
    failed_attempts: int
    batches_sent: int
    samples_dropped: int
    last_ack_seq: int
    outbox_samples: int


@dataclass(frozen=True)
class _ServicePlan:
    name: str
    package: str
    service_type: EdgeServiceType
    options: Any


class Agent:
    """One edge agent: serves ``assets`` of ``site_id`` over one stream to ``headend``.

    Construction builds the adapters and validates edge service options (a bad config
    fails here, naming the asset or service); nothing connects until :meth:`start`.
    """

    def __init__(
        self,
        *,
        agent_id: str,
        site_id: str,
        assets: Sequence[Asset],
        headend: str,
        config: AgentConfig,
        plugins: Plugins,
        outbox_max_samples: int = DEFAULT_OUTBOX_MAX_SAMPLES,
        rng: random.Random | None = None,
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
        self.headend = headend
        self.config = config
        self.plugins = plugins

        self.adapters: dict[str, AdapterRuntime] = build_adapters(
            self.assets, config, plugins, timeout_s=config.telemetry_interval_s
        )
        try:
            policy = plugins.split_policies.get(config.split_policy)
        except UnknownNameError as exc:
            raise DerSdkError(f"agent config split_policy: {exc}") from None
        self.dispatcher = Dispatcher(
            agent_id=agent_id, site_id=site_id, runtimes=self.adapters, policy=policy
        )
        self.outbox = Outbox(outbox_max_samples)
        self.link = HeadendLink(
            headend=headend,
            agent_id=agent_id,
            site_id=site_id,
            adapters=adapter_names(self.adapters),
            sdk_version=der_sdk.__version__,
            plugin_versions=plugins.versions(),
            outbox=self.outbox,
            dispatcher=self.dispatcher,
            heartbeat_interval_s=config.heartbeat_interval_s,
            backoff=Backoff(
                config.reconnect_initial_s, config.reconnect_max_s, rng or random.Random()
            ),
        )
        self._service_plans = [self._plan_service(entry) for entry in config.edge_services]
        self.services: list[tuple[str, EdgeService]] = []
        self._sample_seq: dict[str, int] = {a.asset_id: 0 for a in self.assets}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopper: asyncio.Task[None] | None = None
        self._started = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self._service_errors_logged: set[str] = set()

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
        if overrides:  # after validation: a replaced config forgets its file lines
            config = msgspec.structs.replace(config, **overrides)
        return cls(
            agent_id=served.agent_id,
            site_id=served.site_id,
            assets=served.assets,
            headend=settings.headend,
            config=config,
            plugins=plugins,
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
        return AgentStats(
            connected=link.connected,
            reconnects=link.reconnects,
            failed_attempts=link.failed_attempts,
            batches_sent=link.batches_sent,
            samples_dropped=self.outbox.dropped,
            last_ack_seq=link.last_ack_seq,
            outbox_samples=len(self.outbox),
        )

    async def start(self) -> None:
        """Connect the adapters, start the edge services, then the sampler and the link.

        An adapter that fails to connect is retried on the next poll and does not stop the
        start. A service that fails to start does: everything started is stopped again and
        :class:`DerSdkError` names the service and its package.
        """
        if self._started or self._stopping:
            raise DerSdkError(f"agent {self.agent_id} was already started; build a new one")
        self._started = True
        log.info(
            "agent %s starting: site %s, %d asset(s) (%s), headend %s",
            self.agent_id,
            self.site_id,
            len(self.assets),
            ", ".join(f"{a}={n}" for a, n in adapter_names(self.adapters).items()),
            self.headend,
        )
        await asyncio.gather(*(rt.connect() for rt in self.adapters.values()))
        try:
            await self._start_services()
        except BaseException:
            await self.stop()
            raise
        self._tasks = [
            asyncio.create_task(self._sampler(), name=f"der-agent-sampler-{self.agent_id}"),
            asyncio.create_task(self.link.run(), name=f"der-agent-link-{self.agent_id}"),
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
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.dispatcher.close()
            for name, service in reversed(self.services):
                try:
                    async with asyncio.timeout(SERVICE_STOP_TIMEOUT_S):
                        await service.stop()
                except Exception:
                    log.exception("agent %s: edge service %r failed to stop", self.agent_id, name)
            self.services.clear()
            await asyncio.gather(*(rt.close() for rt in self.adapters.values()))
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
        """Read every adapter once, number the samples, share them and queue them."""
        readings = await asyncio.gather(*(rt.read() for rt in self.adapters.values()))
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
        self.outbox.put(samples)
        return samples
