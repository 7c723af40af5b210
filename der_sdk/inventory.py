"""The asset inventory: a YAML file of sites and the assets at them.

.. code-block:: yaml

    sites:
      - site_id: 6f1c2b1e-3d4a-4c5b-8e9f-0a1b2c3d4e5f
        name: North Yard
        location: optional free text
        latitude: 52.1              # optional, degrees in [-90, 90] (WGS 84)
        longitude: 5.2              # optional, degrees in [-180, 180]
        split_policy: headroom      # optional: how site dispatches split; an installed policy
        agents:                     # optional: which agents may serve this site
          - fingerprint: sha256:4f0c...   # a client certificate (mutual TLS)
          - subject: "CN=gw-north,O=Acme" # any certificate with this subject (mTLS)
          - token_sha256: 9b1d...         # the SHA-256 of a per-agent token (no mTLS)
            name: gw-north spare          # optional label for operators
    assets:
      - asset_id: 0b6c1e52-7f0e-4d8a-9a57-2c1f3e4d5a61
        site_id: 6f1c2b1e-3d4a-4c5b-8e9f-0a1b2c3d4e5f
        name: BESS 1
        asset_type: bess            # default bess; must be an installed asset type
        capacity_mwh: 4.0           # default 0 (assets that store no energy), >= 0
        max_mw: 2.0                 # required
        min_mw: -2.0                # required, <= max_mw
        ramp_rate_mw_per_min: 1.0   # optional, > 0; absent or null: steps instantly
        efficiency: 0.9             # optional round-trip efficiency in (0, 1], default 1
        location: optional free text
        latitude: 52.1              # optional, like the site's
        longitude: 5.2
    programs:                       # optional: northbound programs (docs/programs.md)
      - name: utility-dr            # unique; dispatches it makes have source program:NAME
        source: openadr2b           # an installed program source (der_program_sources)
        sites: [6f1c2b1e-3d4a-4c5b-8e9f-0a1b2c3d4e5f]   # its scope: sites and/or assets
        assets: []
        options: {vtn_url: "https://vtn.example/OpenADR2/Simple/2.0b"}  # the source's

``agents`` binds agent identities to the site (:class:`AgentBinding`); the headend's agent
link checks them (:mod:`der_sdk_headend.link.identity`). A site without ``agents`` accepts
any agent unless the headend requires client certificates.

``asset_id`` and ``site_id`` must be UUIDs; any form :class:`uuid.UUID` accepts is
normalised to canonical lower-case text. A bad file is rejected with **every** problem
listed, each with file, line and field (``assets[2].max_mw``; list indexes count from 0).

:func:`load_inventory` reads the file with plain blocking I/O: it runs once at start-up,
before the event loop.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from der_sdk.certs import canonical_fingerprint, canonical_subject, canonical_token_sha256
from der_sdk.errors import UnknownNameError
from der_sdk.models import Asset, Site
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

__all__ = [
    "AGENT_KEYS",
    "ASSET_KEYS",
    "PROGRAM_KEYS",
    "SITE_KEYS",
    "AgentBinding",
    "BindingKind",
    "Inventory",
    "ProgramConfig",
    "canonical_uuid",
    "load_inventory",
    "parse_inventory",
]

TOP_KEYS: tuple[str, ...] = ("sites", "assets", "programs")
PROGRAM_KEYS: tuple[str, ...] = ("name", "source", "sites", "assets", "options")
SITE_KEYS: tuple[str, ...] = (
    "site_id",
    "name",
    "location",
    "latitude",
    "longitude",
    "split_policy",
    "agents",
)
BINDING_KINDS: tuple[str, ...] = ("fingerprint", "subject", "token_sha256")
AGENT_KEYS: tuple[str, ...] = (*BINDING_KINDS, "name")
ASSET_KEYS: tuple[str, ...] = (
    "asset_id",
    "site_id",
    "name",
    "asset_type",
    "capacity_mwh",
    "max_mw",
    "min_mw",
    "ramp_rate_mw_per_min",
    "efficiency",
    "location",
    "latitude",
    "longitude",
)

_UUID_HINT = "generate one with: python -c 'import uuid; print(uuid.uuid4())'"


def canonical_uuid(value: str) -> str:
    """``value`` as canonical lower-case UUID text; :class:`ValueError` if it is not one."""
    return str(uuid.UUID(value))


def _lookup_key(value: str) -> str:
    try:
        return canonical_uuid(value)
    except (ValueError, TypeError, AttributeError):
        return value


BindingKind = Literal["fingerprint", "subject", "token_sha256"]

_CANONICAL = {
    "fingerprint": canonical_fingerprint,
    "subject": canonical_subject,
    "token_sha256": canonical_token_sha256,
}


@dataclass(frozen=True)
class AgentBinding:
    """One agent identity allowed to serve a site (an entry of the site's ``agents``).

    ``value`` is canonical: ``sha256:<hex>`` for a fingerprint, the RFC 4514 form of
    :func:`der_sdk.certs.subject` for a subject, 64 lower-case hex digits for a token
    hash. ``name`` is the operator's label; ``line`` where the entry is in the file.
    """

    kind: BindingKind
    value: str
    name: str | None = None
    line: int | None = None

    def describe(self) -> str:
        label = f" ({self.name})" if self.name else ""
        value = self.value if self.kind != "token_sha256" else f"{self.value[:12]}..."
        return f"{self.kind} {value}{label}"


@dataclass(frozen=True)
class ProgramConfig:
    """One entry of ``programs:``: a northbound program the headend runs.

    ``site_ids`` and ``asset_ids`` are as listed (canonical); :attr:`Inventory.program_scope`
    gives every asset it controls. ``options`` are the source's options, validated
    against its options Struct when the inventory was loaded with the installed sources;
    ``line`` is where the entry starts in the file.
    """

    name: str
    source: str
    site_ids: tuple[str, ...] = ()
    asset_ids: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    line: int | None = None


@dataclass(frozen=True)
class Inventory:
    """Sites and assets by id, in file order. Build one with :func:`load_inventory`.

    ``agents`` maps the id of each site that has an ``agents`` list to its bindings;
    a site without one is not in it. ``programs`` are the northbound programs configured.
    """

    sites: dict[str, Site]
    assets: dict[str, Asset]
    path: str = "<inventory>"
    agents: dict[str, tuple[AgentBinding, ...]] = field(default_factory=dict)
    programs: tuple[ProgramConfig, ...] = ()
    _by_site: dict[str, list[Asset]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_site: dict[str, list[Asset]] = {site_id: [] for site_id in self.sites}
        for asset in sorted(self.assets.values(), key=lambda a: a.asset_id):
            by_site.setdefault(asset.site_id, []).append(asset)
        object.__setattr__(self, "_by_site", by_site)

    def site(self, site_id: str) -> Site:
        """The site ``site_id`` (any UUID spelling); :class:`UnknownNameError` if absent."""
        try:
            return self.sites[_lookup_key(site_id)]
        except KeyError:
            raise UnknownNameError("site", site_id, self.sites) from None

    def asset(self, asset_id: str) -> Asset:
        """The asset ``asset_id`` (any UUID spelling); :class:`UnknownNameError` if absent."""
        found = self.assets.get(asset_id)  # the canonical spelling, by far the most common
        if found is not None:
            return found
        try:
            return self.assets[_lookup_key(asset_id)]
        except KeyError:
            raise UnknownNameError("asset", asset_id, self.assets) from None

    def assets_for_site(self, site_id: str) -> list[Asset]:
        """The assets of ``site_id`` sorted by asset id (empty for an unknown site)."""
        return list(self._by_site.get(_lookup_key(site_id), ()))

    def program_scope(self, program: ProgramConfig) -> tuple[list[Site], list[Asset]]:
        """The sites a program lists, and every asset it controls: those it lists and
        those of the sites it lists, sorted by asset id."""
        sites = [self.sites[s] for s in program.site_ids if s in self.sites]
        assets = {a: self.assets[a] for a in program.asset_ids if a in self.assets}
        for site in sites:
            assets.update((a.asset_id, a) for a in self.assets_for_site(site.site_id))
        return sites, [assets[a] for a in sorted(assets)]

    def site_agents(self, site_id: str) -> tuple[AgentBinding, ...] | None:
        """The agents bound to ``site_id``; ``None`` when the site lists no ``agents``
        (or is unknown)."""
        return self.agents.get(_lookup_key(site_id))


def load_inventory(
    path: str | os.PathLike[str],
    *,
    asset_types: Collection[str] | None = None,
    split_policies: Collection[str] | None = None,
    program_sources: Mapping[str, type[msgspec.Struct] | None] | None = None,
) -> Inventory:
    """Read and validate the inventory file at ``path``.

    Blocking file I/O on purpose: call it at start-up, before the event loop runs.

    :param asset_types: the installed asset type names; ``None`` asks the plugins
        (:func:`der_sdk.load_plugins`) for them.
    :param split_policies: the installed split policy names, to check the sites'
        ``split_policy``; ``None`` asks the plugins when a site names one.
    :param program_sources: the installed program sources, name → options Struct, to
        check each program's ``source`` and ``options``; ``None`` asks the plugins when
        the file has programs.
    :raises ConfigError: the file is missing, unreadable or invalid; ``issues`` lists every
        problem with file, line and field.
    """
    label = os.fspath(path)
    return parse_inventory(
        read_text(path),
        label,
        asset_types=asset_types,
        split_policies=split_policies,
        program_sources=program_sources,
    )


def parse_inventory(
    text: str,
    path_label: str = "<inventory>",
    *,
    asset_types: Collection[str] | None = None,
    split_policies: Collection[str] | None = None,
    program_sources: Mapping[str, type[msgspec.Struct] | None] | None = None,
) -> Inventory:
    """Validate inventory YAML ``text``; ``path_label`` names it in errors.

    See :func:`load_inventory` for the parameters and errors.
    """
    issues = Issues(path_label)
    top = top_level_mapping(parse_yaml(text, path_label), issues, "'sites' and 'assets' lists")
    if top is None:
        issues.raise_if_any()
        raise AssertionError("unreachable")  # pragma: no cover
    root = Section(issues, top)
    root.check_keys(TOP_KEYS)
    site_items = root.list_at("sites", required=True)
    asset_items = root.list_at("assets", required=True)

    sites, site_lines, agents = _parse_sites(issues, site_items, split_policies)
    assets: dict[str, Asset] = {}
    if isinstance(asset_items, LineList) and asset_items:
        installed = sorted(_installed_asset_types() if asset_types is None else asset_types)
        assets = _parse_assets(issues, asset_items, site_lines, sites, installed)
    programs = _parse_programs(issues, root.list_at("programs"), sites, assets, program_sources)
    issues.raise_if_any()
    return Inventory(sites=sites, assets=assets, path=path_label, agents=agents, programs=programs)


def _installed_asset_types() -> list[str]:
    from der_sdk.plugins import load_plugins  # the plugin manager imports the built-ins

    return load_plugins().asset_types.names()


def _installed_split_policies() -> list[str]:
    from der_sdk.plugins import load_plugins

    return load_plugins().split_policies.names()


def _installed_program_sources() -> dict[str, type[msgspec.Struct] | None]:
    from der_sdk.plugins import load_plugins

    return {source.name: source.options for source in load_plugins().program_sources}


def _parse_programs(
    issues: Issues,
    items: Any,
    sites: dict[str, Site],
    assets: dict[str, Asset],
    installed: Mapping[str, type[msgspec.Struct] | None] | None,
) -> tuple[ProgramConfig, ...]:
    """The ``programs`` entries: unique names, installed sources, a scope of known sites
    and assets, and options that convert to the source's options Struct."""
    programs: list[ProgramConfig] = []
    names: dict[str, int | None] = {}
    entries = _entries(issues, items, "programs", "name, source and sites or assets")
    if entries and installed is None:
        installed = _installed_program_sources()
    for _, section in entries:
        section.check_keys(PROGRAM_KEYS)
        name = section.string("name", required=True)
        source = section.string("source", required=True)
        site_ids = _id_list(section, "sites", sites, "site")
        asset_ids = _id_list(section, "assets", assets, "asset")
        options = section.mapping_at("options")
        if options is MISSING:
            continue
        if isinstance(name, str):
            if name in names:
                section.error("name", f"duplicate program {name!r}: also on line {names[name]}")
                name = MISSING
            else:
                names[name] = section.line("name")
        if site_ids == () and asset_ids == ():
            section.error(
                "sites",
                "a program needs a scope: list the sites and/or assets it controls",
            )
            continue
        if isinstance(source, str) and installed is not None:
            if source not in installed:
                section.error(
                    "source",
                    f"unknown program source {source!r}; installed: "
                    f"{', '.join(sorted(installed)) or 'none'} (install the plugin that "
                    "provides it)",
                )
                source = MISSING
            else:
                _check_program_options(section, options, installed[source], source)
        if MISSING in (name, source, site_ids, asset_ids):
            continue
        programs.append(
            ProgramConfig(
                name=name,
                source=source,
                site_ids=site_ids,
                asset_ids=asset_ids,
                options=dict(options) if isinstance(options, LineDict) else {},
                line=section.line(),
            )
        )
    return tuple(programs)


def _id_list(section: Section, key: str, known: Mapping[str, Any], kind: str) -> Any:
    """The canonical ids listed under ``key`` (``()`` when absent), MISSING after an
    error; each must be in ``known``."""
    raw = section.get(key, list[str] | None, default=None)
    if raw is MISSING or raw is None:
        return () if raw is None else MISSING
    ids: list[str] = []
    for index, value in enumerate(raw):
        where = f"{key}[{index}]"
        try:
            canonical = canonical_uuid(value)
        except ValueError:
            section.error(key, f"{where}: {value!r} is not a UUID of a {kind}")
            return MISSING
        if canonical not in known:
            section.error(key, f"{where}: unknown {kind} {canonical}; declare it under '{kind}s'")
            return MISSING
        ids.append(canonical)
    return tuple(ids)


def _check_program_options(
    section: Section, options: Any, schema: type[msgspec.Struct] | None, source: str
) -> None:
    """Report options that do not convert to ``schema``, at the option's own line."""
    given = dict(options) if isinstance(options, LineDict) else {}
    if schema is None:
        if given:
            section.error("options", f"program source {source!r} takes no options; remove them")
        return
    try:
        msgspec.convert(given, schema)
    except msgspec.ValidationError as exc:
        at, message = describe_validation_error(exc)
        option = at.lstrip(".").split(".")[0].split("[")[0]
        allowed = ", ".join(f.name for f in msgspec.structs.fields(schema)) or "none"
        line = section.line("options")
        if option and isinstance(options, LineDict) and options.line_of(option) is not None:
            line = options.line_of(option)
        section.issues.add(
            line,
            join_field(section.field("options"), option) if option else section.field("options"),
            f"invalid options for program source {source!r}: {message} (its options: {allowed})",
        )


def _coordinates(section: Section) -> tuple[Any, Any]:
    """``latitude`` and ``longitude`` (``None`` when absent, MISSING after an error)."""
    found = []
    for key, bound in (("latitude", 90.0), ("longitude", 180.0)):
        value = section.number(key, default=None, nullable=True)
        if isinstance(value, float) and not -bound <= value <= bound:
            section.error(
                key, f"must be in [-{bound:g}, {bound:g}] degrees (WGS 84), got {value:g}"
            )
            value = MISSING
        found.append(value)
    return found[0], found[1]


def _entries(issues: Issues, items: Any, kind: str, required: str) -> list[tuple[int, Section]]:
    if not isinstance(items, LineList):
        return []
    sections: list[tuple[int, Section]] = []
    for index, item in enumerate(items):
        prefix = f"{kind}[{index}]"
        if not isinstance(item, LineDict):
            issues.add(
                items.line_of(index),
                prefix,
                f"expected a mapping with {required}, got {type_name(item)}",
            )
            continue
        sections.append((index, Section(issues, item, prefix)))
    return sections


def _uuid_field(section: Section, key: str) -> Any:
    raw = section.get(key, str, required=True)
    if raw is MISSING:
        return MISSING
    try:
        return canonical_uuid(raw)
    except ValueError:
        section.error(key, f"{raw!r} is not a UUID; {_UUID_HINT}")
        return MISSING


def _parse_sites(
    issues: Issues, items: Any, split_policies: Collection[str] | None
) -> tuple[dict[str, Site], dict[str, int | None], dict[str, tuple[AgentBinding, ...]]]:
    sites: dict[str, Site] = {}
    agents: dict[str, tuple[AgentBinding, ...]] = {}
    # Every well-formed site id, even of a site with other errors, so that its assets do
    # not also report "unknown site".
    site_lines: dict[str, int | None] = {}
    for _, section in _entries(issues, items, "sites", "site_id and name"):
        section.check_keys(SITE_KEYS)
        site_id = _uuid_field(section, "site_id")
        name = section.string("name", required=True)
        location = section.get("location", str | None, default=None)
        latitude, longitude = _coordinates(section)
        policy = section.string("split_policy", default=None)
        if isinstance(policy, str):
            if split_policies is None:
                split_policies = _installed_split_policies()
            if policy not in split_policies:
                section.error(
                    "split_policy",
                    f"unknown split policy {policy!r}; installed: "
                    f"{', '.join(sorted(split_policies)) or 'none'}",
                )
                policy = MISSING
        bindings = _parse_agents(section)
        if site_id is MISSING:
            continue
        if site_id in site_lines:
            section.error(
                "site_id",
                f"duplicate site_id {site_id}: on line {site_lines[site_id]} and line "
                f"{section.line('site_id')}; site ids must be unique",
            )
            continue
        site_lines[site_id] = section.line("site_id")
        site_values = (name, location, latitude, longitude, policy)
        if all(v is not MISSING for v in site_values):
            sites[site_id] = Site(
                site_id=site_id,
                name=name,
                location=location,
                latitude=latitude,
                longitude=longitude,
                split_policy=policy,
            )
        if bindings is not None and bindings is not MISSING:
            agents[site_id] = bindings
    return sites, site_lines, agents


def _parse_agents(site: Section) -> Any:
    """The site's ``agents`` bindings: ``None`` without the key, MISSING after an error."""
    items = site.list_at("agents")
    if not isinstance(items, LineList):
        return items
    if not items:
        site.error(
            "agents",
            "an empty list binds no agent, so no agent could serve the site; list the "
            "agents (fingerprint, subject or token_sha256) or remove the key",
        )
        return MISSING
    bindings: list[AgentBinding] = []
    seen: dict[tuple[str, str], int | None] = {}
    ok = True
    for index, item in enumerate(items):
        field_name = site.field(f"agents[{index}]")
        line = items.line_of(index)
        if not isinstance(item, LineDict):
            site.issues.add(
                line,
                field_name,
                f"expected a mapping with one of {', '.join(BINDING_KINDS)}, got {type_name(item)}",
            )
            ok = False
            continue
        entry = Section(site.issues, item, field_name)
        entry.check_keys(AGENT_KEYS)
        kinds = [k for k in BINDING_KINDS if k in item]
        if len(kinds) != 1:
            got = " and ".join(kinds) if kinds else "none of them"
            site.issues.add(
                line,
                field_name,
                f"needs exactly one of {', '.join(BINDING_KINDS)}, got {got}; "
                "one entry per identity",
            )
            ok = False
            continue
        kind = kinds[0]
        label = entry.string("name", default=None)
        raw = entry.string(kind, required=True)
        if raw is MISSING or label is MISSING:
            ok = False
            continue
        try:
            value = _CANONICAL[kind](raw)
        except ValueError as exc:
            entry.error(kind, str(exc))
            ok = False
            continue
        if (kind, value) in seen:
            entry.error(kind, f"listed twice for this site (first on line {seen[(kind, value)]})")
            ok = False
            continue
        seen[(kind, value)] = entry.line(kind)
        bindings.append(AgentBinding(kind=kind, value=value, name=label, line=entry.line(kind)))  # type: ignore[arg-type]
    return tuple(bindings) if ok else MISSING


def _parse_assets(
    issues: Issues,
    items: LineList,
    site_lines: dict[str, int | None],
    sites: dict[str, Site],
    installed_types: list[str],
) -> dict[str, Asset]:
    assets: dict[str, Asset] = {}
    asset_lines: dict[str, int | None] = {}
    for _, section in _entries(issues, items, "assets", "asset_id, site_id and name"):
        section.check_keys(ASSET_KEYS)
        values: dict[str, Any] = {
            "asset_id": _uuid_field(section, "asset_id"),
            "site_id": _uuid_field(section, "site_id"),
            "name": section.string("name", required=True),
            "asset_type": section.string("asset_type", default="bess"),
            "capacity_mwh": section.number("capacity_mwh", default=0.0),
            "max_mw": section.number("max_mw", required=True),
            "min_mw": section.number("min_mw", required=True),
            "ramp_rate_mw_per_min": section.number(
                "ramp_rate_mw_per_min", default=None, nullable=True
            ),
            "efficiency": section.number("efficiency", default=1.0),
            "location": section.get("location", str | None, default=None),
        }
        values["latitude"], values["longitude"] = _coordinates(section)
        valid = _check_asset_values(section, values, site_lines, sites, installed_types)

        asset_id = values["asset_id"]
        if asset_id is not MISSING:
            if asset_id in asset_lines:
                section.error(
                    "asset_id",
                    f"duplicate asset_id {asset_id}: on line {asset_lines[asset_id]} and line "
                    f"{section.line('asset_id')}; asset ids must be unique",
                )
                continue
            asset_lines[asset_id] = section.line("asset_id")
        if valid and all(v is not MISSING for v in values.values()):
            assets[asset_id] = Asset(**values)
    return assets


def _check_asset_values(
    section: Section,
    values: dict[str, Any],
    site_lines: dict[str, int | None],
    sites: dict[str, Site],
    installed_types: list[str],
) -> bool:
    """Range and cross-reference checks; ``False`` when one failed (already reported)."""
    ok = True
    site_id = values["site_id"]
    if site_id is not MISSING and site_id not in site_lines:
        known = ", ".join(f"{sid} ({s.name})" for sid, s in sites.items()) or "none"
        section.error(
            "site_id",
            f"unknown site {site_id}; declare it under 'sites' first. Known site ids: {known}",
        )
        ok = False
    asset_type = values["asset_type"]
    if asset_type is not MISSING and asset_type not in installed_types:
        section.error(
            "asset_type",
            f"unknown asset type {asset_type!r}; installed: "
            f"{', '.join(installed_types) or 'none'} (install the plugin that provides it)",
        )
        ok = False
    capacity = values["capacity_mwh"]
    if capacity is not MISSING and capacity < 0:
        section.error("capacity_mwh", f"must be >= 0, got {capacity}")
        ok = False
    max_mw, min_mw = values["max_mw"], values["min_mw"]
    if max_mw is not MISSING and min_mw is not MISSING and min_mw > max_mw:
        section.error(
            "min_mw",
            f"min_mw ({min_mw}) is greater than max_mw ({max_mw}, line "
            f"{section.line('max_mw')}); min_mw is the charge/import limit and is usually "
            f"negative",
        )
        ok = False
    ramp = values["ramp_rate_mw_per_min"]
    if ramp is not MISSING and ramp is not None and ramp <= 0:
        section.error(
            "ramp_rate_mw_per_min",
            f"must be > 0, got {ramp}; leave it out for an asset that steps instantly",
        )
        ok = False
    efficiency = values["efficiency"]
    if efficiency is not MISSING and not 0 < efficiency <= 1:
        section.error(
            "efficiency",
            f"must be in (0, 1] (round-trip efficiency as a fraction), got {efficiency}",
        )
        ok = False
    return ok
