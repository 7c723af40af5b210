"""The plugin manager factory and the registries of every hook family."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import pytest

from der_sdk import hookimpl, load_plugins
from der_sdk.errors import PluginError, UnknownNameError
from der_sdk.extensions import (
    DevicePoint,
    DeviceProfile,
    EdgeService,
    EdgeServiceType,
    StorageBackendType,
)
from der_sdk.models import Asset, TelemetrySample, utc_now
from der_sdk.storage.memory import MemoryStorage
from tests.conftest import FakeDist

NO_ENV: dict[str, str] = {}

ADAPTER_PLUGIN = """
from der_sdk import hookimpl
from der_sdk.extensions import AdapterType

@hookimpl
def der_adapter_types():
    return [AdapterType(name="{name}", factory=lambda ctx: None)]
"""


class Profiles:
    @hookimpl
    def der_device_profiles(self) -> list[DeviceProfile]:
        return [
            DeviceProfile(
                name="acme-bess-v2",
                vendor="Acme",
                model="B2",
                version="2.0.1",
                protocol="modbus",
                points={"mw": DevicePoint(address=40001, unit="kW", scale=0.001)},
            )
        ]


class NullService(EdgeService):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Services:
    @hookimpl
    def der_edge_services(self) -> list[EdgeServiceType]:
        return [EdgeServiceType(name="null", factory=lambda ctx: NullService())]


def test_builtins_register_through_the_same_hooks() -> None:
    plugins = load_plugins(entry_points=False, env=NO_ENV)
    assert plugins.asset_types.names() == ["bess", "ev_charger", "pv", "wind"]
    assert plugins.split_policies.names() == [
        "capacity_weighted",
        "equal",
        "headroom",
        "soc_balancing",
    ]
    assert {"memory", "sqlite"} <= set(plugins.storage_backends.names())
    builtin = [i for i in plugins.info() if i.builtin]
    assert {i.package for i in builtin} == {"der-sdk"}
    assert any("der_asset_types" in i.hooks for i in builtin)


def test_installed_sim_bess_is_found_through_its_entry_point() -> None:
    plugins = load_plugins(env=NO_ENV)
    assert "sim-bess" in plugins.adapter_types
    assert plugins.adapter_types.provider("sim-bess") == "der-sdk-sim-bess"
    row = next(i for i in plugins.info() if i.package == "der-sdk-sim-bess")
    assert row.hooks == ("der_adapter_types",) and not row.builtin


def test_unknown_name_lists_what_is_installed() -> None:
    plugins = load_plugins(entry_points=False, env=NO_ENV)
    with pytest.raises(UnknownNameError, match=r"unknown asset type 'hydro'; installed: bess, "):
        plugins.asset_types.get("hydro")


def test_storage_backend_is_chosen_by_url_scheme() -> None:
    plugins = load_plugins(entry_points=False, env=NO_ENV)
    assert plugins.storage_for_url("sqlite:///x.db").name == "sqlite"
    assert plugins.storage_for_url("memory://").name == "memory"
    with pytest.raises(UnknownNameError, match="unknown storage URL scheme 'redis'"):
        plugins.storage_for_url("redis://localhost")


def test_storage_backend_from_a_plugin_is_found_by_its_scheme() -> None:
    class Scratch:
        @hookimpl
        def der_storage_backends(self) -> list[StorageBackendType]:
            return [
                StorageBackendType(
                    name="scratch", schemes=("scratch",), factory=MemoryStorage.from_url
                )
            ]

    plugins = load_plugins(entry_points=False, extra=[("scratch", Scratch())], env=NO_ENV)
    assert plugins.storage_for_url("scratch://x").name == "scratch"


def test_storage_scheme_claimed_twice_names_both_packages() -> None:
    class Other:
        @hookimpl
        def der_storage_backends(self) -> list[StorageBackendType]:
            return [
                StorageBackendType(
                    name="other-sqlite", schemes=("sqlite",), factory=MemoryStorage.from_url
                )
            ]

    plugins = load_plugins(entry_points=False, extra=[("other", Other())], env=NO_ENV)
    with pytest.raises(PluginError, match=r"duplicate storage scheme 'sqlite'.*der-sdk and other"):
        plugins.storage_backends.names()


def test_device_profiles_registry_returns_versioned_profiles() -> None:
    plugins = load_plugins(entry_points=False, extra=[("acme-pack", Profiles())], env=NO_ENV)
    profile = plugins.device_profiles.get("acme-bess-v2")
    assert (profile.vendor, profile.version, profile.points["mw"].scale) == ("Acme", "2.0.1", 0.001)
    assert plugins.device_profiles.provider("acme-bess-v2") == "acme-pack"


def test_edge_services_registry_builds_services_by_name() -> None:
    plugins = load_plugins(entry_points=False, extra=[("svc", Services())], env=NO_ENV)
    assert isinstance(plugins.edge_services.get("null").factory(None), NullService)  # type: ignore[arg-type]


def test_observer_hooks_reach_every_implementation() -> None:
    seen: list[tuple[str, int]] = []

    class Observer:
        def __init__(self, tag: str) -> None:
            self.tag = tag

        @hookimpl
        def der_telemetry_received(self, samples: Sequence[TelemetrySample]) -> None:
            seen.append((self.tag, len(samples)))

    plugins = load_plugins(
        entry_points=False, extra=[("a", Observer("a")), ("b", Observer("b"))], env=NO_ENV
    )
    sample = TelemetrySample(asset_id="x", site_id="s", ts=utc_now(), mw=0.0)
    plugins.hook.der_telemetry_received(samples=[sample])
    assert sorted(seen) == [("a", 1), ("b", 1)]


def test_duplicate_descriptor_name_names_both_distributions(fake_dist: FakeDist) -> None:
    fake_dist("der-sdk-one", {"one": "plug_one"}, {"plug_one": ADAPTER_PLUGIN.format(name="x")})
    fake_dist("der-sdk-two", {"two": "plug_two"}, {"plug_two": ADAPTER_PLUGIN.format(name="x")})
    plugins = load_plugins(env={"DER_SDK_PLUGINS": "one,two"})
    with pytest.raises(PluginError) as err:
        plugins.adapter_types.names()
    assert "duplicate adapter type 'x'" in str(err.value)
    assert "der-sdk-one" in str(err.value) and "der-sdk-two" in str(err.value)


def test_duplicate_plugin_name_names_both_distributions(fake_dist: FakeDist) -> None:
    fake_dist("der-sdk-one", {"same": "plug_a"}, {"plug_a": ADAPTER_PLUGIN.format(name="a")})
    fake_dist("der-sdk-two", {"same": "plug_b"}, {"plug_b": ADAPTER_PLUGIN.format(name="b")})
    with pytest.raises(PluginError, match=r"der-sdk-(one|two) and der-sdk-(one|two)"):
        load_plugins(env={"DER_SDK_PLUGINS": "same"})


def test_plugin_that_fails_to_import_is_named(fake_dist: FakeDist) -> None:
    fake_dist(
        "der-sdk-broken", {"broken": "plug_broken"}, {"plug_broken": "import nonexistent_mod\n"}
    )
    with pytest.raises(PluginError) as err:
        load_plugins(env={"DER_SDK_PLUGINS": "broken"})
    message = str(err.value)
    assert "'broken'" in message and "der-sdk-broken" in message
    assert "ModuleNotFoundError" in message and "DER_SDK_DISABLE_PLUGINS=broken" in message


def test_block_list_skips_a_broken_plugin(fake_dist: FakeDist) -> None:
    fake_dist("der-sdk-broken", {"broken": "plug_broken"}, {"plug_broken": "raise RuntimeError\n"})
    plugins = load_plugins(env={"DER_SDK_DISABLE_PLUGINS": "broken"})
    assert "broken" not in [i.name for i in plugins.info()]


def test_allow_list_loads_only_named_plugins(fake_dist: FakeDist) -> None:
    fake_dist("der-sdk-one", {"one": "plug_one"}, {"plug_one": ADAPTER_PLUGIN.format(name="x1")})
    plugins = load_plugins(env={"DER_SDK_PLUGINS": "der-sdk-one"})
    assert plugins.adapter_types.names() == ["x1"]  # sim-bess is installed but not allowed


def test_misspelled_hook_fails_check_pending() -> None:
    class Typo:
        @hookimpl
        def der_adapter_type(self) -> list[object]:
            return []

    with pytest.raises(PluginError, match=r"plugin 'typo' .*der_adapter_type"):
        load_plugins(entry_points=False, extra=[("typo", Typo())], env=NO_ENV)


def test_plugin_raising_in_a_registration_hook_is_named() -> None:
    class Exploding:
        @hookimpl
        def der_split_policies(self) -> list[object]:
            raise RuntimeError("boom")

    plugins = load_plugins(entry_points=False, extra=[("exploding", Exploding())], env=NO_ENV)
    with pytest.raises(
        PluginError, match=r"'exploding' .* der_split_policies\(\): RuntimeError: boom"
    ):
        plugins.split_policies.names()


def test_trace_env_prints_hook_calls(capsys: pytest.CaptureFixture[str]) -> None:
    plugins = load_plugins(entry_points=False, env={"DER_SDK_TRACE_PLUGINS": "1"})
    plugins.asset_types.names()
    plugins.hook.der_dispatch_validated(dispatch=None)
    err = capsys.readouterr().err
    assert "der_sdk trace: der_asset_types() <- der_sdk.asset_types (der-sdk)" in err
    assert "der_sdk trace: der_dispatch_validated(dispatch)" in err


def test_registries_are_rebuilt_after_register() -> None:
    plugins = load_plugins(entry_points=False, env=NO_ENV)
    assert "acme-bess-v2" not in plugins.device_profiles
    plugins.register(Profiles(), "acme-pack")
    assert "acme-bess-v2" in plugins.device_profiles
    plugins.unregister("acme-pack")
    assert "acme-bess-v2" not in plugins.device_profiles


def test_adapter_options_struct_is_part_of_the_descriptor() -> None:
    plugins = load_plugins(env=NO_ENV)
    options_type = plugins.adapter_types.get("sim-bess").options
    assert options_type is not None and issubclass(options_type, msgspec.Struct)
    asset = Asset(asset_id="a", site_id="s", name="n", max_mw=1, min_mw=-1)
    assert asset.clamp(5) == 1 and asset.clamp(-5) == -1


class Disconnections:
    """Records the sessions of each ``der_agent_disconnected`` call."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    @hookimpl
    def der_agent_disconnected(self, sessions: Any) -> None:
        self.calls.append(sessions)


def test_notify_sees_plugins_registered_and_unregistered_after_its_first_call() -> None:
    plugins = load_plugins(entry_points=False, env=NO_ENV)
    plugins.notify("der_agent_disconnected", sessions=[])  # no implementation yet
    first, second = Disconnections(), Disconnections()
    plugins.register(first, "first")
    plugins.notify("der_agent_disconnected", sessions=[])
    plugins.register(second, "second")
    plugins.unregister("first")
    plugins.notify("der_agent_disconnected", sessions=[])
    assert len(first.calls) == 1 and len(second.calls) == 1


def test_notify_refuses_a_hook_that_is_not_an_observer() -> None:
    plugins = load_plugins(entry_points=False, env=NO_ENV)
    with pytest.raises(ValueError, match="'der_asset_types' is not an observer hook"):
        plugins.notify("der_asset_types")


def test_a_wrapper_implementation_of_an_observer_hook_is_refused() -> None:
    class Wrapping:
        @hookimpl(wrapper=True)
        def der_dispatch_validated(self, dispatch: Any) -> Any:
            return (yield)

    plugins = load_plugins(entry_points=False, env=NO_ENV)
    with pytest.raises(PluginError, match=r"'wrapping' .*der_dispatch_validated is an observer"):
        plugins.register(Wrapping(), "wrapping")
    assert "wrapping" not in [row.name for row in plugins.info()]


def test_trace_env_prints_observer_calls(capsys: pytest.CaptureFixture[str]) -> None:
    plugins = load_plugins(
        entry_points=False,
        extra=[("recording", Disconnections())],
        env={"DER_SDK_TRACE_PLUGINS": "1"},
    )
    plugins.notify("der_agent_disconnected", sessions=[])
    err = capsys.readouterr().err
    assert "der_sdk trace: der_agent_disconnected(sessions) -> [recording]" in err


def test_an_observer_failing_on_every_call_is_logged_once_then_once_a_minute(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    import der_sdk.plugins as plugins_module

    class Failing:
        @hookimpl
        def der_telemetry_received(self, samples: Sequence[TelemetrySample]) -> None:
            raise RuntimeError(f"boom {len(samples)}")

    plugins = load_plugins(entry_points=False, env={})
    plugins.register(Failing(), "failing", package="der-failing")
    clock = [1000.0]
    monkeypatch.setattr(plugins_module.time, "monotonic", lambda: clock[0])

    with caplog.at_level(logging.ERROR, logger="der.plugins"):
        for _ in range(50):
            plugins.notify("der_telemetry_received", samples=[])
        assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None

        clock[0] += plugins_module.OBSERVER_FAILURE_LOG_S + 1
        plugins.notify("der_telemetry_received", samples=[1, 2])

    assert len(caplog.records) == 2
    again = caplog.records[1]
    assert again.exc_info is None
    assert again.getMessage() == (
        "observer der_telemetry_received of plugin 'failing' (der-failing) raised again, "
        "50 more time(s) in the last 61 s; the latest: RuntimeError: boom 2"
    )
