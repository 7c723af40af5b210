"""The fixtures of the der-sdk pytest plugin that need no headend or agent (see
``docs/testing.md``): plugins for one test, the ``test-device`` adapter, the inventory.

Override a fixture by defining one with the same name in your ``conftest.py`` or test
module: ``der_inventory_yaml`` for another inventory. The fixtures that run a headend are
in :mod:`der_sdk_headend.testing.fixtures`, those that run an agent in
:mod:`der_sdk_agent.testing.fixtures`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest

from der_sdk.plugins import Plugins, load_plugins
from der_sdk.testing.devices import SimulatedDevicePlugin
from der_sdk.testing.inventory import DEFAULT_INVENTORY_YAML

if TYPE_CHECKING:
    from der_sdk.inventory import Inventory

__all__ = [
    "RegisterPlugin",
    "der_inventory",
    "der_inventory_path",
    "der_inventory_yaml",
    "der_plugins",
    "der_register_plugin",
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


# --------------------------------------------------------------------------- inventory


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
