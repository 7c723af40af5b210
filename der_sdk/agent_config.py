"""The edge agent's configuration file.

.. code-block:: yaml

    agent_id: gw-north            # optional; the agent picks one when absent
    telemetry_interval_s: 4       # default 4, > 0
    heartbeat_interval_s: 30      # default 30, > 0
    split_policy: capacity_weighted
    reconnect_initial_s: 1        # default 1, > 0
    reconnect_max_s: 120          # default 120, >= reconnect_initial_s
    link_loss_hold_s: 300         # default 300, > 0
    link_loss_fallback: default   # default | hold
    clock_offset_max_s: 2         # default 2, > 0; schedules refused beyond (env wins)
    buffer:                       # the durable store-and-forward buffer
      path: der-data/agent-{agent_id}.sqlite3   # default: see der_sdk_agent.agent
      max_mb: 256                 # default 256, > 0
      max_age_h: 168              # default 168 (7 days), > 0
      replay_samples_per_s: 2000  # default 2000, > 0
      sync: normal                # normal | full
    tls:                          # optional: TLS to the headend (env AGENT_TLS_* wins)
      ca: /etc/der/ca.pem         # the CA that signed the headend's certificate (pinned)
      cert: /etc/der/agent.pem    # client certificate, for mutual TLS (with key)
      key: /etc/der/agent.key
      server_name: headend.example # the name in the headend's certificate, if not the host
    default_adapter: sim-bess     # for every served asset not listed under `assets`
    assets:                       # optional per-asset adapter choice, keyed by asset id
      0b6c1e52-7f0e-4d8a-9a57-2c1f3e4d5a61:
        adapter: sim-bess         # default: default_adapter
        options: {initial_soc_pct: 40}
    edge_services:                # optional
      - name: some-service
        options: {}

Loading (:func:`load_agent_config`) checks the shape and types and reports every problem
with file, line and field, like the inventory. Names that depend on installed plugins
(adapters, their options, the split policy, edge services) and asset ids that depend on the
inventory are checked by :func:`validate_agent_config` once those are loaded; it still
names the line, because the parsed config keeps the line of every field.

The file is read with plain blocking I/O: it runs once at start-up, before the event loop.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from der_sdk.errors import ConfigError, ConfigIssue, DerSdkError
from der_sdk.inventory import Inventory, canonical_uuid
from der_sdk.split import DEFAULT_SPLIT_POLICY
from der_sdk.yamlconf import (
    MISSING,
    Issues,
    LineDict,
    LineList,
    Section,
    describe_validation_error,
    join_field,
    parse_yaml,
    read_text,
    top_level_mapping,
    type_name,
)

if TYPE_CHECKING:
    from der_sdk.plugins import Plugins

__all__ = [
    "DEFAULT_ADAPTER",
    "AgentConfig",
    "AssetAdapterConfig",
    "BufferConfig",
    "EdgeServiceConfig",
    "TlsConfig",
    "convert_options",
    "load_agent_config",
    "parse_agent_config",
    "validate_agent_config",
]

DEFAULT_ADAPTER = "sim-bess"
DEFAULTS_LABEL = "<agent config defaults>"

TOP_KEYS: tuple[str, ...] = (
    "agent_id",
    "telemetry_interval_s",
    "heartbeat_interval_s",
    "split_policy",
    "reconnect_initial_s",
    "reconnect_max_s",
    "link_loss_hold_s",
    "link_loss_fallback",
    "clock_offset_max_s",
    "buffer",
    "tls",
    "default_adapter",
    "assets",
    "edge_services",
)
BUFFER_KEYS: tuple[str, ...] = ("path", "max_mb", "max_age_h", "replay_samples_per_s", "sync")
TLS_KEYS: tuple[str, ...] = ("ca", "cert", "key", "server_name")
LINK_LOSS_FALLBACKS: tuple[str, ...] = ("default", "hold")
SYNC_MODES: tuple[str, ...] = ("normal", "full")
ASSET_KEYS: tuple[str, ...] = ("adapter", "options")
SERVICE_KEYS: tuple[str, ...] = ("name", "options")


def _canonical(asset_id: str) -> str:
    try:
        return canonical_uuid(asset_id)
    except ValueError:
        return asset_id


class AssetAdapterConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The adapter that serves one asset and its (not yet validated) options."""

    adapter: str
    options: dict[str, Any] = msgspec.field(default_factory=dict)


class EdgeServiceConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One enabled edge service and its (not yet validated) options."""

    name: str
    options: dict[str, Any] = msgspec.field(default_factory=dict)


class BufferConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The agent's durable store-and-forward buffer (:mod:`der_sdk_agent.store`).

    ``path``: the SQLite file; ``{agent_id}`` in it is replaced by the agent id. ``None``:
    the CLI uses ``der-data/agent-<agent_id>.sqlite3`` (relative to the working
    directory); an :class:`~der_sdk_agent.agent.Agent` built in code keeps it in memory.
    ``sync``: ``normal`` survives a killed agent process, ``full`` also power loss.
    """

    path: str | None = None
    max_mb: float = 256.0
    max_age_h: float = 168.0
    replay_samples_per_s: float = 2000.0
    sync: Literal["normal", "full"] = "normal"

    @property
    def max_bytes(self) -> int:
        return max(1, int(self.max_mb * 1024 * 1024))

    @property
    def max_age_s(self) -> float:
        return self.max_age_h * 3600.0


class TlsConfig(msgspec.Struct, frozen=True, kw_only=True):
    """TLS to the headend (:mod:`der_sdk_agent.tls`); the ``AGENT_TLS_*`` environment
    variables win over each field. Paths are relative to the working directory.

    ``ca`` turns TLS on and is the only CA trusted for the headend's certificate;
    ``cert`` and ``key`` (both or neither) are the client certificate for mutual TLS;
    ``server_name`` is the name checked in the headend's certificate.
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True, dict=True):
    """The agent configuration. ``assets`` is keyed by canonical asset UUID.

    A config parsed from a file remembers its path and the line of each field (not part of
    the encoded form); :func:`validate_agent_config` uses them in its errors.
    """

    agent_id: str | None = None
    telemetry_interval_s: float = 4.0
    heartbeat_interval_s: float = 30.0
    split_policy: str = DEFAULT_SPLIT_POLICY
    reconnect_initial_s: float = 1.0
    reconnect_max_s: float = 120.0
    link_loss_hold_s: float = 300.0
    link_loss_fallback: Literal["default", "hold"] = "default"
    clock_offset_max_s: float = 2.0
    """The largest clock offset from the headend with which the agent accepts a schedule
    (``AGENT_CLOCK_OFFSET_MAX_S`` wins)."""
    buffer: BufferConfig = msgspec.field(default_factory=BufferConfig)
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    default_adapter: str = DEFAULT_ADAPTER
    assets: dict[str, AssetAdapterConfig] = msgspec.field(default_factory=dict)
    edge_services: list[EdgeServiceConfig] = msgspec.field(default_factory=list)

    @property
    def source_path(self) -> str | None:
        """The file this config came from (``None`` for the built-in defaults)."""
        path = self.__dict__.get("_path")
        return path if isinstance(path, str) else None

    def line_of(self, field: str) -> int | None:
        """The line of ``field`` (``assets.<id>.adapter``, ``edge_services[0].name``...)."""
        lines: dict[str, int | None] = self.__dict__.get("_lines", {})
        return lines.get(field)

    def adapter_for(self, asset_id: str) -> AssetAdapterConfig:
        """The adapter choice for ``asset_id``: its own entry, else ``default_adapter``."""
        entry = self.assets.get(_canonical(asset_id))
        return entry if entry is not None else AssetAdapterConfig(adapter=self.default_adapter)


def _with_source(cfg: AgentConfig, path: str, lines: dict[str, int | None]) -> AgentConfig:
    cfg.__dict__["_path"] = path
    cfg.__dict__["_lines"] = lines
    return cfg


# --------------------------------------------------------------------------- loading


def load_agent_config(path: str | os.PathLike[str] | None) -> AgentConfig:
    """Read the agent config at ``path``; ``None`` gives the defaults.

    Blocking file I/O on purpose: call it at start-up, before the event loop runs.

    :raises ConfigError: the file is missing, unreadable or invalid; ``issues`` lists every
        problem with file, line and field.
    """
    if path is None:
        return AgentConfig()
    return parse_agent_config(read_text(path), os.fspath(path))


def parse_agent_config(text: str, path_label: str = "<agent config>") -> AgentConfig:
    """Parse agent config YAML ``text``; ``path_label`` names it in errors.

    An empty document gives the defaults (every key is optional).
    """
    data = parse_yaml(text, path_label)
    if data is None:
        return _with_source(AgentConfig(), path_label, {})
    issues = Issues(path_label)
    top = top_level_mapping(data, issues, "agent settings")
    if top is None:
        issues.raise_if_any()
        raise AssertionError("unreachable")  # pragma: no cover
    root = Section(issues, top)
    root.check_keys(TOP_KEYS)
    lines: dict[str, int | None] = {key: top.line_of(key) for key in top if isinstance(key, str)}
    values: dict[str, Any] = {}

    agent_id = root.get("agent_id", str | None, default=None)
    if isinstance(agent_id, str) and not agent_id.strip():
        root.error("agent_id", "must not be empty; leave it out to let the agent pick one")
        agent_id = MISSING
    values["agent_id"] = agent_id
    for key, default in (
        ("telemetry_interval_s", 4.0),
        ("heartbeat_interval_s", 30.0),
        ("reconnect_initial_s", 1.0),
        ("reconnect_max_s", 120.0),
        ("link_loss_hold_s", 300.0),
        ("clock_offset_max_s", 2.0),
    ):
        value = root.number(key, default=default)
        if value is not MISSING and value <= 0:
            root.error(key, f"must be > 0 seconds, got {value}")
            value = MISSING
        values[key] = value
    initial, maximum = values["reconnect_initial_s"], values["reconnect_max_s"]
    if initial is not MISSING and maximum is not MISSING and maximum < initial:
        root.error(
            "reconnect_max_s",
            f"must be >= reconnect_initial_s ({initial}), got {maximum}",
        )
        values["reconnect_max_s"] = MISSING
    values["link_loss_fallback"] = _choice(
        root, "link_loss_fallback", LINK_LOSS_FALLBACKS, "default"
    )
    values["buffer"] = _parse_buffer(root, lines)
    values["tls"] = _parse_tls(root, lines)
    values["split_policy"] = root.string("split_policy", default=DEFAULT_SPLIT_POLICY)
    default_adapter = root.string("default_adapter", default=DEFAULT_ADAPTER)
    values["default_adapter"] = default_adapter

    values["assets"] = _parse_assets(
        root, lines, default_adapter if default_adapter is not MISSING else DEFAULT_ADAPTER
    )
    values["edge_services"] = _parse_edge_services(root, lines)

    issues.raise_if_any()
    return _with_source(AgentConfig(**values), path_label, lines)


def _choice(section: Section, key: str, allowed: tuple[str, ...], default: str) -> Any:
    value = section.string(key, default=default)
    if isinstance(value, str) and value not in allowed:
        section.error(key, f"must be one of {', '.join(allowed)}, got {value!r}")
        return MISSING
    return value


def _parse_buffer(root: Section, lines: dict[str, int | None]) -> Any:
    body = root.mapping_at("buffer")
    if body is None:
        return BufferConfig()
    if not isinstance(body, LineDict):
        return MISSING
    section = Section(root.issues, body, "buffer")
    section.check_keys(BUFFER_KEYS)
    for key in body:
        lines[section.field(str(key))] = body.line_of(key)
    defaults = BufferConfig()
    values: dict[str, Any] = {"path": section.string("path", default=None)}
    for key, what in (
        ("max_mb", "MiB"),
        ("max_age_h", "hours"),
        ("replay_samples_per_s", "samples per second"),
    ):
        value = section.number(key, default=getattr(defaults, key))
        if value is not MISSING and value <= 0:
            section.error(key, f"must be > 0 {what}, got {value}")
            value = MISSING
        values[key] = value
    values["sync"] = _choice(section, "sync", SYNC_MODES, defaults.sync)
    if any(v is MISSING for v in values.values()):
        return MISSING
    return BufferConfig(**values)


def _parse_tls(root: Section, lines: dict[str, int | None]) -> Any:
    body = root.mapping_at("tls")
    if body is None:
        return TlsConfig()
    if not isinstance(body, LineDict):
        return MISSING
    section = Section(root.issues, body, "tls")
    section.check_keys(TLS_KEYS)
    for key in body:
        lines[section.field(str(key))] = body.line_of(key)
    values = {key: section.string(key, default=None) for key in TLS_KEYS}
    if any(v is MISSING for v in values.values()):
        return MISSING
    return TlsConfig(**values)


def _options(section: Section, lines: dict[str, int | None]) -> Any:
    options = section.mapping_at("options")
    if isinstance(options, LineDict):
        for key in options:
            lines[join_field(section.field("options"), str(key))] = options.line_of(key)
        if not all(isinstance(key, str) for key in options):
            section.error("options", "option names must be text")
            return MISSING
        return dict(options)
    return {} if options is None else MISSING


def _parse_assets(
    root: Section, lines: dict[str, int | None], default_adapter: str
) -> dict[str, AssetAdapterConfig] | Any:
    entries = root.mapping_at("assets")
    if not isinstance(entries, LineDict):
        return {} if entries is None else MISSING
    result: dict[str, AssetAdapterConfig] = {}
    first_line: dict[str, int | None] = {}
    ok = True
    for raw_id, body in entries.items():
        field = f"assets.{raw_id}"
        line = entries.line_of(raw_id)
        try:
            asset_id = canonical_uuid(raw_id) if isinstance(raw_id, str) else None
        except ValueError:
            asset_id = None
        if asset_id is None:
            root.issues.add(line, field, f"{raw_id!r} is not an asset UUID from the inventory")
            ok = False
            continue
        if asset_id in first_line:
            root.issues.add(
                line,
                field,
                f"asset {asset_id} is configured twice: on line {first_line[asset_id]} and "
                f"line {line}",
            )
            ok = False
            continue
        first_line[asset_id] = line
        prefix = f"assets.{asset_id}"
        lines[prefix] = line
        if body is None:
            body = LineDict()
            body.line = line
        if not isinstance(body, LineDict):
            root.issues.add(
                line, field, f"expected a mapping with adapter and options, got {type_name(body)}"
            )
            ok = False
            continue
        section = Section(root.issues, body, prefix)
        section.check_keys(ASSET_KEYS)
        for key in body:
            lines[section.field(str(key))] = body.line_of(key)
        adapter = section.string("adapter", default=default_adapter)
        if "adapter" not in body:  # errors about the default adapter point at this entry
            lines[section.field("adapter")] = line
        options = _options(section, lines)
        if adapter is MISSING or options is MISSING:
            ok = False
            continue
        result[asset_id] = AssetAdapterConfig(adapter=adapter, options=options)
    return result if ok else MISSING


def _parse_edge_services(root: Section, lines: dict[str, int | None]) -> Any:
    items = root.list_at("edge_services")
    if not isinstance(items, LineList):
        return [] if items is None else MISSING
    result: list[EdgeServiceConfig] = []
    ok = True
    for index, body in enumerate(items):
        prefix = f"edge_services[{index}]"
        lines[prefix] = items.line_of(index)
        if not isinstance(body, LineDict):
            root.issues.add(
                items.line_of(index),
                prefix,
                f"expected a mapping with name and options, got {type_name(body)}",
            )
            ok = False
            continue
        section = Section(root.issues, body, prefix)
        section.check_keys(SERVICE_KEYS)
        for key in body:
            lines[section.field(str(key))] = body.line_of(key)
        name = section.string("name", required=True)
        options = _options(section, lines)
        if name is MISSING or options is MISSING:
            ok = False
            continue
        result.append(EdgeServiceConfig(name=name, options=options))
    return result if ok else MISSING


# --------------------------------------------------------------------------- validation


def convert_options(
    raw: Any, options_type: type[msgspec.Struct] | None, *, what: str
) -> msgspec.Struct | None:
    """Validate ``raw`` options (a mapping from YAML) against ``options_type``.

    :param what: names the owner in errors, e.g. ``asset 0b6c… adapter 'modbus'``.
    :raises DerSdkError: an option is missing, unknown or of the wrong type; the message
        names ``what`` and the field (``options.port``).
    """
    if options_type is None:
        if raw:
            raise DerSdkError(f"{what}: takes no options, got {sorted(raw)}; remove 'options'")
        return None
    if isinstance(raw, options_type):
        return raw
    try:
        return msgspec.convert(raw if raw is not None else {}, type=options_type)
    except msgspec.ValidationError as exc:
        path, message = describe_validation_error(exc)
        raise DerSdkError(f"{what}: invalid options{path}: {message}") from None


def _check_options(
    issues: list[ConfigIssue],
    cfg: AgentConfig,
    path: str,
    prefix: str,
    kind: str,
    name: str,
    schema: type[msgspec.Struct] | None,
    options: Mapping[str, Any],
) -> None:
    field = f"{prefix}.options"
    if schema is None:
        if options:
            issues.append(
                ConfigIssue(
                    path,
                    cfg.line_of(field) or cfg.line_of(prefix),
                    field,
                    f"{kind} {name!r} takes no options; remove them",
                )
            )
        return
    try:
        msgspec.convert(dict(options), schema)
    except msgspec.ValidationError as exc:
        at, message = describe_validation_error(exc)
        # "$.initial_soc_pct" → the option's own field and line; "" → the options block
        option = at.lstrip(".").split(".")[0].split("[")[0]
        target = join_field(field, option) if option else field
        line = cfg.line_of(target) or cfg.line_of(field) or cfg.line_of(prefix)
        allowed = ", ".join(f.name for f in msgspec.structs.fields(schema)) or "none"
        issues.append(
            ConfigIssue(
                path,
                line,
                f"{field}{at}" if at else field,
                f"invalid options for {kind} {name!r}: {message} (its options: {allowed})",
            )
        )


def validate_agent_config(
    cfg: AgentConfig,
    plugins: Plugins,
    inventory: Inventory,
    served_asset_ids: Collection[str],
) -> None:
    """Check ``cfg`` against the installed plugins and the inventory.

    Checks that the split policy and every edge service are installed, that every asset
    listed under ``assets`` is in the inventory, that every adapter named there (and
    ``default_adapter`` when a served asset relies on it) is installed, and that every
    options block converts to its adapter's or service's options Struct.

    :param served_asset_ids: the assets this agent serves (canonical UUIDs).
    :raises ConfigError: listing every problem with the config file, line and field.
    """
    path = cfg.source_path or DEFAULTS_LABEL
    issues: list[ConfigIssue] = []

    def add(field: str, message: str) -> None:
        issues.append(ConfigIssue(path, cfg.line_of(field), field, message))

    policies = plugins.split_policies
    if cfg.split_policy not in policies:
        add(
            "split_policy",
            f"unknown split policy {cfg.split_policy!r}; installed: {', '.join(policies.names())}",
        )

    adapters = plugins.adapter_types
    installed_adapters = ", ".join(adapters.names()) or "none"
    for asset_id, entry in cfg.assets.items():
        prefix = f"assets.{asset_id}"
        if asset_id not in inventory.assets:
            add(
                prefix,
                f"asset {asset_id} is not in the inventory ({inventory.path}); check the id "
                f"or add the asset there",
            )
        if entry.adapter not in adapters:
            add(
                f"{prefix}.adapter",
                f"unknown adapter {entry.adapter!r}; installed: {installed_adapters} "
                f"(install the plugin that provides it)",
            )
            continue
        adapter = adapters.get(entry.adapter)
        _check_options(
            issues, cfg, path, prefix, "adapter", entry.adapter, adapter.options, entry.options
        )

    uses_default = sorted(str(a) for a in served_asset_ids if _canonical(a) not in cfg.assets)
    if uses_default:
        if cfg.default_adapter not in adapters:
            add(
                "default_adapter",
                f"unknown adapter {cfg.default_adapter!r} (the default for "
                f"{len(uses_default)} served asset(s) not listed under 'assets'); "
                f"installed: {installed_adapters}",
            )
        else:
            schema = adapters.get(cfg.default_adapter).options
            try:
                if schema is not None:
                    msgspec.convert({}, schema)
            except msgspec.ValidationError as exc:
                _, message = describe_validation_error(exc)
                add(
                    "default_adapter",
                    f"adapter {cfg.default_adapter!r} cannot run without options ({message}); "
                    f"list these served assets under 'assets' with their options: "
                    f"{', '.join(uses_default)}",
                )

    services = plugins.edge_services
    for index, service in enumerate(cfg.edge_services):
        prefix = f"edge_services[{index}]"
        if service.name not in services:
            add(
                f"{prefix}.name",
                f"unknown edge service {service.name!r}; installed: "
                f"{', '.join(services.names()) or 'none'}",
            )
            continue
        kind = services.get(service.name)
        _check_options(
            issues, cfg, path, prefix, "edge service", service.name, kind.options, service.options
        )

    if issues:
        raise ConfigError(sorted(issues, key=lambda i: (i.line is not None, i.line or 0)))
