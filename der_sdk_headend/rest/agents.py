"""``/agents``: one row per configured asset with its connection and recent sessions.

In a cluster (``HEADEND_BUS_URL``) the connection is the cluster's: an asset whose agent
is connected to another replica shows as connected, held by that replica."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from litestar import Controller, get
from litestar.di import NamedDependency

from der_sdk_headend.rest.auth import access
from der_sdk_headend.rest.openapi import NEEDS_STORAGE
from der_sdk_headend.rest.schemas import AgentRow, SessionRow

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["AgentsController"]

RECENT_SESSIONS = 5


class AgentsController(Controller):
    tags = ["presence"]

    @get(
        "/agents",
        summary="Every configured asset: connected or not, by which agent",
        **access("viewer"),
        **NEEDS_STORAGE,
    )
    async def list_agents(self, headend: NamedDependency[Headend]) -> list[AgentRow]:
        inventory = headend.inventory
        presence = headend.presence
        assets = list(inventory.assets.values())
        sessions = await asyncio.gather(
            *(headend.storage.recent_sessions(a.asset_id, RECENT_SESSIONS) for a in assets)
        )
        cluster = headend.cluster_presence
        own_id = headend.config.headend_id
        rows: list[AgentRow] = []
        for asset, recent in zip(assets, sessions, strict=True):
            site = inventory.sites.get(asset.site_id)
            peer = agent_id = holder = None
            offset: float | None = None
            if cluster is not None:  # in a cluster, whichever replica holds it
                entry = cluster.holder_of_asset(asset.asset_id)
                if entry is not None:
                    peer, agent_id, holder = entry.peer, entry.agent_id, entry.headend_id
            elif (stream := presence.stream_for(asset.asset_id)) is not None:
                peer, agent_id, holder = stream.peer, stream.agent_id, own_id
                offset = stream.clock_offset_s
            rows.append(
                AgentRow(
                    asset_id=asset.asset_id,
                    asset_name=asset.name,
                    site_id=asset.site_id,
                    site_name=site.name if site else "",
                    connected=holder is not None,
                    peer=peer,
                    agent_id=agent_id,
                    headend_id=holder,
                    last_seen=presence.last_seen(asset.asset_id),
                    clock_offset_s=offset,
                    sessions=[
                        SessionRow(
                            connected_at=s.connected_at,
                            disconnected_at=s.disconnected_at,
                            peer=s.peer,
                            agent_id=s.agent_id,
                            headend_id=s.headend_id,
                        )
                        for s in recent
                    ],
                )
            )
        return rows
