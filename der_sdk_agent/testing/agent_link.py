"""An in-process agent link: a real :class:`der_sdk_agent.agent.Agent` dialling a test headend
(the ``der_headend`` fixture of :mod:`der_sdk_headend.testing`).

The adapter under test is driven by the agent's own code: registration, the sampler,
the buffer, the stream, the dispatch path (clamp, split, revert). Every wait has a
deadline and fails with what it was waiting for and what it saw last.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from der_sdk.models import TERMINAL_DISPATCH_STATES, Dispatch, Event, TelemetrySample
from der_sdk.testing.waits import WAIT_S, wait_until

if TYPE_CHECKING:
    import httpx

    from der_sdk.agent_config import AgentConfig
    from der_sdk.plugins import Plugins
    from der_sdk_agent.agent import Agent
    from der_sdk_headend.service import Headend

__all__ = ["FAST_AGENT_SETTINGS", "AgentLink", "AgentRunner"]

FAST_AGENT_SETTINGS: Mapping[str, float] = {
    "telemetry_interval_s": 0.05,
    "heartbeat_interval_s": 0.2,
    "reconnect_initial_s": 0.05,
    "reconnect_max_s": 0.2,
}
"""Agent timings for tests: telemetry every 50 ms, quick reconnects."""


class AgentLink:
    """A started agent connected to a test headend, with waits on what the headend sees.

    ``agent`` is the real :class:`~der_sdk_agent.agent.Agent`; ``http`` talks to the
    headend's REST API, so waits observe exactly what an operator would.
    """

    def __init__(self, agent: Agent, headend: Headend, http: httpx.AsyncClient) -> None:
        self.agent = agent
        self.headend = headend
        self.http = http

    @property
    def asset_ids(self) -> list[str]:
        """The served asset ids, sorted."""
        return [asset.asset_id for asset in self.agent.assets]

    @property
    def site_id(self) -> str:
        return self.agent.site_id

    async def wait_connected(self, timeout_s: float = WAIT_S) -> None:
        """Until the agent has registered with the headend."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.agent.wait_connected()
        except TimeoutError:
            pytest.fail(
                f"timed out after {timeout_s:g} s waiting for agent {self.agent.agent_id} to "
                f"register with the headend; agent stats: {self.agent.stats()}",
                pytrace=False,
            )

    async def latest_telemetry(self, asset_id: str) -> TelemetrySample | None:
        """The headend's latest sample of ``asset_id`` (``GET /telemetry/{id}``), if any."""
        response = await self.http.get(f"/telemetry/{asset_id}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return msgspec.json.decode(response.content, type=TelemetrySample)

    async def wait_for_telemetry(
        self,
        asset_id: str | None = None,
        where: Callable[[TelemetrySample], bool] | None = None,
        *,
        timeout_s: float = WAIT_S,
    ) -> TelemetrySample:
        """Until the headend holds a sample of ``asset_id`` (default: the first served
        asset) for which ``where(sample)`` is true (default: any sample)."""
        asset = asset_id or self.asset_ids[0]
        seen: list[TelemetrySample | None] = [None]

        async def probe() -> TelemetrySample | None:
            sample = await self.latest_telemetry(asset)
            seen[0] = sample
            if sample is not None and (where is None or where(sample)):
                return sample
            return None

        condition = "a sample" if where is None else "a sample matching the condition"
        return await wait_until(
            probe,
            f"{condition} of asset {asset} at the headend",
            timeout_s=timeout_s,
            last_seen=lambda: seen[0],
        )

    async def dispatch(
        self,
        mw: float,
        *,
        asset_id: str | None = None,
        site_id: str | None = None,
        duration_s: float | None = None,
    ) -> Dispatch:
        """``POST /dispatch`` (to the first served asset when no target is given)."""
        body: dict[str, Any] = {"mw": mw}
        if asset_id is None and site_id is None:
            asset_id = self.asset_ids[0]
        if asset_id is not None:
            body["asset_id"] = asset_id
        if site_id is not None:
            body["site_id"] = site_id
        if duration_s is not None:
            body["duration_s"] = duration_s
        response = await self.http.post("/dispatch", json=body)
        assert response.status_code == 202, (
            f"POST /dispatch {body} answered {response.status_code}: {response.text}"
        )
        return msgspec.json.decode(response.content, type=Dispatch)

    async def get_dispatch(self, dispatch_id: str) -> Dispatch:
        response = await self.http.get(f"/dispatch/{dispatch_id}")
        assert response.status_code == 200, (
            f"GET /dispatch/{dispatch_id} answered {response.status_code}: {response.text}"
        )
        return msgspec.json.decode(response.content, type=Dispatch)

    async def wait_for_dispatch(
        self, dispatch_id: str, state: str = "applied", *, timeout_s: float = WAIT_S
    ) -> Dispatch:
        """Until dispatch ``dispatch_id`` reaches ``state``; fails at once if it ends in
        another final state (its reason is in the message)."""
        seen: list[Dispatch | None] = [None]

        async def probe() -> Dispatch | None:
            record = await self.get_dispatch(dispatch_id)
            seen[0] = record
            if record.state == state:
                return record
            if record.state in TERMINAL_DISPATCH_STATES:
                pytest.fail(
                    f"dispatch {dispatch_id} ended {record.state!r}, not {state!r}: "
                    f"{record.reason or ''} targets={record.targets}",
                    pytrace=False,
                )
            return None

        return await wait_until(
            probe,
            f"dispatch {dispatch_id} to become {state!r}",
            timeout_s=timeout_s,
            last_seen=lambda: seen[0],
        )

    async def events(self, **filters: Any) -> list[Event]:
        """``GET /events`` with ``filters`` (``asset_id``, ``kind``, ``since``...), newest
        first."""
        response = await self.http.get("/events", params=filters)
        assert response.status_code == 200, (
            f"GET /events {filters} answered {response.status_code}: {response.text}"
        )
        return msgspec.json.decode(response.content, type=list[Event])

    async def wait_for_event(
        self,
        kind: str,
        asset_id: str | None = None,
        where: Callable[[Event], bool] | None = None,
        *,
        timeout_s: float = WAIT_S,
    ) -> Event:
        """Until ``GET /events`` lists an event of ``kind`` (of ``asset_id``, when given)
        for which ``where(event)`` is true; returns the oldest such event. For a device
        condition: ``wait_for_event("condition_raised", asset_id, lambda e:
        e.data["code"] == "inverter_trip")``."""
        seen: list[list[Event]] = [[]]
        filters: dict[str, Any] = {"kind": kind}
        if asset_id is not None:
            filters["asset_id"] = asset_id

        async def probe() -> Event | None:
            events = await self.events(**filters)
            seen[0] = events
            matching = [e for e in events if where is None or where(e)]
            return matching[-1] if matching else None

        return await wait_until(
            probe,
            f"a {kind!r} event"
            + (f" of asset {asset_id}" if asset_id else "")
            + (" matching the condition" if where else "")
            + " in GET /events",
            timeout_s=timeout_s,
            last_seen=lambda: [f"{e.kind}: {e.message}" for e in seen[0][:5]],
        )

    async def stop(self) -> None:
        """Stop the agent (the fixture also does at teardown)."""
        await self.agent.stop()


class AgentRunner:
    """Starts agents against one headend and stops them all at :meth:`close`.

    Used by the ``der_run_agent`` fixture; call it directly to run agents outside pytest
    fixtures.
    """

    def __init__(
        self,
        headend: Headend,
        plugins: Plugins,
        http: httpx.AsyncClient,
        *,
        provide_adapter: Callable[[str], None] | None = None,
    ) -> None:
        self.headend = headend
        self.plugins = plugins
        self.http = http
        self._provide_adapter = provide_adapter
        self.links: list[AgentLink] = []
        self._ids = itertools.count(1)

    async def __call__(
        self,
        *,
        adapter_type: str,
        options: Mapping[str, Any] | None = None,
        assets: Sequence[str] | None = None,
        site_id: str | None = None,
        agent_id: str | None = None,
        config: AgentConfig | None = None,
        wait_connected: bool = True,
        **settings: Any,
    ) -> AgentLink:
        """Start an agent serving ``assets`` with adapter ``adapter_type``.

        :param options: the adapter options, the same for every served asset.
        :param assets: asset ids to serve; default: every asset of ``site_id``.
        :param site_id: default: the site of the first asset, else the inventory's first.
        :param config: a complete agent config, replacing the one built from the above.
        :param wait_connected: return only once the agent has registered.
        :param settings: agent config fields (``telemetry_interval_s=0.2``...) over
            :data:`FAST_AGENT_SETTINGS`.
        """
        from der_sdk.agent_config import AgentConfig, AssetAdapterConfig
        from der_sdk_agent.agent import Agent

        if self._provide_adapter is not None and adapter_type not in self.plugins.adapter_types:
            self._provide_adapter(adapter_type)
        inventory = self.headend.inventory
        if assets:
            served = [inventory.asset(asset_id) for asset_id in assets]
            site = site_id or served[0].site_id
        else:
            site = site_id or next(iter(inventory.sites))
            served = list(inventory.assets_for_site(site))
        if config is None:
            values: dict[str, Any] = {**FAST_AGENT_SETTINGS, **settings}
            config = AgentConfig(
                default_adapter=adapter_type,
                assets={
                    asset.asset_id: AssetAdapterConfig(
                        adapter=adapter_type, options=dict(options or {})
                    )
                    for asset in served
                },
                **values,
            )
        agent = Agent(
            agent_id=agent_id or f"der-test-agent-{next(self._ids)}",
            site_id=site,
            assets=served,
            headend=self.headend.grpc_addr,
            config=config,
            plugins=self.plugins,
            buffer_path=":memory:",  # leaves no file behind; the buffer has its own tests
        )
        await agent.start()
        link = AgentLink(agent, self.headend, self.http)
        self.links.append(link)
        if wait_connected:
            await link.wait_connected()
        return link

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop every agent started here."""
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(link.agent.stop() for link in self.links))
