"""``der commission``: check a site's agent set-up end to end, without running the agent.

Given the settings ``der agent`` takes (flags and environment, :class:`AgentSettings`),
:func:`commission` checks, in order:

1. **settings, inventory, agent config** — the files load, the served asset or site is in
   the local inventory (``ASSETS_PATH``: the agent needs it anyway), and the agent config
   fits the inventory and the installed plugins (:func:`validate_agent_config`); a problem
   with one asset's adapter or options is reported on that asset;
2. **plugins** — each asset's adapter type is installed and builds with its options (the
   adapter resolves its device profile here), the split policy and edge services exist;
3. **devices** — each device is read once through its adapter (concurrently, each bounded
   by ``read_timeout_s``); the values and their quality are shown, a ``bad`` reading fails;
4. **headend** — each headend address is dialled with the link security the agent would
   use (TLS, client certificate, token) and sent a *probe* ``Register`` (``probe`` set):
   the headend checks the agent's identity and every asset against **its** inventory, as
   for a real register, answers which assets it would accept, and opens nothing (no
   session, no command: the production agent is not disturbed).

The local inventory is checked for consistency with the agent config; the headend's
inventory, which decides, is checked through the probe. Nothing here raises for an
expected problem: each is a failed :class:`Check` with one line saying what is wrong and
one saying what to do. ``report.ok`` is false when anything failed.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import msgspec

import der_sdk
from der_sdk.agent_config import AgentConfig, load_agent_config, validate_agent_config
from der_sdk.errors import ConfigError, ConfigIssue, DerSdkError, UnknownNameError
from der_sdk.inventory import Inventory, load_inventory
from der_sdk.models import Asset, TelemetrySample
from der_sdk.plugins import Plugins, load_plugins
from der_sdk.wire import codec, pb, pb_grpc
from der_sdk_agent.adapters import AdapterRuntime, adapter_name_for, build_adapters
from der_sdk_agent.settings import AgentSettings, ServedAssets, resolve_served_assets
from der_sdk_agent.tls import LinkSecurity

__all__ = [
    "AssetReport",
    "Check",
    "CommissionReport",
    "HeadendProbe",
    "commission",
    "probe_headend",
    "render_text",
]

Result = Literal["pass", "warn", "fail"]

DEFAULT_READ_TIMEOUT_S = 10.0
DEFAULT_PROBE_TIMEOUT_S = 10.0

_PROBE_CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


class Check(msgspec.Struct, frozen=True, kw_only=True):
    """One checked thing: ``detail`` says what was found, ``fix`` what to do about it."""

    name: str
    result: Result
    detail: str
    fix: str | None = None


class AssetReport(msgspec.Struct, kw_only=True):
    """One served asset: its ``plugin``, ``device`` and ``headend`` checks."""

    asset_id: str
    name: str
    asset_type: str
    adapter: str | None = None
    package: str | None = None
    result: Result = "pass"
    checks: list[Check] = msgspec.field(default_factory=list)
    reading: TelemetrySample | None = None
    """The one sample read from the device, as the agent would send it."""


class CommissionReport(msgspec.Struct, kw_only=True):
    """Everything :func:`commission` found. ``checks`` are the site-wide ones."""

    ok: bool = False
    agent_id: str | None = None
    site_id: str | None = None
    headends: list[str] = msgspec.field(default_factory=list)
    checks: list[Check] = msgspec.field(default_factory=list)
    assets: list[AssetReport] = msgspec.field(default_factory=list)


@dataclass
class HeadendProbe:
    """What one headend answered to a probe ``Register``.

    ``error`` is set when there was no answer about assets (unreachable, identity refused,
    timed out); ``legacy`` when the headend ignored the probe flag (an older headend that
    registered for real, at once closed again).
    """

    address: str
    error: str | None = None
    fix: str | None = None
    accepted: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)
    legacy: bool = False


# ----------------------------------------------------------------------------- preparing


@dataclass
class _Plan:
    report: CommissionReport
    plugins: Plugins | None = None
    settings: AgentSettings | None = None
    config: AgentConfig | None = None
    served: ServedAssets | None = None
    security: LinkSecurity | None = None
    asset_problems: dict[str, list[ConfigIssue]] = field(default_factory=dict)


def _fail(report: CommissionReport, name: str, detail: str, fix: str) -> None:
    report.checks.append(Check(name=name, result="fail", detail=detail, fix=fix))


def _prepare(env: Mapping[str, str], plugins: Plugins | None) -> _Plan:
    """The file-reading checks (blocking I/O: run in a thread)."""
    report = CommissionReport()
    plan = _Plan(report)
    try:
        settings = AgentSettings.from_env(env)
    except DerSdkError as exc:
        _fail(report, "settings", str(exc), "pass the flags der agent takes (der commission -h)")
        return plan
    plan.settings = settings
    report.headends = list(settings.headends)
    try:
        plan.plugins = plugins if plugins is not None else load_plugins()
    except DerSdkError as exc:
        _fail(report, "plugins", str(exc), "reinstall or remove the plugin named")
        return plan
    try:
        inventory = load_inventory(
            settings.assets_path, asset_types=plan.plugins.asset_types.names()
        )
    except DerSdkError as exc:
        _fail(report, "inventory", str(exc), "fix the inventory file, or point --assets at it")
        return plan
    try:
        config = load_agent_config(settings.agent_config_path)
    except DerSdkError as exc:
        _fail(report, "agent config", str(exc), "fix the agent config at the line named")
        return plan
    plan.config = config
    try:
        served = resolve_served_assets(settings, inventory, config_agent_id=config.agent_id)
    except DerSdkError as exc:
        _fail(
            report,
            "inventory",
            str(exc),
            "add the asset or site to the inventory (the headend's and this one), or "
            "correct --asset-id / --site-id",
        )
        return plan
    plan.served = served
    report.agent_id, report.site_id = served.agent_id, served.site_id
    site = inventory.site(served.site_id)
    report.checks.append(
        Check(
            name="inventory",
            result="pass",
            detail=f"{inventory.path}: site {site.name} ({site.site_id}), "
            f"{len(served.assets)} asset(s) served by agent {served.agent_id}",
        )
    )
    _check_config(plan, inventory, config, served)
    report.assets = [
        AssetReport(
            asset_id=a.asset_id,
            name=a.name,
            asset_type=a.asset_type,
            adapter=adapter_name_for(a.asset_id, config),
        )
        for a in served.assets
    ]
    try:
        plan.security = LinkSecurity.from_settings(settings, config)
    except DerSdkError as exc:
        _fail(report, "link security", str(exc), "fix the AGENT_TLS_* setting or tls: key named")
    else:
        report.checks.append(
            Check(name="link security", result="pass", detail=plan.security.describe())
        )
    return plan


def _check_config(
    plan: _Plan, inventory: Inventory, config: AgentConfig, served: ServedAssets
) -> None:
    """Agent config against plugins and inventory: one asset's problems go to that asset."""
    assert plan.plugins is not None
    served_ids = {a.asset_id for a in served.assets}
    site_issues: list[ConfigIssue] = []
    try:
        validate_agent_config(config, plan.plugins, inventory, sorted(served_ids))
    except ConfigError as exc:
        for issue in exc.issues:
            parts = (issue.field or "").split(".")
            if parts[0] == "assets" and len(parts) > 1 and parts[1] in served_ids:
                plan.asset_problems.setdefault(parts[1], []).append(issue)
            else:
                site_issues.append(issue)
    where = config.source_path or "built-in defaults"
    if site_issues:
        _fail(
            plan.report,
            "agent config",
            "; ".join(str(i) for i in site_issues),
            "fix the agent config at the lines named (der plugins lists what is installed)",
        )
    else:
        services = ", ".join(s.name for s in config.edge_services) or "none"
        plan.report.checks.append(
            Check(
                name="agent config",
                result="pass",
                detail=f"{where}: split policy {config.split_policy}, edge services: {services}",
            )
        )


# ----------------------------------------------------------------------------- checking


async def commission(
    env: Mapping[str, str],
    plugins: Plugins | None = None,
    *,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
) -> CommissionReport:
    """Check the agent set-up ``env`` describes (the environment ``der agent`` reads,
    flags already folded in) and return the report; see the module docstring."""
    plan = await asyncio.to_thread(_prepare, env, plugins)
    report = plan.report
    if plan.served is None or plan.config is None or plan.plugins is None:
        return _finish(report)
    assets = {r.asset_id: r for r in report.assets}
    runtimes: dict[str, AdapterRuntime] = {}
    for asset in plan.served.assets:
        row = assets[asset.asset_id]
        problems = plan.asset_problems.get(asset.asset_id)
        if problems:
            row.checks.append(
                Check(
                    name="plugin",
                    result="fail",
                    detail="; ".join(str(i) for i in problems),
                    fix="fix this asset's adapter or options in the agent config "
                    "(der plugins lists the installed adapters)",
                )
            )
            continue
        runtime = _build(asset, plan.config, plan.plugins, row, read_timeout_s)
        if runtime is not None:
            runtimes[asset.asset_id] = runtime
    try:
        readings, probes = await asyncio.gather(
            asyncio.gather(*(_read_once(rt) for rt in runtimes.values())),
            _probe_all(plan, probe_timeout_s),
        )
    finally:
        await asyncio.gather(*(rt.close() for rt in runtimes.values()))
    for asset_id, sample in zip(runtimes, readings, strict=True):
        _judge_reading(assets[asset_id], sample)
    _judge_headends(report, probes)
    return _finish(report)


def _build(
    asset: Asset, config: AgentConfig, plugins: Plugins, row: AssetReport, timeout_s: float
) -> AdapterRuntime | None:
    try:
        runtime = build_adapters([asset], config, plugins, timeout_s=timeout_s)[asset.asset_id]
    except DerSdkError as exc:
        row.checks.append(
            Check(
                name="plugin",
                result="fail",
                detail=str(exc),
                fix="install the plugin or device pack named, or fix this asset's options "
                "in the agent config (der plugins, der profiles)",
            )
        )
        return None
    row.package = runtime.package
    detail = f"{runtime.label} built with its options"
    profile = _profile_named(config.adapter_for(asset.asset_id).options, plugins)
    row.checks.append(Check(name="plugin", result="pass", detail=f"{detail}{profile}"))
    return runtime


def _profile_named(options: Mapping[str, Any], plugins: Plugins) -> str:
    """``, device profile NAME VERSION (package)`` for options naming an installed profile
    (the adapter resolved it already: a missing one failed the build)."""
    name, version = options.get("profile"), options.get("profile_version")
    if not isinstance(name, str) or not (version is None or isinstance(version, str)):
        return ""
    name, _, pinned = name.partition("@")
    try:
        found = plugins.device_profiles.get(name, version or pinned or None)
        package = plugins.device_profiles.provider(name, version or pinned or None)
    except UnknownNameError:
        return ""
    return f", device profile {found.name} {found.version} ({package})"


async def _read_once(runtime: AdapterRuntime) -> TelemetrySample:
    return await runtime.read()


_MAP_WORDS = ("illegal data address", "exception 02", "sunspec", "profile", "model", "node")
_REACH_WORDS = ("connect", "refused", "timed out", "timeout", "unreachable", "not answering")


def _device_fix(reason: str) -> str:
    text = reason.lower()
    if any(word in text for word in _MAP_WORDS):
        return (
            "the register or node map does not match the device: check profile, "
            "profile_version and unit_id (or the nodes) in the agent config against the "
            "device's documentation; der profiles lists the installed profiles"
        )
    if any(word in text for word in _REACH_WORDS):
        return (
            "the device is not reachable: check that it is powered and on the network, "
            "the host and port (or endpoint) in the agent config, and any firewall between"
        )
    return "check the device and this asset's adapter options in the agent config"


def _judge_reading(row: AssetReport, sample: TelemetrySample) -> None:
    row.reading = sample
    if sample.quality == "bad":
        reason = sample.quality_reason or "bad-quality reading"
        row.checks.append(
            Check(name="device", result="fail", detail=reason, fix=_device_fix(reason))
        )
    elif sample.quality == "uncertain":
        row.checks.append(
            Check(
                name="device",
                result="warn",
                detail=f"quality uncertain: {sample.quality_reason or 'no reason given'}",
                fix="the values may be stale or estimated; check the device",
            )
        )
    else:
        row.checks.append(Check(name="device", result="pass", detail=_values(sample)))


def _values(reading: TelemetrySample) -> str:
    def show(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if math.isfinite(value) else str(value)
        return "-" if value is None else str(value)

    parts = [
        f"quality {reading.quality}",
        f"mw={show(reading.mw)}",
        f"mw_setpoint={show(reading.mw_setpoint)}",
        f"online={'yes' if reading.online else 'no'}",
    ]
    if reading.status:
        parts.append(f"status={reading.status}")
    if reading.fault_code:
        parts.append(f"fault_code={reading.fault_code}")
    parts.extend(f"{k}={show(v)}" for k, v in sorted(reading.details.items()))
    return " ".join(parts)


# ----------------------------------------------------------------------------- headend


async def _probe_all(plan: _Plan, timeout_s: float) -> list[HeadendProbe]:
    if plan.security is None or plan.served is None or plan.settings is None:
        return []
    assert plan.config is not None
    adapters = {a.asset_id: adapter_name_for(a.asset_id, plan.config) for a in plan.served.assets}
    return list(
        await asyncio.gather(
            *(
                probe_headend(
                    address,
                    agent_id=plan.served.agent_id,
                    site_id=plan.served.site_id,
                    assets=adapters,
                    security=plan.security,
                    plugin_versions=plan.plugins.versions() if plan.plugins else {},
                    timeout_s=timeout_s,
                )
                for address in plan.settings.headends
            )
        )
    )


async def probe_headend(
    address: str,
    *,
    agent_id: str,
    site_id: str,
    assets: Mapping[str, str],
    security: LinkSecurity,
    plugin_versions: Mapping[str, str] | None = None,
    timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
) -> HeadendProbe:
    """Send a probe ``Register`` for ``assets`` (asset id → adapter name) to ``address``
    and return what the headend said. Never raises for a failure of the headend or the
    network: :attr:`HeadendProbe.error` says what happened."""
    result = HeadendProbe(address)
    channel = security.open_channel(address, _PROBE_CHANNEL_OPTIONS)
    call: Any = None
    try:
        call = pb_grpc.AgentLinkStub(channel).Stream(  # type: ignore[no-untyped-call]
            metadata=security.call_metadata()
        )
        register = codec.agent_register(
            agent_id=agent_id,
            site_id=site_id,
            assets=assets,
            sdk_version=der_sdk.__version__,
            plugins=plugin_versions or {},
            probe=True,
        )
        async with asyncio.timeout(timeout_s):
            await call.write(register)
            message = await call.read()
            while message is not grpc.aio.EOF and message.WhichOneof("msg") != "register_ack":
                message = await call.read()  # an older headend may queue a command first
            if message is grpc.aio.EOF:
                code, details = await call.code(), await call.details()
                result.error = f"{code.name}: {details}" if details else code.name
                result.fix = _status_fix(code)
                return result
        _read_ack(result, message.register_ack)
    except TimeoutError:
        result.error = f"no answer within {timeout_s:g} s"
        result.fix = "check that a der-sdk headend serves this address (HEADEND_GRPC)"
    except grpc.aio.AioRpcError as exc:
        details = exc.details()
        result.error = f"{exc.code().name}: {details}" if details else exc.code().name
        hint = security.explain(exc)
        result.fix = hint or _status_fix(exc.code())
    finally:
        if call is not None:
            call.cancel()
        await channel.close()
    return result


def _read_ack(result: HeadendProbe, ack: pb.RegisterAck) -> None:
    result.accepted = set(ack.accepted_asset_ids)
    result.refused = {r.asset_id: r.reason for r in ack.refused}
    whole = result.refused.pop("", None)  # the stream refused as a whole (identity)
    if whole is not None and not result.accepted:
        result.error = ack.message or whole
        result.fix = _status_fix(_code_in(result.error))
    result.legacy = bool(ack.accepted) and not ack.probe


def _code_in(text: str) -> grpc.StatusCode | None:
    name = text.split(":", 1)[0].strip()
    return next((c for c in grpc.StatusCode if c.name == name), None)


def _status_fix(code: grpc.StatusCode | None) -> str:
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            "the headend is not reachable: check HEADEND_GRPC (--headend), that the "
            "headend runs, and the network and firewall between (outbound TCP to its port)"
        )
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return (
            "the headend does not accept this agent's identity for the site: bind the "
            "certificate's fingerprint (or the token's sha256) to the site in the headend's "
            "inventory (der certs issue-agent prints the entry), or use the certificate "
            "issued for this site"
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "this address does not serve the der-sdk agent link; check HEADEND_GRPC"
    return "see the headend's log for this agent"


def _asset_fix(reason: str) -> str:
    if "not in the inventory" in reason:
        return "add the asset to the headend's inventory (both sides must use the same file)"
    if "belongs to site" in reason:
        return "serve the asset from its own site's agent, or correct its site_id"
    return "see the headend's log for this agent"


def _judge_headends(report: CommissionReport, probes: Sequence[HeadendProbe]) -> None:
    rows = report.assets
    for probe in probes:
        name = f"headend {probe.address}"
        if probe.error is not None:
            _fail(report, name, probe.error, probe.fix or "see the headend's log")
            continue
        accepted = sum(1 for r in rows if r.asset_id in probe.accepted)
        detail = f"would accept {accepted} of {len(rows)} asset(s)"
        if probe.legacy:
            report.checks.append(
                Check(
                    name=name,
                    result="warn",
                    detail=f"{detail}; this headend does not know probes: it registered the "
                    "agent for a moment (sessions opened and closed)",
                    fix="upgrade the headend; meanwhile commission when the site's agent is down",
                )
            )
        else:
            report.checks.append(Check(name=name, result="pass", detail=detail))
    for row in rows:
        if not probes:
            continue
        failures = [
            (p.address, p.error or p.refused.get(row.asset_id) or "not accepted", p)
            for p in probes
            if p.error is not None or row.asset_id not in p.accepted
        ]
        if not failures:
            where = ", ".join(p.address for p in probes)
            row.checks.append(Check(name="headend", result="pass", detail=f"accepted by {where}"))
            continue
        address, reason, probe = failures[0]
        fix = (
            f"see the check of headend {address} above"
            if probe.error is not None
            else _asset_fix(reason)
        )
        detail = "; ".join(f"{a}: {r}" for a, r, _ in failures)
        row.checks.append(Check(name="headend", result="fail", detail=detail, fix=fix))


def _finish(report: CommissionReport) -> CommissionReport:
    for row in report.assets:
        results = {c.result for c in row.checks}
        row.result = "fail" if "fail" in results else "warn" if "warn" in results else "pass"
    failed = any(c.result == "fail" for c in report.checks) or any(
        r.result == "fail" for r in report.assets
    )
    report.ok = not failed and bool(report.assets)
    return report


# ----------------------------------------------------------------------------- output


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _result_of(row: AssetReport, name: str) -> str:
    check = next((c for c in row.checks if c.name == name), None)
    return check.result.upper() if check is not None else "-"


def render_text(report: CommissionReport) -> str:
    """The report as the terminal shows it: site checks, a table per asset, readings,
    what to fix, and one result line."""
    lines: list[str] = []
    who = f"agent {report.agent_id}, site {report.site_id}" if report.agent_id else "agent ?"
    lines.append(f"der commission: {who}; headend {', '.join(report.headends) or '-'}")
    lines.append("")
    lines += _table(
        ["check", "result", "detail"], [[c.name, c.result.upper(), c.detail] for c in report.checks]
    )
    if report.assets:
        lines.append("")
        lines += _table(
            ["asset", "name", "adapter", "plugin", "device", "headend", "result"],
            [
                [
                    r.asset_id,
                    r.name,
                    r.adapter or "-",
                    _result_of(r, "plugin"),
                    _result_of(r, "device"),
                    _result_of(r, "headend"),
                    r.result.upper(),
                ]
                for r in report.assets
            ],
        )
        readings = [(r, r.reading) for r in report.assets if r.reading is not None]
        if readings:
            lines += ["", "readings:"]
            for row, reading in readings:
                shown = (
                    _values(reading)
                    if reading.quality != "bad"
                    else f"quality bad: {reading.quality_reason}"
                )
                lines.append(f"  {row.asset_id} ({row.name}): {shown}")
    to_fix = [(c.name, c) for c in report.checks if c.result != "pass"]
    for row in report.assets:
        to_fix += [(f"asset {row.asset_id} ({row.name}) {c.name}", c) for c in row.checks]
    to_fix = [(n, c) for n, c in to_fix if c.result != "pass"]
    if to_fix:
        lines += ["", "to fix:"]
        for name, check in to_fix:
            lines.append(f"  {check.result.upper()} {name}: {check.detail}")
            if check.fix:
                lines.append(f"       fix: {check.fix}")
    failed = sum(1 for r in report.assets if r.result == "fail")
    failed_checks = sum(1 for c in report.checks if c.result == "fail")
    lines.append("")
    if report.ok:
        lines.append(f"RESULT: PASS ({len(report.assets)} asset(s) ready)")
    else:
        lines.append(
            f"RESULT: FAIL ({failed} of {len(report.assets)} asset(s), "
            f"{failed_checks} site check(s) failed)"
        )
    return "\n".join(lines) + "\n"
