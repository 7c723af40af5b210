"""The bus conformance suite (der_sdk.testing.BusConformance) against the built-in
``memory://`` bus, and how bus backends are registered and chosen."""

from __future__ import annotations

import pytest

from der_sdk import hookimpl
from der_sdk.bus import BusOptions, BusUnavailableError, open_bus
from der_sdk.bus.memory import MemoryBus
from der_sdk.errors import PluginError, UnknownNameError
from der_sdk.extensions import BusBackendType
from der_sdk.plugins import Plugins, load_plugins
from der_sdk.testing import BusConformance

NO_ENV: dict[str, str] = {}


def _plugins(*extra: tuple[str, object]) -> Plugins:
    return load_plugins(entry_points=False, extra=list(extra), env=NO_ENV)


class TestMemoryBus(BusConformance):
    url = "memory://conformance"
    expected_name = "memory"
    presence_max_age_s = 0.3
    ack_wait_s = 0.3
    expiry_slack_s = 0.5

    def load_plugins(self) -> Plugins:
        return _plugins()


def test_the_bus_backend_is_chosen_by_url_scheme() -> None:
    plugins = _plugins()
    assert plugins.bus_for_url("memory://a").name == "memory"
    assert isinstance(open_bus("memory://a", plugins), MemoryBus)
    with pytest.raises(UnknownNameError, match="unknown bus URL scheme 'kafka'; installed: memory"):
        plugins.bus_for_url("kafka://broker:9092")


class Loopback:
    @hookimpl
    def der_bus_backends(self) -> list[BusBackendType]:
        return [BusBackendType(name="loopback", schemes=("loopback",), factory=MemoryBus.from_url)]


class SecondMemory:
    @hookimpl
    def der_bus_backends(self) -> list[BusBackendType]:
        return [BusBackendType(name="memory-2", schemes=("memory",), factory=MemoryBus.from_url)]


def test_a_bus_backend_from_a_plugin_is_found_by_its_scheme() -> None:
    plugins = _plugins(("loopback", Loopback()))
    assert plugins.bus_for_url("loopback://x").name == "loopback"
    assert plugins.bus_backends.provider("loopback") == "loopback"
    assert plugins.bus_backends.provider("memory") == "der-sdk"


def test_a_bus_scheme_claimed_twice_names_both_packages() -> None:
    plugins = _plugins(("second-memory", SecondMemory()))
    with pytest.raises(PluginError, match=r"duplicate bus scheme 'memory'.*der-sdk and second"):
        plugins.bus_backends.names()


def test_a_bus_name_claimed_twice_names_both_packages() -> None:
    plugins = _plugins(("loopback", Loopback()), ("loopback-again", Loopback()))
    with pytest.raises(PluginError, match=r"duplicate bus backend 'loopback'.*loopback-again"):
        plugins.bus_backends.names()


async def test_memory_buses_share_a_broker_only_when_their_urls_match() -> None:
    options = BusOptions(namespace="share")
    a = open_bus("memory://site-1", _plugins(), options)
    b = open_bus("memory://site-1", _plugins(), options)
    elsewhere = open_bus("memory://site-2", _plugins(), options)
    other_namespace = open_bus("memory://site-1", _plugins(), BusOptions(namespace="other"))
    for bus in (a, b, elsewhere, other_namespace):
        await bus.connect()
    try:
        await a.presence.claim("agent-1", b"replica-a")
        assert await b.presence.get("agent-1") is not None
        assert await elsewhere.presence.get("agent-1") is None
        assert await other_namespace.presence.get("agent-1") is None
    finally:
        await a.destroy()
        for bus in (a, b, elsewhere, other_namespace):
            await bus.close()


async def test_a_memory_bus_is_unavailable_before_connect() -> None:
    bus = open_bus("memory://", _plugins())
    assert bus.state == "closed"
    with pytest.raises(BusUnavailableError, match="not connected"):
        await bus.telemetry.publish(b"batch")
