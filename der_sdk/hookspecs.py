"""Every hook of der-sdk, in one module, grouped by stage.

Hooks are synchronous and cheap. Registration hooks return a list of typed descriptors
(see :mod:`der_sdk.extensions`); the registry merges the lists of all plugins and fails
on a duplicate ``name``, naming both providing packages. Backends, adapters and policies
are then chosen by configured name, never by hook order. Observer hooks return nothing;
every implementation is called.

Implement a hook with ``from der_sdk import hookimpl``. Hooks change only by adding
arguments; an implementation may accept fewer arguments than the spec declares.
"""

from __future__ import annotations

from collections.abc import Sequence

import pluggy

from der_sdk.extensions import (
    AdapterType,
    AssetType,
    BusBackendType,
    CommandType,
    DeviceProfile,
    DeviceSimulatorType,
    EdgeServiceType,
    ExporterType,
    SplitPolicy,
    StorageBackendType,
)
from der_sdk.models import Alarm, Asset, Dispatch, Session, TelemetrySample
from der_sdk.programs import ProgramSourceType

PROJECT_NAME = "der_sdk"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)

# =========================================================================== registration
# Called once, when a registry is first used (the agent or headend starting, `der plugins`).


@hookspec
def der_adapter_types() -> list[AdapterType]:
    """Device adapter kinds this plugin provides.

    Called by the agent when it builds its adapters, and by ``der plugins``.

    :return: a list of :class:`~der_sdk.extensions.AdapterType`; the agent config selects
        one per asset by ``name`` (for example ``sim-bess`` or ``modbus``).

    All results are merged; a duplicate name is an error. Since 0.1.
    """
    raise NotImplementedError


@hookspec
def der_asset_types() -> list[AssetType]:
    """Asset types and the schema of their telemetry ``details``.

    Called by the inventory loader (an asset's ``asset_type`` must be installed), by the
    headend when it validates telemetry ``details``, and by the headend and the agent for
    the type's control model (``AssetType.control``: what a dispatch's MW means, the range
    an asset can take now) when they check, clamp and split dispatches.

    :return: a list of :class:`~der_sdk.extensions.AssetType`. Built-ins: ``bess``, ``pv``,
        ``wind``, ``ev_charger``.

    All results are merged; a duplicate name is an error. Since 0.1; ``control`` since 0.2
    (optional: a type without it is a setpoint within its limits).
    """
    raise NotImplementedError


@hookspec
def der_split_policies() -> list[SplitPolicy]:
    """Named policies that split a site target across the site's assets.

    Called by the agent for a site dispatch (policy chosen in the agent config) and by the
    headend to plan a site dispatch (the request's ``policy``, the site's ``split_policy``
    or ``SPLIT_POLICY``), through :func:`der_sdk.split.split_site`: each asset's limits are
    its available range now, and the result is clamped and redistributed within them.

    :return: a list of :class:`~der_sdk.extensions.SplitPolicy`. Built-ins:
        ``capacity_weighted`` (the default), ``equal``, ``headroom``, ``soc_balancing``. A
        policy must be pure and deterministic, keep each share within ``[min_mw, max_mw]``
        and report what it cannot place; ``split_in_context`` (optional) also gets a
        :class:`~der_sdk.control.SplitContext` (kinds, latest samples, duration).

    All results are merged; a duplicate name is an error. Since 0.1; ``split_in_context``
    since 0.2.
    """
    raise NotImplementedError


@hookspec
def der_storage_backends() -> list[StorageBackendType]:
    """Storage backends, selected by the URL scheme of ``DATABASE_URL``.

    Called by the headend at start.

    :return: a list of :class:`~der_sdk.extensions.StorageBackendType`. Built-ins:
        ``memory`` (``memory://``) and ``sqlite`` (``sqlite:///PATH``).

    All results are merged; a duplicate name or scheme is an error. Since 0.1.
    """
    raise NotImplementedError


@hookspec
def der_bus_backends() -> list[BusBackendType]:
    """Message bus backends for several headend replicas, selected by URL scheme.

    Called when a bus is opened for a URL (:func:`der_sdk.bus.open_bus`), and by
    ``der plugins``. The bus carries what replicas share: commands to the replica that
    holds an agent's stream, presence, the durable telemetry stream and fan-out; its
    contract is :class:`der_sdk.bus.MessageBus`, checked by
    :class:`der_sdk.testing.BusConformance`.

    :return: a list of :class:`~der_sdk.extensions.BusBackendType`. Built-in: ``memory``
        (``memory://NAME``: buses with the same URL in one process share one in-process
        broker; for tests). The ``der-sdk-nats`` plugin adds ``nats://`` (NATS JetStream).

    All results are merged; a duplicate name or scheme is an error that names both
    packages. Since 0.1.
    """
    raise NotImplementedError


@hookspec
def der_device_profiles() -> list[DeviceProfile]:
    """Device profiles (register or node maps) from device packs.

    Called by the agent when it builds profile-driven adapters, and by ``der plugins``.

    :return: a list of :class:`~der_sdk.extensions.DeviceProfile`, looked up by
        ``name@version`` (a bare ``name`` means its highest version).

    All results are merged; the same name and version from two packages is an error that
    names both. Since 0.1.
    """
    raise NotImplementedError


@hookspec
def der_edge_services() -> list[EdgeServiceType]:
    """Services the agent can run beside its adapters (for example an OPC UA server).

    Called by the agent at start; a service runs only when enabled in the agent config.

    :return: a list of :class:`~der_sdk.extensions.EdgeServiceType`.

    All results are merged; a duplicate name is an error. Since 0.1.
    """
    raise NotImplementedError


@hookspec
def der_exporters() -> list[ExporterType]:
    """Continuous exporters of telemetry (to a historian, a data lake, files).

    Called by the headend at start, when ``HEADEND_EXPORTERS`` names instances to run,
    and by ``der plugins``. The headend runs each instance from a durable cursor in
    storage: it reads the samples stored after the cursor in storage order
    (:meth:`~der_sdk.storage.contract.StorageBackend.telemetry_changes`), awaits
    ``export(batch)`` on the :class:`~der_sdk.extensions.Exporter` the factory made, and
    stores the batch's cursor once it returns. An exporter that was down (or the headend
    stopped) resumes from its cursor: no sample is skipped, and a batch that was not
    confirmed comes again under the same ``batch_id`` (docs/export.md). In a cluster an
    instance runs on one replica at a time, the one holding its lease in storage
    (:meth:`~der_sdk.storage.contract.StorageBackend.exporter_lease`): the factory is
    called on every replica, ``start()`` only where it runs.

    :return: a list of :class:`~der_sdk.extensions.ExporterType`. Built-in:
        ``parquet-folder`` (Parquet files by day and site under a folder).

    All results are merged; a duplicate name is an error that names both packages.
    Since 0.4.
    """
    raise NotImplementedError


@hookspec
def der_program_sources() -> list[ProgramSourceType]:
    """Northbound program sources (IEEE 2030.5, OpenADR...) that turn a utility's or
    market operator's controls into scheduled dispatches (``docs/programs.md``).

    Called by the headend at start, when it reads the ``programs:`` section of its
    inventory (each entry names a source by ``name``), and by ``der plugins``. The headend
    validates each program's ``options`` into the descriptor's ``options`` Struct, builds
    the source with ``factory(context, options)`` and runs it as a supervised task.

    :return: a list of :class:`~der_sdk.programs.ProgramSourceType`.

    All results are merged; a duplicate name is an error that names both packages.
    Since 0.3.
    """
    raise NotImplementedError


# =========================================================================== tools
# Called by the `der` command line, never by the agent or the headend.


@hookspec
def der_device_simulators() -> list[DeviceSimulatorType]:
    """Simulated devices that ``der sim NAME`` can run (for example a Modbus server).

    Called by ``der sim`` (which lists them under ``der sim --help``) and by
    ``der plugins``.

    :return: a list of :class:`~der_sdk.extensions.DeviceSimulatorType`; ``der sim NAME``
        builds a parser with ``add_arguments``, then awaits ``run(args)`` until Ctrl-C.

    All results are merged; a duplicate name is an error. Since 0.1.
    """
    raise NotImplementedError


@hookspec
def der_commands() -> list[CommandType]:
    """Subcommands of the ``der`` command line (``der headend``, ``der tokens``...).

    Called once by ``der`` when it builds its parser, before it reads the command line,
    so ``der --help`` lists every installed command; also by ``der plugins``. The
    reference headend (``headend``, ``tokens``, ``demo``) and agent (``agent``,
    ``launch``) register theirs through this hook from the ``der_sdk`` entry point group,
    as any plugin can; der-sdk's own commands (``plugins``, ``profiles``,
    ``new-adapter``, ``check-config``, ``sim``, ``certs``) come from a built-in plugin.

    :return: a list of :class:`~der_sdk.extensions.CommandType`; ``der NAME`` runs the one
        called ``NAME``. Keep this hook cheap: import what a command needs inside its
        ``run``.

    All results are merged; a duplicate name is an error that names both providers.
    Since 0.1.
    """
    raise NotImplementedError


# =========================================================================== observers
# Called by the headend as things happen, through ``Plugins.notify``: every implementation
# is called on its own, and one that raises is logged with its plugin's name and package
# while the others are still called. Return values are ignored. Keep them cheap: they run
# on the event loop (hand slow work to a task).


@hookspec
def der_telemetry_received(samples: Sequence[TelemetrySample]) -> None:
    """Telemetry was stored: called once per storage write, after it committed.

    The headend's ingest writer merges the queued batches of one or more agents into one
    write (up to 5,000 samples, or one larger batch alone) and calls this hook after the storage
    backend committed it and before the agents' batches are acknowledged. A sample that
    does not decode or names an asset its stream does not serve is not stored and not
    passed here; a sample whose ``details`` had a bad field is passed with that field
    dropped and its ``quality`` downgraded to ``uncertain``. A batch the agent sends again
    after a lost acknowledgement is stored idempotently and passed again.

    :param samples: the samples of one write, batch after batch in the order they were
        queued; writes can finish out of order, so do not rely on order across calls.

    For exporters and live dashboards. Since 0.1.
    """


@hookspec
def der_dispatch_validated(dispatch: Dispatch) -> None:
    """A dispatch passed validation and was split and clamped, before it is recorded and
    routed.

    Not called for a request whose ``Idempotency-Key`` was seen before (it returns the
    first request's record).

    :param dispatch: a copy of the new dispatch record, with its per-asset ``targets``.

    For guardrails that want to log or alert on commands. Since 0.1.
    """


@hookspec
def der_agent_connected(sessions: Sequence[Session], assets: Sequence[Asset]) -> None:
    """An agent registered and its assets were accepted.

    Called once the new sessions are stored and the assets are routed to the agent's
    stream, before its pending dispatches are sent.

    :param sessions: one new session per accepted asset.
    :param assets: the accepted assets, in the same order.

    Since 0.1.
    """


@hookspec
def der_agent_disconnected(sessions: Sequence[Session]) -> None:
    """Sessions ended and were stored as closed: an agent's stream ended (or the headend
    is stopping), or an asset moved to another agent's stream before the old one ended.

    :param sessions: the closed sessions, with ``disconnected_at`` set.

    Since 0.1.
    """


@hookspec
def der_alarm_changed(alarm: Alarm, change: str) -> None:
    """An alarm changed and the change was stored (docs/alarms.md): for notification
    plugins (mail, chat, paging).

    Called by the headend that made the change (in a cluster: one replica), after the
    change is stored. De-bounced: a ``cleared`` is told only once the alarm has stayed
    cleared for ``HEADEND_ALARM_DEBOUNCE_S``, and a re-raise within that time is not told
    at all, so a flapping condition is one ``raised`` and, if it settles cleared, one
    ``cleared``. An agent event sent again is not told again.

    :param alarm: the alarm after the change (:class:`~der_sdk.models.Alarm`).
    :param change: ``raised`` (a new alarm), ``reraised`` (active again after a clear
        that was told), ``updated`` (another severity or text while active), ``cleared``
        or ``acknowledged``.

    Since 0.3.
    """


OBSERVER_HOOKS = (
    "der_telemetry_received",
    "der_dispatch_validated",
    "der_agent_connected",
    "der_agent_disconnected",
    "der_alarm_changed",
)
"""The observer hooks: fired with ``Plugins.notify``, never through the pluggy relay."""
