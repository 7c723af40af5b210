"""Test kit for der-sdk plugin authors, shipped as a pytest plugin (see ``docs/testing.md``).

Installing der-sdk registers the pytest plugin :mod:`der_sdk.testing.pytest_plugin`: the
``der_*`` fixtures that need no headend or agent (a simulated device with fault injection,
plugin registration for one test, the test inventory) and a check that fails async tests
which leak asyncio tasks. The fixtures that run the reference apps live beside them and are
registered the same way: a headend on memory storage with an HTTP client
(:mod:`der_sdk_headend.testing`) and an in-process agent link
(:mod:`der_sdk_agent.testing`). Nothing here imports the apps.

Import from here what you subclass or call:

* :class:`AdapterConformance`, :class:`StorageConformance`, :class:`BusConformance` —
  conformance suites;
* :class:`SimulatedDevice`, :class:`FaultyAdapter`, :class:`SimulatedDevicePlugin` — the
  ``test-device`` adapter and its device;
* :func:`wait_until` — await a condition with a deadline;
* :data:`DEFAULT_SITE_ID`, :data:`DEFAULT_ASSET_IDS`, :data:`DEFAULT_INVENTORY_YAML` — the
  test inventory;
* :class:`BlockingWatch` — catch calls that block the event loop;
* :class:`TcpProxy`, :class:`HeadendProcess`, :class:`AgentProcess` — cut, blackhole or
  delay a TCP link, and run the headend and agent as processes to SIGKILL;
* :class:`SnippetRunner`, :func:`parse_snippets` — run the commands of a docs page in
  order, so the page stays true;
* :func:`require_tcp_service` — skip (or fail, under ``DER_SDK_REQUIRE_SERVICES=1``) when
  PostgreSQL or NATS is unreachable.

Names are imported lazily, so importing the pytest plugin stays cheap and the conformance
module's asserts are rewritten by pytest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from der_sdk.lazy_exports import lazy_getattr

if TYPE_CHECKING:
    from der_sdk.testing.blocking import BlockingWatch
    from der_sdk.testing.bus_conformance import BusConformance
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
    from der_sdk.testing.inventory import (
        DEFAULT_ASSET_IDS,
        DEFAULT_INVENTORY_YAML,
        DEFAULT_SITE_ID,
    )
    from der_sdk.testing.services import require_tcp_service, services_required
    from der_sdk.testing.snippets import Snippet, SnippetFailed, SnippetRunner, parse_snippets
    from der_sdk.testing.tasks import ALLOW_LEAKS_MARKER, find_leaked_tasks
    from der_sdk.testing.waits import WAIT_S, wait_until

_EXPORTS = {
    "BlockingWatch": "blocking",
    "BusConformance": "bus_conformance",
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
    "DEFAULT_ASSET_IDS": "inventory",
    "DEFAULT_INVENTORY_YAML": "inventory",
    "DEFAULT_SITE_ID": "inventory",
    "require_tcp_service": "services",
    "services_required": "services",
    "Snippet": "snippets",
    "SnippetFailed": "snippets",
    "SnippetRunner": "snippets",
    "parse_snippets": "snippets",
    "ALLOW_LEAKS_MARKER": "tasks",
    "find_leaked_tasks": "tasks",
    "WAIT_S": "waits",
    "wait_until": "waits",
}

__all__ = [
    "ALLOW_LEAKS_MARKER",
    "DEFAULT_ASSET_IDS",
    "DEFAULT_CONFORMANCE_ASSET",
    "DEFAULT_INVENTORY_YAML",
    "DEFAULT_SITE_ID",
    "FAULT_KINDS",
    "TEST_DEVICE",
    "WAIT_S",
    "AdapterConformance",
    "AgentProcess",
    "BlockingWatch",
    "BusConformance",
    "DeviceError",
    "FaultyAdapter",
    "HeadendProcess",
    "RegisterPlugin",
    "ServiceProcess",
    "ServiceProcessError",
    "SimulatedDevice",
    "SimulatedDeviceOptions",
    "SimulatedDevicePlugin",
    "Snippet",
    "SnippetFailed",
    "SnippetRunner",
    "StorageConformance",
    "TcpProxy",
    "find_leaked_tasks",
    "free_port",
    "parse_snippets",
    "require_tcp_service",
    "services_required",
    "wait_until",
]


__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
