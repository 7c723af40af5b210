"""What plugins provide: the typed descriptors returned by the registration hooks, and the
interfaces of the objects those descriptors create.

Registration hooks are synchronous and cheap; I/O lives on the objects they return, whose
methods are ``async``. Every descriptor has a ``name``; a registry rejects duplicate names
and names both providing packages.
"""

from __future__ import annotations

import abc
import argparse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from der_sdk.control import DEFAULT_CONTROL, ControlModel, SplitContext
from der_sdk.models import Asset, TelemetrySample

if TYPE_CHECKING:
    from der_sdk.bus.contract import BusOptions, MessageBus
    from der_sdk.storage.contract import StorageBackend

__all__ = [
    "Adapter",
    "AdapterContext",
    "AdapterType",
    "AssetType",
    "BusBackendType",
    "CommandType",
    "ConditionReporter",
    "ConditionSeverity",
    "DevicePoint",
    "DeviceProfile",
    "DeviceSimulatorType",
    "EdgeService",
    "EdgeServiceContext",
    "EdgeServiceType",
    "ExportBatch",
    "Exporter",
    "ExporterContext",
    "ExporterType",
    "LocalDispatch",
    "NoConditions",
    "SetpointResult",
    "SplitPolicy",
    "SplitResult",
    "StorageBackendType",
]


# --------------------------------------------------------------------------- adapters


class SetpointResult(msgspec.Struct, frozen=True, kw_only=True):
    """What an adapter did with a setpoint. ``applied_mw`` is after any clamping."""

    status: Literal["applied", "rejected", "failed"]
    applied_mw: float | None = None
    reason: str | None = None


ConditionSeverity = Literal["info", "warning", "major", "critical"]
"""How serious a device condition is, from ``info`` to ``critical``."""


class ConditionReporter(abc.ABC):
    """Where an adapter reports its device's conditions: a trip, a fault, a stop.

    A condition is identified by its ``code`` (``"inverter_trip"``) and is either active
    or not. Both methods are synchronous and cheap (they queue; they never block or do
    I/O) and idempotent per code: raising a code that is already active does nothing,
    nor does clearing one that is not. Call them from any adapter method, on the event
    loop. The agent's reporter records each change as a durable event of kind
    ``condition_raised`` or ``condition_cleared`` for the asset, which the headend
    stores and shows in ``GET /events``.
    """

    @abc.abstractmethod
    def raise_condition(self, code: str, severity: ConditionSeverity, text: str) -> None:
        """Report that condition ``code`` is now active; ``text`` says what happened."""

    @abc.abstractmethod
    def clear_condition(self, code: str, text: str = "") -> None:
        """Report that condition ``code`` is over; ``text`` may say how it ended."""


class NoConditions(ConditionReporter):
    """A reporter that drops everything: the default of :class:`AdapterContext`, so code
    that builds a context by hand (tests, tools) need not provide one."""

    def raise_condition(self, code: str, severity: ConditionSeverity, text: str) -> None:
        """Drop it."""

    def clear_condition(self, code: str, text: str = "") -> None:
        """Drop it."""


@dataclass(frozen=True, kw_only=True)
class AdapterContext:
    """Everything an adapter factory gets: the asset, its validated options, the
    installed device profiles for adapters that are profile-driven, keyed by
    ``name@version`` and by ``name`` (the highest version of that name), and where to
    report the device's conditions (:class:`ConditionReporter`; the agent gives each
    asset its own, by default they are dropped)."""

    asset: Asset
    options: Any
    profiles: Mapping[str, DeviceProfile] = field(default_factory=dict)
    conditions: ConditionReporter = field(default_factory=NoConditions)


class Adapter(abc.ABC):
    """A connection to one device. The agent owns its lifecycle:

    ``connect()`` once before the first read (and again after ``close()`` on reconnect),
    ``read()`` every telemetry interval, ``apply_setpoint()`` on each dispatch for the
    asset, ``close()`` at shutdown. Methods must not block the event loop. ``read()`` must
    never report a stale value with a fresh timestamp: on a fault it returns a sample with
    ``quality="bad"`` and a ``quality_reason``.
    """

    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def read(self) -> TelemetrySample: ...

    def read_nowait(self) -> TelemetrySample | None:
        """The sample :meth:`read` would return now without waiting for anything (an
        adapter that polls on its own has its newest poll ready), else ``None``.

        Optional, for adapters read by the thousand: the agent calls it first each tick
        and calls :meth:`read` (in a task of its own, with its timeout) only when it
        returns ``None``, which the default always does. It must not block, and it counts
        as a read: a sample it returns is not returned by :meth:`read` again.
        """
        return None

    @abc.abstractmethod
    async def apply_setpoint(self, mw: float, duration_s: float | None = None) -> SetpointResult:
        """Command ``mw`` (already clamped to the asset's limits by the agent)."""

    @abc.abstractmethod
    async def close(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class AdapterType:
    """A kind of device adapter, chosen by ``name`` in the agent config.

    ``options`` is a msgspec Struct type describing the per-asset options (``None``: the
    adapter takes none); the agent validates each asset's options against it at load time.
    """

    name: str
    factory: Callable[[AdapterContext], Adapter]
    options: type[msgspec.Struct] | None = None
    description: str = ""


# --------------------------------------------------------------------------- asset types


@dataclass(frozen=True, kw_only=True)
class AssetType:
    """An asset type and the schema of its telemetry ``details``.

    ``details`` is a msgspec Struct type whose fields are all optional; receivers validate
    known fields and keep unknown ones (schema evolution).

    ``control`` says what a dispatch's MW means for the type (a signed setpoint, an export
    limit, an import limit) and the range an asset of the type can take now
    (:class:`~der_sdk.control.ControlModel`, ``docs/asset_types.md``). Default: a signed
    setpoint within the inventory limits.
    """

    name: str
    details: type[msgspec.Struct]
    description: str = ""
    control: ControlModel = DEFAULT_CONTROL


# --------------------------------------------------------------------------- split policies


class SplitResult(msgspec.Struct, frozen=True, kw_only=True):
    """A site target split into per-asset shares.

    ``shares`` maps asset id to MW, ordered by asset id, every share within the asset's
    range (``[min_mw, max_mw]`` of the assets given, which for a site dispatch is the
    available range now). ``unallocated_mw`` is the part of the target no asset could take
    (``target - sum(shares)``); it is 0 whenever the target is feasible.
    """

    shares: dict[str, float]
    unallocated_mw: float = 0.0


@dataclass(frozen=True, kw_only=True)
class SplitPolicy:
    """A named, pure, deterministic way to split a site target across its assets.

    ``split(target_mw, assets)`` gets the site's assets sorted by id, each with
    ``min_mw``/``max_mw`` set to its *available range now* (cut to its control kind's
    sign, narrowed by its latest telemetry), so a policy that keeps within them never asks
    PV to consume, a charger to export or a battery for more energy than it has.

    ``split_in_context(target_mw, context)``, optional, is called instead when given: the
    :class:`~der_sdk.control.SplitContext` adds each asset's control kind, the basis of its
    range, its latest sample (``soc_pct``) and the dispatch's ``duration_s``.

    Either way the caller (:func:`der_sdk.split.split_site`) clamps each share into the
    available range, shares again what a clamp left, and reports the rest unallocated.
    """

    name: str
    split: Callable[[float, Sequence[Asset]], SplitResult]
    description: str = ""
    split_in_context: Callable[[float, SplitContext], SplitResult] | None = None


# --------------------------------------------------------------------------- storage


@dataclass(frozen=True, kw_only=True)
class StorageBackendType:
    """A storage backend, chosen by the URL scheme of ``DATABASE_URL``.

    ``factory`` receives the whole URL and returns an unopened backend.
    """

    name: str
    schemes: tuple[str, ...]
    factory: Callable[[str], StorageBackend]
    description: str = ""


# --------------------------------------------------------------------------- message buses


@dataclass(frozen=True, kw_only=True)
class BusBackendType:
    """A message bus backend for multi-replica headends, chosen by the scheme of its URL.

    ``factory(url, options)`` receives the whole URL (where and how to connect) and the
    :class:`~der_sdk.bus.contract.BusOptions` (namespace and limits, chosen by the caller)
    and returns an unconnected :class:`~der_sdk.bus.contract.MessageBus`. It must not do
    I/O: the caller awaits ``connect()``. A URL the backend cannot use raises
    :class:`~der_sdk.errors.DerSdkError` naming the parameter.
    """

    name: str
    schemes: tuple[str, ...]
    factory: Callable[[str, BusOptions], MessageBus]
    description: str = ""


# --------------------------------------------------------------------------- device profiles


class DevicePoint(msgspec.Struct, frozen=True, kw_only=True):
    """One point of a device: where it lives and what it means.

    ``address`` is protocol specific (a register number, a node id). ``field`` names the
    telemetry field it feeds (``mw``, or ``details.soc_pct``); ``extra`` keeps the
    protocol's own settings (data type, word order, scale register...).
    """

    address: str | int
    unit: str | None = None
    scale: float = 1.0
    access: Literal["r", "w", "rw"] = "r"
    field: str | None = None
    extra: dict[str, Any] = msgspec.field(default_factory=dict)


class DeviceProfile(msgspec.Struct, frozen=True, kw_only=True):
    """A versioned description of one device model, usually shipped in a device pack."""

    name: str
    vendor: str
    model: str
    version: str
    protocol: str
    points: dict[str, DevicePoint] = msgspec.field(default_factory=dict)


# --------------------------------------------------------------------------- edge services


LocalDispatch = Callable[[str | None, str | None, float, float | None], Awaitable[Any]]
"""``dispatch(asset_id, site_id, mw, duration_s)``: send a local command down the agent's
dispatch path (validation, clamp, split) as if it came from the headend."""


@dataclass(frozen=True, kw_only=True)
class EdgeServiceContext:
    """What an edge service gets: who the agent is, what it serves, its options, and the
    agent's local dispatch path."""

    agent_id: str
    site_id: str
    assets: Sequence[Asset]
    options: Any
    dispatch: LocalDispatch


class EdgeService(abc.ABC):
    """A long-running service inside the agent (for example an OPC UA server for SCADA).

    ``start()`` is awaited after the adapters connect, ``stop()`` at shutdown.
    ``on_telemetry()`` is called with every batch the agent reads; it must be cheap and
    must not block (queue work for a task of your own).
    """

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    def on_telemetry(self, samples: Sequence[TelemetrySample]) -> None:  # noqa: B027
        """Default: ignore telemetry."""


@dataclass(frozen=True, kw_only=True)
class EdgeServiceType:
    """A named edge service, enabled in the agent config under ``edge_services``."""

    name: str
    factory: Callable[[EdgeServiceContext], EdgeService]
    options: type[msgspec.Struct] | None = None
    description: str = ""


# --------------------------------------------------------------------------- exporters


@dataclass(frozen=True, kw_only=True)
class ExportBatch:
    """Samples a continuous exporter is given, in storage order (docs/export.md).

    ``batch_id`` is the same whenever the same batch is given again: a batch whose
    export or cursor save did not complete (the exporter raised, the headend stopped) is
    given again with the same id, starting with the same samples (it may end with samples
    stored since), so an exporter that writes it under that id, replacing what it wrote
    before (a file name, a key its target deduplicates by), stores every sample exactly
    once. It holds hexadecimal digits only.
    """

    samples: Sequence[TelemetrySample]
    batch_id: str
    cursor: str
    """Where the next batch starts: stored as the exporter's cursor once ``export``
    returns."""


@dataclass(frozen=True, kw_only=True)
class ExporterContext:
    """What the headend gives an exporter's factory.

    ``name`` is the instance's name in ``HEADEND_EXPORTERS`` (also the key of its cursor
    in storage); ``options`` are its ``HEADEND_EXPORTER_<NAME>_<OPTION>`` variables, by
    lower-case option name (``dir``); ``asset_types`` the installed asset types (for the
    ``details`` columns); ``asset_type_of`` each inventory asset's type by asset id.
    """

    name: str
    options: Mapping[str, str]
    asset_types: Sequence[AssetType] = ()
    asset_type_of: Mapping[str, str] = field(default_factory=dict)

    def variable(self, option: str) -> str:
        """The environment variable of ``option``, for error messages."""
        instance = self.name.upper().replace("-", "_")
        return f"HEADEND_EXPORTER_{instance}_{option.upper()}"


class Exporter(abc.ABC):
    """A continuous exporter the headend runs (made by :class:`ExporterType.factory`).

    ``start()`` is awaited once before the first batch and ``stop()`` once at shutdown;
    ``export()`` is awaited with one batch at a time. When it raises, the headend logs
    it with the exporter's name and gives the same batch again after a pause, so an
    exporter whose target is down catches up when it is back.
    """

    async def start(self) -> None:  # noqa: B027 - optional
        """Default: nothing to connect."""

    @abc.abstractmethod
    async def export(self, batch: ExportBatch) -> None: ...

    async def stop(self) -> None:  # noqa: B027 - optional
        """Default: nothing to close."""


@dataclass(frozen=True, kw_only=True)
class ExporterType:
    """A named continuous exporter, chosen in ``HEADEND_EXPORTERS``.

    ``factory(context)`` returns an unstarted :class:`Exporter`; it checks the options
    and raises :class:`~der_sdk.errors.DerSdkError` naming the variable
    (:meth:`ExporterContext.variable`) for a bad or missing one.
    """

    name: str
    factory: Callable[[ExporterContext], Exporter]
    description: str = ""


# --------------------------------------------------------------------------- device simulators


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """Default for ``add_arguments`` of :class:`DeviceSimulatorType` and
    :class:`CommandType`: no options."""


@dataclass(frozen=True, kw_only=True)
class DeviceSimulatorType:
    """A simulated device that ``der sim NAME`` runs, for trying adapters without hardware.

    ``add_arguments(parser)`` adds the simulator's command-line options to its
    ``argparse`` parser; ``run(args)`` serves the simulated device until it is cancelled
    (``der sim`` cancels it on Ctrl-C or SIGTERM).
    """

    name: str
    run: Callable[[argparse.Namespace], Awaitable[None]]
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    description: str = ""


# --------------------------------------------------------------------------- der commands


@dataclass(frozen=True, kw_only=True)
class CommandType:
    """A subcommand of the ``der`` command line: ``der NAME [options]``.

    ``der`` adds a parser called ``name`` with ``help`` (its line in ``der --help``),
    ``description`` (the top of ``der NAME --help``) and ``add_help``, then calls
    ``add_arguments(parser)`` to add the command's options (or its own subcommands; a
    subparser may set ``func`` with ``set_defaults`` to take over from ``run``). ``der NAME``
    calls ``run(args)`` and exits with the number it returns.

    ``run`` is synchronous: start an event loop inside it (:func:`der_sdk.cli.run_async`)
    for async work. It raises :class:`~der_sdk.errors.ConfigError` or
    :class:`~der_sdk.errors.DerSdkError` for a user's mistake: ``der`` prints the message
    (no traceback) and exits 2. Import heavy modules inside ``run``, not at the top of the
    plugin, so ``der --help`` stays quick.
    """

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    description: str = ""
    add_help: bool = True
