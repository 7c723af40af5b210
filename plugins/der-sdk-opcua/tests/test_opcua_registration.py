"""Registering the plugin is cheap: every ``der`` process loads it, and only an agent with
an OPC UA asset or server (or ``der sim opcua``) imports asyncua."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import der_sdk_opcua


def test_loading_every_plugin_leaves_asyncua_unimported_until_an_adapter_is_made() -> None:
    script = textwrap.dedent(
        """
        import sys
        from der_sdk.plugins import load_plugins
        plugins = load_plugins()
        adapter = plugins.adapter_types.get("opcua")
        plugins.device_profiles
        plugins.device_simulators
        print("asyncua" in sys.modules, adapter.options.__name__)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "OpcuaAdapterOptions"]


def test_the_package_still_exports_its_classes_on_first_use() -> None:
    from der_sdk_opcua.adapter import OpcuaAdapter
    from der_sdk_opcua.server import OpcuaEdgeServer
    from der_sdk_opcua.simulator import BessSimulator

    assert der_sdk_opcua.OpcuaAdapter is OpcuaAdapter
    assert der_sdk_opcua.OpcuaEdgeServer is OpcuaEdgeServer
    assert der_sdk_opcua.BessSimulator is BessSimulator
