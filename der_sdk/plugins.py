"""The plugin manager factory and the typed registries built from registration hooks.

Nothing is loaded at import time: :func:`load_plugins` builds a fresh manager, registers the
built-ins (listed in :data:`der_sdk.builtins.BUILTIN_PLUGINS`) through the same hooks as
external plugins, loads the ``der_sdk`` entry point group, and calls ``check_pending()``
so a misspelled hook fails loudly.

Environment:

``DER_SDK_PLUGINS``
    Comma-separated allow list of entry point or distribution names. When set, only these
    external plugins load (built-ins always do, and so do the entry points of the der-sdk
    distribution itself: the reference headend's and agent's ``der`` commands).
``DER_SDK_DISABLE_PLUGINS``
    Comma-separated block list, matched the same way.
``DER_SDK_TRACE_PLUGINS=1``
    Print every hook call, with the plugin that answered, to standard error.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Generic, Protocol, TypeVar

import pluggy

from der_sdk import hookspecs
from der_sdk.errors import PluginError, UnknownNameError
from der_sdk.extensions import (
    AdapterType,
    AssetType,
    BusBackendType,
    CommandType,
    DeviceProfile,
    DeviceSimulatorType,
    EdgeServiceType,
    SplitPolicy,
    StorageBackendType,
)
from der_sdk.programs import ProgramSourceType

__all__ = [
    "ENTRY_POINT_GROUP",
    "CommandRegistry",
    "PluginInfo",
    "Plugins",
    "ProfileRegistry",
    "Registry",
    "hookimpl",
    "load_plugins",
]

ENTRY_POINT_GROUP = "der_sdk"
SDK_DISTRIBUTION = "der-sdk"
hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT_NAME)

log = logging.getLogger("der.plugins")

OBSERVER_FAILURE_LOG_S = 60.0
"""After an observer's failure is logged, further failures of the same hook and plugin
are counted and logged as one line at most this often."""


def _exception_line() -> str:
    """The exception being handled, as one line."""
    exc = sys.exc_info()[1]
    return f"{type(exc).__name__}: {exc}" if exc is not None else "unknown"


_TRUTHY = {"1", "true", "yes", "on"}


class _Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=_Named)


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin as ``der plugins`` and ``GET /plugins`` show it."""

    name: str
    package: str
    version: str
    hooks: tuple[str, ...]
    builtin: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "package": self.package,
            "version": self.version,
            "hooks": list(self.hooks),
            "builtin": self.builtin,
        }


@dataclass(frozen=True)
class _Source:
    package: str
    version: str
    builtin: bool


class Registry(Generic[T]):
    """Descriptors of one hook family, by name, each with the package that provided it."""

    def __init__(self, kind: str, entries: Mapping[str, tuple[T, str]]) -> None:
        self.kind = kind
        self._entries = dict(sorted(entries.items()))

    def get(self, name: str) -> T:
        """The descriptor called ``name``; :class:`UnknownNameError` lists the installed ones."""
        try:
            return self._entries[name][0]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._entries) from None

    def provider(self, name: str) -> str:
        """The distribution that provided ``name``."""
        self.get(name)
        return self._entries[name][1]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return (entry for entry, _ in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


class CommandRegistry(Registry[CommandType]):
    """The ``der`` subcommands, each with its provider: the plugin and its package, since
    one distribution (der-sdk) carries several plugins (``der_sdk_headend``,
    ``der_sdk_agent`` and the built-in ``der_sdk.commands``)."""

    def __init__(
        self, entries: Mapping[str, tuple[CommandType, str]], plugins: Mapping[str, str]
    ) -> None:
        super().__init__("command", entries)
        self._plugins = dict(plugins)

    def plugin(self, name: str) -> str:
        """The name of the plugin that provided command ``name``."""
        self.get(name)
        return self._plugins[name]

    def by_plugin(self) -> dict[str, list[str]]:
        """Plugin name → the commands it provides, sorted."""
        provided: dict[str, list[str]] = {}
        for name in self.names():
            provided.setdefault(self._plugins[name], []).append(name)
        return provided


class ProfileRegistry(Registry[DeviceProfile]):
    """Device profiles by ``name@version``: several versions of one profile coexist.

    A lookup by bare name (``get("acme-b2")``, ``"acme-b2" in registry``) means the highest
    version; ``get("acme-b2@1.0.0")`` or ``get("acme-b2", "1.0.0")`` one exact version.
    Versions are ordered as PEP 440 orders them (:func:`der_sdk.device_packs.version_key`).
    :meth:`names` and iteration go by name, then version ascending, so a dict built by name
    from the registry keeps the highest version of each profile.
    """

    def __init__(self, entries: Mapping[str, tuple[DeviceProfile, str]]) -> None:
        from itertools import pairwise

        from der_sdk.device_packs import VersionKey, version_key

        keyed: list[tuple[tuple[str, VersionKey], str]] = []
        for key, (profile, package) in entries.items():
            try:
                keyed.append(((profile.name, version_key(profile.version)), key))
            except ValueError as exc:
                raise PluginError(
                    f"device profile {profile.name!r} from {package}: version {exc}"
                ) from None
        keyed.sort()
        for (ident, key), (next_ident, next_key) in pairwise(keyed):
            if ident == next_ident:  # "1.0" and "1.0.0" name the same version
                raise PluginError(
                    f"duplicate device profile {key!r} and {next_key!r}: provided by both "
                    f"{entries[key][1]} and {entries[next_key][1]}; uninstall one or block it "
                    "with DER_SDK_DISABLE_PLUGINS"
                )
        super().__init__("device profile", {})
        self._entries = {key: entries[key] for _, key in keyed}

    def _key(self, name: str, version: str | None = None) -> str:
        from der_sdk.device_packs import version_key

        if version is None and "@" in name:
            name, version = name.split("@", 1)
        keys = [key for key, (profile, _) in self._entries.items() if profile.name == name]
        if not keys:
            raise UnknownNameError(self.kind, name, self._entries)
        if version is None:
            return keys[-1]
        try:
            wanted = version_key(version)
        except ValueError:
            wanted = None
        for key in keys:
            if version_key(self._entries[key][0].version) == wanted:
                return key
        raise UnknownNameError(f"version of device profile {name!r}", version, self.versions(name))

    def get(self, name: str, version: str | None = None) -> DeviceProfile:
        """The profile ``name`` (``name@version``), the highest version unless one is given."""
        return self._entries[self._key(name, version)][0]

    def provider(self, name: str, version: str | None = None) -> str:
        """The distribution that provided the profile :meth:`get` returns."""
        return self._entries[self._key(name, version)][1]

    def versions(self, name: str) -> list[str]:
        """The installed versions of profile ``name``, lowest first."""
        return [p.version for p, _ in self._entries.values() if p.name == name]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self._key(name)
        except UnknownNameError:
            return False
        return True


def _env_list(env: Mapping[str, str], key: str) -> set[str] | None:
    raw = env.get(key)
    if raw is None or not raw.strip():
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _normalized(distribution: str) -> str:
    """A distribution name as PEP 503 compares them (``der_sdk`` is ``der-sdk``)."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _sdk_version() -> str:
    try:
        return metadata.version("der-sdk")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


class Plugins:
    """The loaded plugins: the pluggy manager plus typed registries built from its hooks.

    Build one with :func:`load_plugins`. Registries are computed on first use and cached;
    :meth:`register` (for tests and embedding) clears the cache.
    """

    def __init__(self, pm: pluggy.PluginManager, *, trace: bool = False) -> None:
        self.pm = pm
        self._sources: dict[str, _Source] = {}
        self._trace = trace
        self._observers: dict[str, tuple[pluggy.HookImpl, ...]] = {}
        self._observer_failures: dict[tuple[str, str], tuple[float, int]] = {}

    # ---------------------------------------------------------------- registration

    def register(
        self,
        plugin: object,
        name: str,
        *,
        package: str | None = None,
        version: str = "0",
        builtin: bool = False,
    ) -> None:
        """Register ``plugin`` (a module or object with ``@hookimpl`` functions)."""
        existing = self.pm.get_plugin(name)
        if existing is not None:
            other = self._sources.get(name)
            raise PluginError(
                f"plugin name {name!r} is provided by both {other.package if other else '?'} "
                f"and {package or name}; uninstall one or block it with DER_SDK_DISABLE_PLUGINS"
            )
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
            _check_observers_are_plain(self.pm, plugin)
        except pluggy.PluginValidationError as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            raise PluginError(f"plugin {name!r} ({package or name}) is invalid: {exc}") from exc
        self._sources[name] = _Source(package or name, version, builtin)
        self._clear_cache()

    def unregister(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self._sources.pop(name, None)
        self._clear_cache()

    def _clear_cache(self) -> None:
        for attr in (
            "adapter_types",
            "asset_types",
            "split_policies",
            "storage_backends",
            "bus_backends",
            "device_profiles",
            "edge_services",
            "device_simulators",
            "commands",
            "program_sources",
        ):
            self.__dict__.pop(attr, None)
        self._observers.clear()

    @property
    def hook(self) -> Any:
        """The pluggy hook relay. Fire observer hooks with :meth:`notify` instead: a call
        through the relay stops at the first implementation that raises."""
        return self.pm.hook

    # ---------------------------------------------------------------- observers

    def notify(self, hook_name: str, **kwargs: object) -> None:
        """Call every implementation of observer hook ``hook_name``, each on its own.

        One that raises is logged (``der.plugins``) with the hook, the plugin and its
        package, and the others are still called: an exporter or guardrail plugin must
        never stop ingest or dispatch, nor silence another plugin. Implementations run in
        pluggy's order (last registered first, ``tryfirst``/``trylast`` honoured) and get
        only the arguments they name. With ``DER_SDK_TRACE_PLUGINS=1`` each call is traced
        as a call through :attr:`hook` would be.
        """
        impls = self._observers.get(hook_name)
        if impls is None:
            impls = self._observer_impls(hook_name)
        if self._trace:
            _trace_writer(hook_name, impls, kwargs)
        for impl in impls:
            try:
                impl.function(*[kwargs[arg] for arg in impl.argnames])
            except Exception:
                self._observer_failed(hook_name, impl.plugin_name)

    def _observer_failed(self, hook_name: str, plugin_name: str) -> None:
        """Log an observer's failure: the first with its traceback, then at most one line
        per :data:`OBSERVER_FAILURE_LOG_S` with how many more there were, because an
        observer that keeps failing fails on every storage write."""
        key = (hook_name, plugin_name)
        now = time.monotonic()
        last = self._observer_failures.get(key)
        if last is not None and now - last[0] < OBSERVER_FAILURE_LOG_S:
            self._observer_failures[key] = (last[0], last[1] + 1)
            return
        self._observer_failures[key] = (now, 0)
        source = self._sources.get(plugin_name)
        package = source.package if source else plugin_name
        if last is None or not last[1]:
            log.exception(
                "observer %s of plugin %r (%s) raised; the other observers were called "
                "and the caller carries on",
                hook_name,
                plugin_name,
                package,
            )
        else:
            log.error(
                "observer %s of plugin %r (%s) raised again, %d more time(s) in the last "
                "%.0f s; the latest: %s",
                hook_name,
                plugin_name,
                package,
                last[1] + 1,
                now - last[0],
                _exception_line(),
            )

    def _observer_impls(self, hook_name: str) -> tuple[pluggy.HookImpl, ...]:
        """The implementations of ``hook_name`` in call order, kept until the next
        :meth:`register` or :meth:`unregister`."""
        if hook_name not in hookspecs.OBSERVER_HOOKS:
            observers = ", ".join(hookspecs.OBSERVER_HOOKS)
            raise ValueError(f"{hook_name!r} is not an observer hook; one of {observers}")
        impls = tuple(reversed(getattr(self.pm.hook, hook_name).get_hookimpls()))
        self._observers[hook_name] = impls
        return impls

    # ---------------------------------------------------------------- registries

    def _collect(
        self,
        hook_name: str,
        kind: str,
        key: Callable[[Any], str] | None = None,
        *,
        by_plugin: dict[str, str] | None = None,
    ) -> dict[str, tuple[Any, str]]:
        """Merge the descriptors of every plugin by ``key`` (default: the ``name``).

        :param by_plugin: when given, filled with the plugin that provided each name, and
            providers are shown as ``plugin (package)`` where the two differ.
        """
        caller = getattr(self.pm.hook, hook_name)
        found: dict[str, tuple[Any, str]] = {}
        # pluggy calls last-registered first; walk in registration order so errors and
        # traces read naturally. The result does not depend on the order.
        for impl in caller.get_hookimpls():
            source = self._sources.get(impl.plugin_name)
            package = source.package if source else impl.plugin_name
            if by_plugin is not None and impl.plugin_name != package:
                package = f"{impl.plugin_name} ({package})"
            try:
                result = impl.function()
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} ({package}) failed in {hook_name}(): "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if self._trace:
                names = [getattr(d, "name", "?") for d in result or ()]
                print(
                    f"der_sdk trace: {hook_name}() <- {impl.plugin_name} ({package}): {names}",
                    file=sys.stderr,
                )
            for descriptor in result or ():
                name = getattr(descriptor, "name", None)
                if not isinstance(name, str) or not name:
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} ({package}) returned a {kind} "
                        f"without a name from {hook_name}()"
                    )
                ident = key(descriptor) if key is not None else name
                if ident in found:
                    raise PluginError(
                        f"duplicate {kind} {ident!r}: provided by both {found[ident][1]} "
                        f"and {package}; uninstall one or block it with DER_SDK_DISABLE_PLUGINS"
                    )
                found[ident] = (descriptor, package)
                if by_plugin is not None:
                    by_plugin[ident] = impl.plugin_name
        return found

    @cached_property
    def adapter_types(self) -> Registry[AdapterType]:
        return Registry("adapter type", self._collect("der_adapter_types", "adapter type"))

    @cached_property
    def asset_types(self) -> Registry[AssetType]:
        return Registry("asset type", self._collect("der_asset_types", "asset type"))

    @cached_property
    def split_policies(self) -> Registry[SplitPolicy]:
        return Registry("split policy", self._collect("der_split_policies", "split policy"))

    def _by_scheme(self, hook_name: str, family: str) -> Registry[Any]:
        """A registry of backends chosen by URL scheme: a name or a scheme claimed by two
        backends is an error that names both packages.

        :param family: what the backends are for (``storage``, ``bus``), for messages.
        """
        kind = f"{family} backend"
        entries = self._collect(hook_name, kind)
        by_scheme: dict[str, str] = {}
        for name, (backend, package) in entries.items():
            for scheme in backend.schemes:
                if scheme in by_scheme:
                    raise PluginError(
                        f"duplicate {family} scheme {scheme!r}: provided by both "
                        f"{entries[by_scheme[scheme]][1]} and {package}"
                    )
                by_scheme[scheme] = name
        return Registry(kind, entries)

    @cached_property
    def storage_backends(self) -> Registry[StorageBackendType]:
        return self._by_scheme("der_storage_backends", "storage")

    @cached_property
    def bus_backends(self) -> Registry[BusBackendType]:
        return self._by_scheme("der_bus_backends", "bus")

    @cached_property
    def device_profiles(self) -> ProfileRegistry:
        return ProfileRegistry(
            self._collect(
                "der_device_profiles", "device profile", key=lambda p: f"{p.name}@{p.version}"
            )
        )

    def profile(self, name: str, version: str | None = None) -> DeviceProfile:
        """Device profile ``name``: the highest installed version unless ``version`` is given.

        :raises UnknownNameError: no such profile, or not in that version; the message
            lists what is installed.
        """
        return self.device_profiles.get(name, version)

    @cached_property
    def edge_services(self) -> Registry[EdgeServiceType]:
        return Registry("edge service", self._collect("der_edge_services", "edge service"))

    @cached_property
    def program_sources(self) -> Registry[ProgramSourceType]:
        return Registry("program source", self._collect("der_program_sources", "program source"))

    @cached_property
    def device_simulators(self) -> Registry[DeviceSimulatorType]:
        return Registry(
            "device simulator", self._collect("der_device_simulators", "device simulator")
        )

    @cached_property
    def commands(self) -> CommandRegistry:
        by_plugin: dict[str, str] = {}
        entries = self._collect("der_commands", "command", by_plugin=by_plugin)
        return CommandRegistry(entries, by_plugin)

    def storage_for_url(self, url: str) -> StorageBackendType:
        """The backend whose scheme matches ``url`` (``sqlite:///x.db`` → ``sqlite``)."""
        return _for_url(self.storage_backends, url, "storage URL scheme")

    def bus_for_url(self, url: str) -> BusBackendType:
        """The bus backend whose scheme matches ``url`` (``nats://host:4222`` → ``nats``)."""
        return _for_url(self.bus_backends, url, "bus URL scheme")

    # ---------------------------------------------------------------- introspection

    def info(self) -> list[PluginInfo]:
        """Every registered plugin with its package, version and implemented hooks."""
        rows: list[PluginInfo] = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            hooks = sorted(caller.name for caller in (self.pm.get_hookcallers(plugin) or ()))
            source = self._sources.get(name, _Source(name, "0", False))
            rows.append(
                PluginInfo(name, source.package, source.version, tuple(hooks), source.builtin)
            )
        rows.sort(key=lambda r: (r.builtin, r.package, r.name))
        return rows

    def versions(self) -> dict[str, str]:
        """Distribution name → version for every external plugin (sent in Register)."""
        return {i.package: i.version for i in self.info() if not i.builtin}


class _SchemeBackend(_Named, Protocol):
    @property
    def schemes(self) -> tuple[str, ...]: ...


B = TypeVar("B", bound=_SchemeBackend)


def _for_url(registry: Registry[B], url: str, kind: str) -> B:
    """The backend of ``registry`` whose schemes include the scheme of ``url``."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    for backend in registry:
        if scheme in backend.schemes:
            return backend
    schemes = sorted(s for b in registry for s in b.schemes)
    raise UnknownNameError(kind, scheme or url, schemes)


def _check_observers_are_plain(pm: pluggy.PluginManager, plugin: object) -> None:
    """Refuse a wrapper implementation of an observer hook: :meth:`Plugins.notify` calls
    each implementation on its own, so there is no call for a wrapper to wrap."""
    for caller in pm.get_hookcallers(plugin) or ():
        if caller.name not in hookspecs.OBSERVER_HOOKS:
            continue
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper):
                raise pluggy.PluginValidationError(
                    plugin,
                    f"{caller.name} is an observer hook: implement it as a plain function, "
                    "not a wrapper",
                )


def _trace_writer(hook_name: str, hook_impls: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    names = ", ".join(impl.plugin_name for impl in hook_impls)
    print(f"der_sdk trace: {hook_name}({', '.join(kwargs)}) -> [{names}]", file=sys.stderr)


def load_plugins(
    *,
    entry_points: bool = True,
    extra: Sequence[tuple[str, object]] = (),
    env: Mapping[str, str] | None = None,
    on_error: Callable[[PluginError], None] | None = None,
) -> Plugins:
    """Build the plugin manager: built-ins, then the ``der_sdk`` entry points, then ``extra``.

    :param entry_points: load installed plugins (off in some tests).
    :param extra: ``(name, plugin)`` pairs to register as well.
    :param env: the environment to read allow/block lists and tracing from.
    :param on_error: when given, an installed plugin that fails to import or register is
        passed to it as a :class:`PluginError` and skipped, instead of raised (the ``der``
        command builds its parser this way, so one broken plugin does not take every
        command down; the command that loads the plugins then reports it).
    :raises PluginError: a plugin failed to import, clashed by name, or is invalid; the
        message names it and its distribution.
    """
    from der_sdk.builtins import BUILTIN_PLUGINS

    env = os.environ if env is None else env
    trace = env.get("DER_SDK_TRACE_PLUGINS", "").strip().lower() in _TRUTHY
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    plugins = Plugins(pm, trace=trace)
    if trace:
        pm.add_hookcall_monitoring(_trace_writer, lambda *args: None)

    sdk_version = _sdk_version()
    for module_name in BUILTIN_PLUGINS:
        module = importlib.import_module(module_name)
        plugins.register(module, module_name, package="der-sdk", version=sdk_version, builtin=True)

    if entry_points:
        allow = _env_list(env, "DER_SDK_PLUGINS")
        block = _env_list(env, "DER_SDK_DISABLE_PLUGINS") or set()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist_name = ep.dist.name if ep.dist is not None else "<unknown distribution>"
            dist_version = ep.dist.version if ep.dist is not None else "0"
            keys = {ep.name, dist_name}
            # the headend and agent ship in der-sdk: they load like built-ins
            own = _normalized(dist_name) == SDK_DISTRIBUTION
            if allow is not None and not own and not keys & allow:
                continue
            if keys & block:
                continue
            try:
                try:
                    obj = ep.load()
                except Exception as exc:
                    raise PluginError(
                        f"plugin {ep.name!r} from distribution {dist_name} {dist_version} "
                        f"failed to import ({ep.value}): {type(exc).__name__}: {exc}. Fix or "
                        f"uninstall it, or skip it with DER_SDK_DISABLE_PLUGINS={ep.name}"
                    ) from exc
                plugins.register(obj, ep.name, package=dist_name, version=dist_version, builtin=own)
            except PluginError as exc:
                if on_error is None:
                    raise
                on_error(exc)

    for name, plugin in extra:
        plugins.register(plugin, name, package=name)
    return plugins
