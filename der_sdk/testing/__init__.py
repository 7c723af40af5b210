"""Test kit for der-sdk plugin authors, shipped as a pytest plugin (see ``docs/testing.md``).

Installing der-sdk registers the pytest plugin :mod:`der_sdk.testing.pytest_plugin`: the
``der_*`` fixtures (a headend on memory storage with an HTTP client, an in-process agent
link, a simulated device with fault injection, plugin registration for one test) and a
check that fails async tests which leak asyncio tasks.

Import from here what you subclass or call:

* :class:`AdapterConformance`, :class:`StorageConformance` — conformance suites;
* :class:`SimulatedDevice`, :class:`FaultyAdapter`, :class:`SimulatedDevicePlugin` — the
  ``test-device`` adapter and its device;
* :class:`AgentLink`, :class:`AgentRunner`, :func:`wait_until` — the agent link;
* :class:`BlockingWatch` — catch calls that block the event loop;
* :class:`TcpProxy`, :class:`HeadendProcess`, :class:`AgentProcess` — cut, blackhole or
  delay a TCP link, and run the headend and agent as processes to SIGKILL;
* :func:`require_tcp_service` — skip (or fail, under ``DER_SDK_REQUIRE_SERVICES=1``) when
  PostgreSQL or NATS is unreachable.

Names are imported lazily, so importing the pytest plugin stays cheap and the conformance
module's asserts are rewritten by pytest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from der_sdk.testing.agent_link import FAST_AGENT_SETTINGS, AgentLink, AgentRunner, wait_until
    from der_sdk.testing.blocking import BlockingWatch
    from der_sdk.testing.conformance import (
        DEFAULT_CONFORMANCE_ASSET,
        AdapterConformance,
        StorageConformance,
    )
    from der_sdk.testing.devices import (
        FAULT_KINDS,
        TEST_DEVICE,
        DeviceError,
        FaultyAdapter,
        SimulatedDevice,
        SimulatedDeviceOptions,
        SimulatedDevicePlugin,
    )
    from der_sdk.testing.faults import (
        AgentProcess,
        HeadendProcess,
        ServiceProcess,
        ServiceProcessError,
        TcpProxy,
        free_port,
    )
    from der_sdk.testing.fixtures import RegisterPlugin
    from der_sdk.testing.headend import (
        DEFAULT_ASSET_IDS,
        DEFAULT_INVENTORY_YAML,
        DEFAULT_SITE_ID,
        headend_config,
    )
    from der_sdk.testing.services import require_tcp_service, services_required
    from der_sdk.testing.tasks import ALLOW_LEAKS_MARKER, find_leaked_tasks

_EXPORTS = {
    "FAST_AGENT_SETTINGS": "agent_link",
    "AgentLink": "agent_link",
    "AgentRunner": "agent_link",
    "wait_until": "agent_link",
    "BlockingWatch": "blocking",
    "DEFAULT_CONFORMANCE_ASSET": "conformance",
    "AdapterConformance": "conformance",
    "StorageConformance": "conformance",
    "FAULT_KINDS": "devices",
    "TEST_DEVICE": "devices",
    "DeviceError": "devices",
    "FaultyAdapter": "devices",
    "SimulatedDevice": "devices",
    "SimulatedDeviceOptions": "devices",
    "SimulatedDevicePlugin": "devices",
    "AgentProcess": "faults",
    "HeadendProcess": "faults",
    "ServiceProcess": "faults",
    "ServiceProcessError": "faults",
    "TcpProxy": "faults",
    "free_port": "faults",
    "RegisterPlugin": "fixtures",
    "DEFAULT_ASSET_IDS": "headend",
    "DEFAULT_INVENTORY_YAML": "headend",
    "DEFAULT_SITE_ID": "headend",
    "headend_config": "headend",
    "require_tcp_service": "services",
    "services_required": "services",
    "ALLOW_LEAKS_MARKER": "tasks",
    "find_leaked_tasks": "tasks",
}

__all__ = [
    "ALLOW_LEAKS_MARKER",
    "DEFAULT_ASSET_IDS",
    "DEFAULT_CONFORMANCE_ASSET",
    "DEFAULT_INVENTORY_YAML",
    "DEFAULT_SITE_ID",
    "FAST_AGENT_SETTINGS",
    "FAULT_KINDS",
    "TEST_DEVICE",
    "AdapterConformance",
    "AgentLink",
    "AgentProcess",
    "AgentRunner",
    "BlockingWatch",
    "DeviceError",
    "FaultyAdapter",
    "HeadendProcess",
    "RegisterPlugin",
    "ServiceProcess",
    "ServiceProcessError",
    "SimulatedDevice",
    "SimulatedDeviceOptions",
    "SimulatedDevicePlugin",
    "StorageConformance",
    "TcpProxy",
    "find_leaked_tasks",
    "free_port",
    "headend_config",
    "require_tcp_service",
    "services_required",
    "wait_until",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'der_sdk.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"der_sdk.testing.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
