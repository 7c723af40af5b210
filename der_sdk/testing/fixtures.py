"""The fixtures of the der-sdk pytest plugin (see ``docs/testing.md``).

Override a fixture by defining one with the same name in your ``conftest.py`` or test
module: ``der_inventory_yaml`` for another inventory, ``der_headend_config`` for other
headend settings, ``der_adapter_type`` / ``der_adapter_options`` for ``der_agent_link``.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest
import pytest_asyncio

from der_sdk.plugins import Plugins, load_plugins
from der_sdk.testing.agent_link import AgentLink, AgentRunner
from der_sdk.testing.devices import TEST_DEVICE, SimulatedDevicePlugin
from der_sdk.testing.headend import DEFAULT_INVENTORY_YAML, WAIT_S, headend_config

if TYPE_CHECKING:
    import httpx

    from der_sdk.inventory import Inventory
    from der_sdk_headend.config import HeadendConfig
    from der_sdk_headend.service import Headend

__all__ = [
    "RegisterPlugin",
    "der_adapter_options",
    "der_adapter_type",
    "der_agent_link",
    "der_headend",
    "der_headend_config",
    "der_http",
    "der_inventory",
    "der_inventory_path",
    "der_inventory_yaml",
    "der_plugins",
    "der_register_plugin",
    "der_run_agent",
    "der_test_device",
]


class RegisterPlugin(Protocol):
    """``register(plugin, name=None, *, plugins=None) -> name``: see ``der_register_plugin``."""

    def __call__(
        self, plugin: object, name: str | None = None, *, plugins: Plugins | None = None
    ) -> str: ...


# --------------------------------------------------------------------------- plugins


@pytest.fixture
def der_plugins() -> Plugins:
    """A fresh :func:`der_sdk.load_plugins` (built-ins and installed plugins) for one test.

    The headend and agents of the other fixtures use this instance.
    """
    return load_plugins()


@pytest.fixture
def der_register_plugin(der_plugins: Plugins) -> Iterator[RegisterPlugin]:
    """``register(plugin, name=None, *, plugins=None)``: register a plugin object (with
    ``@hookimpl`` methods) into ``der_plugins`` (or ``plugins``) for this test only; it is
    unregistered at teardown. Returns the name it was registered under."""
    registered: list[tuple[Plugins, str]] = []
    numbers = itertools.count(1)

    def register(plugin: object, name: str | None = None, *, plugins: Plugins | None = None) -> str:
        target = der_plugins if plugins is None else plugins
        label = getattr(plugin, "__name__", None) or type(plugin).__name__
        chosen = name or f"der-test-{label}-{next(numbers)}"
        target.register(plugin, chosen, package=f"{chosen} (registered by a test)")
        registered.append((target, chosen))
        return chosen

    yield register
    for target, chosen in reversed(registered):
        target.unregister(chosen)


@pytest.fixture
def der_test_device(der_register_plugin: RegisterPlugin) -> SimulatedDevicePlugin:
    """The ``test-device`` adapter type, registered into ``der_plugins`` for this test.

    ``der_test_device.device(asset_id)`` is the :class:`SimulatedDevice` an agent's adapter
    for that asset drives: ``.inject("timeout")``, ``.clear()``.
    """
    plugin = SimulatedDevicePlugin()
    der_register_plugin(plugin, "der-sdk-test-device")
    return plugin


# --------------------------------------------------------------------------- headend


@pytest.fixture
def der_inventory_yaml() -> str:
    """The inventory YAML the headend serves: one site, three batteries. Override it."""
    return DEFAULT_INVENTORY_YAML


@pytest.fixture
def der_inventory_path(tmp_path: Path, der_inventory_yaml: str) -> Path:
    """``der_inventory_yaml`` written to ``tmp_path/der-assets.yaml``."""
    path = tmp_path / "der-assets.yaml"
    path.write_text(der_inventory_yaml, encoding="utf-8")
    return path


@pytest.fixture
def der_inventory(der_inventory_path: Path, der_plugins: Plugins) -> Inventory:
    """The parsed inventory (:class:`der_sdk.inventory.Inventory`)."""
    from der_sdk.inventory import load_inventory

    return load_inventory(der_inventory_path, asset_types=der_plugins.asset_types.names())


@pytest.fixture
def der_headend_config(der_inventory_path: Path) -> HeadendConfig:
    """``memory://`` storage, 127.0.0.1, ports chosen by the OS. Override it to change
    settings: ``return headend_config(der_inventory_path, {"SPLIT_POLICY": "equal"})``."""
    return headend_config(der_inventory_path)


@pytest_asyncio.fixture
async def der_headend(
    der_headend_config: HeadendConfig, der_plugins: Plugins
) -> AsyncIterator[Headend]:
    """A started reference headend (REST and gRPC), stopped at teardown."""
    from der_sdk_headend.service import Headend

    headend = Headend(der_headend_config, plugins=der_plugins)
    await headend.start()
    try:
        yield headend
    finally:
        await headend.stop()


@pytest_asyncio.fixture
async def der_http(der_headend: Headend) -> AsyncIterator[httpx.AsyncClient]:
    """An ``httpx.AsyncClient`` with ``base_url`` set to the headend's REST API."""
    import httpx

    async with httpx.AsyncClient(base_url=der_headend.http_url, timeout=WAIT_S) as client:
        yield client


# --------------------------------------------------------------------------- agents


@pytest_asyncio.fixture
async def der_run_agent(
    request: pytest.FixtureRequest,
    der_headend: Headend,
    der_plugins: Plugins,
    der_http: httpx.AsyncClient,
) -> AsyncIterator[AgentRunner]:
    """``await der_run_agent(adapter_type=..., options=..., assets=...)`` starts a real
    agent against ``der_headend`` and returns an :class:`AgentLink`; every agent started
    is stopped at teardown. ``adapter_type="test-device"`` registers that type if needed.
    """

    def provide(adapter_type: str) -> None:
        if adapter_type == TEST_DEVICE:
            request.getfixturevalue("der_test_device")

    runner = AgentRunner(der_headend, der_plugins, der_http, provide_adapter=provide)
    try:
        yield runner
    finally:
        await runner.close()


@pytest.fixture
def der_adapter_type() -> str:
    """The adapter type ``der_agent_link`` runs. Override it with your adapter's name."""
    return TEST_DEVICE


@pytest.fixture
def der_adapter_options() -> Mapping[str, Any]:
    """The adapter options ``der_agent_link`` gives every asset. Override as needed."""
    return {}


@pytest_asyncio.fixture
async def der_agent_link(
    der_run_agent: AgentRunner, der_adapter_type: str, der_adapter_options: Mapping[str, Any]
) -> AgentLink:
    """A registered agent serving the inventory's first site with ``der_adapter_type``."""
    return await der_run_agent(adapter_type=der_adapter_type, options=der_adapter_options)
