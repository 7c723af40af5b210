"""Agent settings from the environment, and which assets an agent serves.

Two modes, chosen by environment variable:

* single-asset mode, ``ASSET_ID``: the agent serves that one asset;
* gateway mode, ``GATEWAY_SITE_ID``: the agent serves every asset of that site over one
  stream.

``ASSET_ID`` wins when both are set (with a warning): a command meant for one asset must
never fan out to a site by accident.

The link's security (:mod:`der_sdk_agent.tls`): ``AGENT_TLS_CA`` (the CA to trust for the
headend's certificate, pinned: the system roots are not used), ``AGENT_TLS_CERT`` and
``AGENT_TLS_KEY`` (the client certificate for mutual TLS), ``AGENT_TLS_SERVER_NAME`` (the
name to check in the headend's certificate, when it differs from the host dialled) and
``AGENT_TOKEN`` (sent as ``x-der-agent-token`` metadata). Each wins over the agent config's
``tls`` section.

``HEADEND_GRPC`` is one headend address or a comma-separated list of them
(:mod:`der_sdk_agent.headends`): the agent dials one at a time and moves on when it fails.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from der_sdk.errors import DerSdkError, UnknownNameError
from der_sdk.inventory import Inventory
from der_sdk.models import Asset
from der_sdk_agent.headends import parse_headend_addresses

__all__ = ["DEFAULT_HEADEND_GRPC", "AgentSettings", "ServedAssets", "resolve_served_assets"]

log = logging.getLogger("der.agent.settings")

DEFAULT_HEADEND_GRPC = "127.0.0.1:50051"


@dataclass(frozen=True, kw_only=True)
class AgentSettings:
    """What the agent process was told by its environment.

    Build one with :meth:`from_env`. ``telemetry_interval_s``, ``heartbeat_interval_s``
    and ``buffer_path`` are ``None`` unless set in the environment; when set they override
    the agent config file. ``headend`` is one address or a comma-separated list
    (:attr:`headends`).
    """

    headend: str = DEFAULT_HEADEND_GRPC
    assets_path: str
    asset_id: str | None = None
    site_id: str | None = None
    gateway_id: str | None = None
    agent_config_path: str | None = None
    telemetry_interval_s: float | None = None
    heartbeat_interval_s: float | None = None
    clock_offset_max_s: float | None = None
    buffer_path: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    token: str | None = field(default=None, repr=False)

    @property
    def headends(self) -> tuple[str, ...]:
        """The headend addresses in ``headend``, in the order given."""
        return parse_headend_addresses(self.headend)

    @property
    def mode(self) -> Literal["asset", "site"]:
        """``asset`` (single-asset mode) or ``site`` (gateway mode)."""
        return "asset" if self.asset_id is not None else "site"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AgentSettings:
        """Read the settings from ``env`` (usually ``os.environ``).

        :raises DerSdkError: ``ASSETS_PATH`` is missing, neither ``ASSET_ID`` nor
            ``GATEWAY_SITE_ID`` is set, an interval is not a positive number, or
            ``HEADEND_GRPC`` is not a list of ``host:port`` addresses (the message names
            the entry).
        """
        headends = parse_headend_addresses(_get(env, "HEADEND_GRPC") or DEFAULT_HEADEND_GRPC)
        assets_path = _get(env, "ASSETS_PATH")
        if assets_path is None:
            raise DerSdkError("ASSETS_PATH is not set: point it at the asset inventory YAML file")
        asset_id = _get(env, "ASSET_ID")
        site_id = _get(env, "GATEWAY_SITE_ID")
        if asset_id is None and site_id is None:
            raise DerSdkError(
                "no agent mode: set ASSET_ID to serve one asset, or GATEWAY_SITE_ID to serve "
                "every asset of a site (gateway mode)"
            )
        if asset_id is not None and site_id is not None:
            log.warning(
                "both ASSET_ID (%s) and GATEWAY_SITE_ID (%s) are set; ASSET_ID wins: "
                "running in single-asset mode. Unset one of them.",
                asset_id,
                site_id,
            )
            site_id = None
        return cls(
            headend=",".join(headends),
            assets_path=assets_path,
            asset_id=asset_id,
            site_id=site_id,
            gateway_id=_get(env, "GATEWAY_ID"),
            agent_config_path=_get(env, "AGENT_CONFIG"),
            telemetry_interval_s=_seconds(env, "TELEMETRY_INTERVAL_S"),
            heartbeat_interval_s=_seconds(env, "HEARTBEAT_INTERVAL_S"),
            clock_offset_max_s=_seconds(env, "AGENT_CLOCK_OFFSET_MAX_S"),
            buffer_path=_get(env, "AGENT_BUFFER_PATH"),
            tls_ca=_get(env, "AGENT_TLS_CA"),
            tls_cert=_get(env, "AGENT_TLS_CERT"),
            tls_key=_get(env, "AGENT_TLS_KEY"),
            tls_server_name=_get(env, "AGENT_TLS_SERVER_NAME"),
            token=_get(env, "AGENT_TOKEN"),
        )


@dataclass(frozen=True, kw_only=True)
class ServedAssets:
    """Who the agent is and what it serves, resolved against the inventory."""

    agent_id: str
    site_id: str
    assets: tuple[Asset, ...]


def resolve_served_assets(
    settings: AgentSettings, inventory: Inventory, *, config_agent_id: str | None = None
) -> ServedAssets:
    """The agent id, site and assets ``settings`` select from ``inventory``.

    The agent id is, first found: ``GATEWAY_ID`` (gateway mode), ``config_agent_id`` (the
    agent config file), then ``asset-<asset_id>`` or ``gateway-<site_id>``.

    :raises DerSdkError: the asset or site id is not in the inventory (the message names
        the id and the inventory file), or the site has no assets.
    """
    if settings.asset_id is not None:
        try:
            asset = inventory.asset(settings.asset_id)
        except UnknownNameError:
            raise DerSdkError(
                f"ASSET_ID {settings.asset_id} is not in the inventory {inventory.path}; "
                f"known asset ids: {_listed(inventory.assets)}"
            ) from None
        return ServedAssets(
            agent_id=config_agent_id or f"asset-{asset.asset_id}",
            site_id=asset.site_id,
            assets=(asset,),
        )
    assert settings.site_id is not None  # from_env guarantees one mode
    try:
        site = inventory.site(settings.site_id)
    except UnknownNameError:
        raise DerSdkError(
            f"GATEWAY_SITE_ID {settings.site_id} is not in the inventory {inventory.path}; "
            f"known site ids: {_listed(inventory.sites)}"
        ) from None
    assets = tuple(inventory.assets_for_site(site.site_id))
    if not assets:
        raise DerSdkError(
            f"site {site.site_id} ({site.name}) has no assets in the inventory "
            f"{inventory.path}; add assets with site_id {site.site_id} or serve another site"
        )
    return ServedAssets(
        agent_id=settings.gateway_id or config_agent_id or f"gateway-{site.site_id}",
        site_id=site.site_id,
        assets=assets,
    )


def _get(env: Mapping[str, str], key: str) -> str | None:
    value = env.get(key)
    if value is None or not value.strip():
        return None
    return value.strip()


def _seconds(env: Mapping[str, str], key: str) -> float | None:
    raw = _get(env, key)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise DerSdkError(f"{key}={raw!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise DerSdkError(f"{key}={raw!r} must be a positive number of seconds")
    return value


def _listed(ids: Mapping[str, object], limit: int = 10) -> str:
    names = sorted(ids)
    shown = ", ".join(names[:limit]) or "none"
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"
