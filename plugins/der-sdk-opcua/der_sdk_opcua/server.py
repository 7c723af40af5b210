"""The ``opcua-server`` edge service: the agent's assets as an OPC UA address space, for a
local SCADA or HMI (Ignition, WinCC OA...).

Address space, in namespace ``urn:der-sdk:edge`` (configurable), under ``Objects``; node ids
are strings equal to the browse path (``ns=<i>;s=Assets/<asset_id>/Controls/SetpointMW``)::

    Assets/<asset_id>/Telemetry/<field>        mw, mw_setpoint, status, details...   read
    Assets/<asset_id>/Controls/SetpointMW      the asset's setpoint, MW              read/write
    Assets/<asset_id>/Status/Online            Boolean                               read
    Assets/<asset_id>/Status/LastSeen          DateTime of the last good sample      read
    Assets/<asset_id>/Status/FaultCode         String                                read
    Assets/<asset_id>/Status/Quality           good | uncertain | bad                read
    Assets/<asset_id>/Status/QualityReason     String                                read
    Site/Controls/SiteDispatchMW               the site's total, MW (gateway)        read/write
    Site/Allocations/<asset_id>/MW             each asset's share (gateway)          read

A write to a control goes down the agent's own dispatch path
(:attr:`~der_sdk.extensions.EdgeServiceContext.dispatch`: validation, clamp, split), exactly
as a headend dispatch does; the agent reports it to the headend, whose dispatch history
records it with source ``local``. The write returns when the command has been applied; a
command the agent refuses or fails to apply fails the write (``BadOutOfRange``,
``BadDeviceFailure``). Reading a control gives what is in force now, whoever commanded it:
the last command that reached the agent wins (``docs/opcua.md``).

Security: Basic256Sha256 (SignAndEncrypt, and Sign if enabled); security policy None only
with ``allow_insecure: true``. Client certificates must be in the trust list
(``CertificateValidatorOptions.TRUSTED``). Anonymous sessions (if allowed) may browse, read
and subscribe, never write; writing needs a configured user or a trusted X.509 user
certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from asyncua import ua
from asyncua.common.callback import CallbackService, CallbackType, ServerItemCallback
from asyncua.common.node import Node
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server

from der_sdk.errors import DerSdkError
from der_sdk.extensions import EdgeService, EdgeServiceContext
from der_sdk.models import TelemetrySample
from der_sdk_opcua._ua import (
    AttributeIds,
    StatusCodes,
    data_value,
    node_id,
    quiet_asyncua,
    stop_server,
)
from der_sdk_opcua._ua import status as _status
from der_sdk_opcua.certs import application_uri_of, load_certificate_der, load_private_key_der
from der_sdk_opcua.options import DEFAULT_NAMESPACE, OpcuaServerOptions
from der_sdk_opcua.security import (
    AnonymousReadOnlyRuleset,
    EdgeInternalServer,
    EdgeUserManager,
    TrustList,
    build_certificate_validator,
    load_trust_list,
)

__all__ = ["DEFAULT_NAMESPACE", "OpcuaEdgeServer", "OpcuaServerOptions"]

log = logging.getLogger("der.opcua.server")

CORE_TELEMETRY = ("mw", "mw_setpoint", "status")
_WRITERS = (UserRole.User, UserRole.Admin)


def _options(raw: Any) -> OpcuaServerOptions:
    if isinstance(raw, OpcuaServerOptions):
        return raw
    return msgspec.convert(raw or {}, OpcuaServerOptions)


@dataclass(frozen=True)
class _Control:
    """A writable node: a setpoint of one asset (``asset_id``) or of the site."""

    path: str
    asset_id: str | None = None
    site_id: str | None = None


def _quality_status(quality: str) -> ua.StatusCode:
    if quality == "good":
        return ua.StatusCode()
    if quality == "uncertain":
        return _status(StatusCodes.Uncertain)
    return _status(StatusCodes.BadNoCommunication)


def _variant_for(value: Any) -> ua.Variant | None:
    """A Variant for a telemetry detail value; numbers are Double so a node's type does not
    flip between Int64 and Double as a device reports 10 then 10.5."""
    if isinstance(value, bool):
        return ua.Variant(value, ua.VariantType.Boolean)
    if isinstance(value, int | float):
        return ua.Variant(float(value), ua.VariantType.Double)
    if isinstance(value, str):
        return ua.Variant(value, ua.VariantType.String)
    if value is None:
        return None
    return ua.Variant(msgspec.json.encode(value).decode(), ua.VariantType.String)


class OpcuaEdgeServer(EdgeService):
    """The OPC UA server surface of one agent."""

    def __init__(self, context: EdgeServiceContext) -> None:
        quiet_asyncua()
        self.context = context
        self.options = opts = _options(context.options)
        if not opts.security_modes and not opts.allow_insecure:
            raise DerSdkError(
                "options.security_modes is empty and allow_insecure is false: the server "
                "would offer no endpoint"
            )
        self._certificate: bytes | None = None
        self._private_key: bytes | None = None
        if opts.security_modes:
            if not (opts.certificate and opts.private_key):
                raise DerSdkError(
                    "options.certificate and options.private_key are required for the "
                    "Basic256Sha256 endpoints; make a pair with `python -m der_sdk_opcua.certs` "
                    "(or, for a lab only: security_modes: [] and allow_insecure: true)"
                )
            self._certificate = load_certificate_der(opts.certificate, "options.certificate")
            self._private_key = load_private_key_der(opts.private_key, "options.private_key")
        if opts.security_modes and opts.trusted_certificates is None:
            raise DerSdkError(
                "options.trusted_certificates is required: the folder of client certificates "
                "this server trusts (an empty folder trusts nobody)"
            )
        self.application_uri = (
            opts.application_uri
            or (application_uri_of(self._certificate) if self._certificate else None)
            or f"urn:der-sdk:edge:{context.agent_id}"
        )
        self.assets = {a.asset_id: a for a in context.assets}
        self.site_controls = (
            opts.site_controls if opts.site_controls is not None else len(self.assets) > 1
        )
        self.trust: TrustList | None = None
        self.namespace_index = 0
        self._server: Server | None = None
        self._port: int | None = None
        self._nodes: dict[str, ua.NodeId] = {}  # browse path -> node id
        self._folders: dict[str, Node] = {}
        self._controls: dict[ua.NodeId, _Control] = {}
        self._effective: dict[str, float] = {}  # control path -> MW in force
        self._written_at: dict[str, datetime] = {}  # control path -> last local write
        self._latest: dict[str, TelemetrySample] = {}
        self._details: dict[str, list[str]] = {}  # asset id -> detail nodes made so far
        self._telemetry = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._dispatch_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint_url(self) -> str:
        """The endpoint, with the bound port once started (``opc.tcp://host:port/path``)."""
        endpoint = self.options.endpoint
        if self._port is None:
            return endpoint
        scheme, _, rest = endpoint.partition("://")
        hostport, slash, path = rest.partition("/")
        host = hostport.rsplit(":", 1)[0]
        return f"{scheme}://{host}:{self._port}{slash}{path}"

    async def start(self) -> None:
        opts = self.options
        self.trust = await load_trust_list(opts.trusted_certificates, opts.revoked_certificates)
        user_manager = EdgeUserManager(
            users=opts.users, allow_anonymous=opts.allow_anonymous, trust=self.trust
        )
        iserver = EdgeInternalServer(user_manager=user_manager, allow_insecure=opts.allow_insecure)
        server = Server(iserver=iserver)
        await server.init()
        server.set_endpoint(opts.endpoint)
        server.set_server_name(f"der-sdk edge agent {self.context.agent_id}")
        await server.set_application_uri(self.application_uri)
        policies = [
            getattr(ua.SecurityPolicyType, f"Basic256Sha256_{mode}") for mode in opts.security_modes
        ]
        if opts.allow_insecure:
            policies.append(ua.SecurityPolicyType.NoSecurity)
        server.set_security_policy(policies, permission_ruleset=AnonymousReadOnlyRuleset())
        tokens: list[type] = [ua.UserNameIdentityToken, ua.X509IdentityToken]
        if opts.allow_anonymous:
            tokens.insert(0, ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        if self._certificate is not None and self._private_key is not None:
            await server.load_certificate(self._certificate)
            await server.load_private_key(self._private_key)
        server.set_certificate_validator(build_certificate_validator(self.trust))
        self.namespace_index = await server.register_namespace(opts.namespace)
        self._server = server
        await self._build_address_space(server)
        server.subscribe_server_callback(CallbackType.PostWrite, self._on_post_write)
        await server.start()
        self._port = server.bserver.port if server.bserver is not None else None
        self._writer = asyncio.create_task(
            self._write_telemetry(), name=f"der-opcua-server-{self.context.agent_id}"
        )
        self._log_started()

    def _log_started(self) -> None:
        opts = self.options
        endpoints = [f"Basic256Sha256/{mode}" for mode in opts.security_modes]
        if opts.allow_insecure:
            endpoints.append("None")
        trusted = self.trust.count if self.trust is not None else 0
        log.info(
            "OPC UA server of agent %s on %s: namespace %s (index %d), %d asset(s)%s; "
            "endpoints %s; %d trusted client certificate(s); anonymous %s; %d user(s) may write",
            self.context.agent_id,
            self.endpoint_url,
            opts.namespace,
            self.namespace_index,
            len(self.assets),
            ", site controls" if self.site_controls else "",
            ", ".join(endpoints),
            trusted,
            "read-only" if opts.allow_anonymous else "refused",
            len(opts.users),
        )
        if opts.allow_insecure:
            log.warning(
                "OPC UA server of agent %s: security policy None is enabled (allow_insecure: "
                "true): traffic on that endpoint is neither signed nor encrypted; use it in a "
                "lab or demo only",
                self.context.agent_id,
            )
        if opts.security_modes and not trusted:
            log.warning(
                "OPC UA server of agent %s: no trusted client certificates in %s: every secure "
                "connection will be refused",
                self.context.agent_id,
                opts.trusted_certificates,
            )

    async def stop(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        server, self._server = self._server, None
        if server is not None:
            server.unsubscribe_server_callback(CallbackType.PostWrite, self._on_post_write)
            await stop_server(server)

    # ------------------------------------------------------------------ address space

    def node_id(self, path: str) -> ua.NodeId:
        """The node id of a browse path, e.g. ``Assets/<id>/Controls/SetpointMW``."""
        return node_id(path, self.namespace_index)

    async def _folder(self, server: Server, path: str, display: str | None = None) -> Node:
        node = self._folders.get(path)
        if node is not None:
            return node
        parent_path, _, name = path.rpartition("/")
        parent = await self._folder(server, parent_path) if parent_path else server.nodes.objects
        node = await parent.add_folder(
            self.node_id(path), ua.QualifiedName(name, self.namespace_index)
        )
        if display:
            await node.write_attribute(
                AttributeIds.DisplayName, data_value(ua.Variant(ua.LocalizedText(display)))
            )
        self._folders[path] = node
        return node

    async def _variable(
        self,
        server: Server,
        path: str,
        variant: ua.Variant,
        *,
        writable: bool = False,
        initial_status: int | None = StatusCodes.BadWaitingForInitialData,
    ) -> ua.NodeId:
        parent_path, _, name = path.rpartition("/")
        parent = await self._folder(server, parent_path)
        node = await parent.add_variable(
            self.node_id(path), ua.QualifiedName(name, self.namespace_index), variant
        )
        if writable:
            await node.set_writable()
        if initial_status is not None:
            await server.write_attribute_value(
                node.nodeid, data_value(variant, code=_status(initial_status))
            )
        self._nodes[path] = node.nodeid
        return node.nodeid

    async def _build_address_space(self, server: Server) -> None:
        double = ua.Variant(0.0, ua.VariantType.Double)
        for asset in self.assets.values():
            base = f"Assets/{asset.asset_id}"
            await self._folder(server, "Assets")
            await self._folder(server, base, display=f"{asset.name} ({asset.asset_id})")
            for field in CORE_TELEMETRY:
                variant = ua.Variant("", ua.VariantType.String) if field == "status" else double
                await self._variable(server, f"{base}/Telemetry/{field}", variant)
            await self._variable(
                server,
                f"{base}/Status/Online",
                ua.Variant(False, ua.VariantType.Boolean),
                initial_status=None,
            )
            await self._variable(
                server, f"{base}/Status/LastSeen", ua.Variant(None, ua.VariantType.DateTime)
            )
            for name in ("FaultCode", "QualityReason"):
                await self._variable(
                    server,
                    f"{base}/Status/{name}",
                    ua.Variant("", ua.VariantType.String),
                    initial_status=None,
                )
            await self._variable(
                server,
                f"{base}/Status/Quality",
                ua.Variant("", ua.VariantType.String),
                initial_status=None,
            )
            control = f"{base}/Controls/SetpointMW"
            nodeid = await self._variable(server, control, double, writable=True)
            self._controls[nodeid] = _Control(control, asset_id=asset.asset_id)
        if self.site_controls:
            control = "Site/Controls/SiteDispatchMW"
            nodeid = await self._variable(server, control, double, writable=True)
            self._controls[nodeid] = _Control(control, site_id=self.context.site_id)
            for asset_id in self.assets:
                await self._variable(server, f"Site/Allocations/{asset_id}/MW", double)

    # ------------------------------------------------------------------ telemetry → nodes

    def on_telemetry(self, samples: Sequence[TelemetrySample]) -> None:
        for sample in samples:
            if sample.asset_id in self.assets:
                self._latest[sample.asset_id] = sample
        self._telemetry.set()

    async def _write_telemetry(self) -> None:
        while True:
            await self._telemetry.wait()
            self._telemetry.clear()
            latest, self._latest = self._latest, {}
            for sample in latest.values():
                try:
                    await self._publish_sample(sample)
                except Exception:
                    log.exception("OPC UA server: publishing asset %s failed", sample.asset_id)
            try:
                await self._publish_site()
            except Exception:
                log.exception("OPC UA server: publishing the site totals failed")

    async def _set(
        self,
        path: str,
        variant: ua.Variant | None,
        status: ua.StatusCode | None = None,
        ts: datetime | None = None,
    ) -> None:
        server = self._server
        nodeid = self._nodes.get(path)
        if server is None or nodeid is None:
            return
        code = status if status is not None else ua.StatusCode()
        if variant is None or code.is_bad():
            variant = ua.Variant(None, ua.VariantType.Null)
        now = datetime.now(UTC)
        await server.write_attribute_value(
            nodeid,
            data_value(variant, code=code, source_ts=ts or now, server_ts=now),
        )

    async def _publish_sample(self, sample: TelemetrySample) -> None:
        server = self._server
        if server is None:
            return
        base = f"Assets/{sample.asset_id}"
        quality = _quality_status(sample.quality)
        ts = sample.ts
        bad = sample.quality == "bad"
        if bad:
            # No value of a bad sample is current: every telemetry node of the asset says so
            # (a SCADA must not keep showing the last good values as fresh).
            for name in (*CORE_TELEMETRY, *self._details.get(sample.asset_id, ())):
                await self._set(f"{base}/Telemetry/{name}", None, quality, ts)
        else:
            await self._set(
                f"{base}/Telemetry/mw", ua.Variant(sample.mw, ua.VariantType.Double), quality, ts
            )
            if sample.mw_setpoint is not None:
                setpoint = ua.Variant(sample.mw_setpoint, ua.VariantType.Double)
                await self._set(f"{base}/Telemetry/mw_setpoint", setpoint, quality, ts)
            await self._set(
                f"{base}/Telemetry/status",
                ua.Variant(sample.status or "", ua.VariantType.String),
                quality,
                ts,
            )
            for name, value in sample.details.items():
                await self._publish_detail(server, sample.asset_id, name, value, quality, ts)
        await self._set(
            f"{base}/Status/Online", ua.Variant(sample.online and not bad, ua.VariantType.Boolean)
        )
        if not bad:
            await self._set(f"{base}/Status/LastSeen", ua.Variant(ts, ua.VariantType.DateTime))
        await self._set(
            f"{base}/Status/FaultCode", ua.Variant(sample.fault_code or "", ua.VariantType.String)
        )
        await self._set(f"{base}/Status/Quality", ua.Variant(sample.quality, ua.VariantType.String))
        await self._set(
            f"{base}/Status/QualityReason",
            ua.Variant(sample.quality_reason or "", ua.VariantType.String),
        )
        # The control reads back the setpoint in force, unless a local write landed after
        # this sample was taken (the sample then still shows the previous setpoint).
        control = f"{base}/Controls/SetpointMW"
        written = self._written_at.get(control)
        if sample.mw_setpoint is not None and not bad and (written is None or ts >= written):
            await self._show_setpoint(sample.asset_id, sample.mw_setpoint)

    async def _show_setpoint(self, asset_id: str, mw: float) -> None:
        """An asset's setpoint in force: its control and (gateway) its site allocation."""
        control = f"Assets/{asset_id}/Controls/SetpointMW"
        self._effective[control] = mw
        await self._set(control, ua.Variant(mw, ua.VariantType.Double))
        if self.site_controls:
            await self._set(
                f"Site/Allocations/{asset_id}/MW", ua.Variant(mw, ua.VariantType.Double)
            )

    async def _publish_detail(
        self,
        server: Server,
        asset_id: str,
        name: str,
        value: Any,
        quality: ua.StatusCode,
        ts: datetime,
    ) -> None:
        path = f"Assets/{asset_id}/Telemetry/{name}"
        if name in CORE_TELEMETRY or "/" in name:
            return
        variant = _variant_for(value)
        if path not in self._nodes:
            if variant is None:
                return
            await self._variable(server, path, variant, initial_status=None)
            self._details.setdefault(asset_id, []).append(name)
        try:
            await self._set(path, variant, quality, ts)
        except Exception:  # a detail whose type changed (e.g. a string in a number node)
            log.debug("OPC UA server: %s: value of another type ignored", path, exc_info=True)

    async def _publish_site(self) -> None:
        """The site control reads the total of the setpoints in force."""
        if not self.site_controls:
            return
        parts = [self._effective.get(f"Assets/{a}/Controls/SetpointMW") for a in self.assets]
        if any(p is None for p in parts):
            return
        control = "Site/Controls/SiteDispatchMW"
        total = math.fsum(p for p in parts if p is not None)
        self._effective[control] = total
        await self._set(control, ua.Variant(total, ua.VariantType.Double))

    # ------------------------------------------------------------------ writes → dispatch

    async def _on_post_write(self, event: ServerItemCallback, _service: CallbackService) -> None:
        """After asyncua wrote a client's values: dispatch the controls among them.

        asyncua awaits this before it answers the client, so the write returns once the
        command was applied, and the result codes can still be changed here.
        """
        if not event.is_external:
            return
        params: ua.WriteParameters = event.request_params
        results: list[ua.StatusCode] = event.response_params
        for i, write in enumerate(params.NodesToWrite):
            control = self._controls.get(write.NodeId)
            if control is None or write.AttributeId != AttributeIds.Value:
                continue
            if i >= len(results) or not results[i].is_good():
                continue
            results[i] = await self._apply_control(control, write.Value, event.user)

    async def _apply_control(
        self, control: _Control, value: ua.DataValue, user: User | None
    ) -> ua.StatusCode:
        who = (user.name or user.role.name) if user is not None else "unknown"
        if user is None or user.role not in _WRITERS:  # the ruleset refuses these already
            await self._restore(control)
            return _status(StatusCodes.BadUserAccessDenied)
        raw = value.Value.Value if value.Value is not None else None
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
            log.warning(
                "OPC UA write by %s to %s refused: %r is not a number", who, control.path, raw
            )
            await self._restore(control)
            return _status(StatusCodes.BadOutOfRange)
        mw = float(raw)
        async with self._dispatch_lock:
            try:
                outcome = await self.context.dispatch(
                    control.asset_id, control.site_id, mw, self.options.setpoint_duration_s
                )
            except Exception:
                log.exception("OPC UA write by %s to %s: dispatch failed", who, control.path)
                await self._restore(control)
                return _status(StatusCodes.BadInternalError)
            self._note_written(control)
            status = str(getattr(outcome, "status", "failed"))
            reason = getattr(outcome, "reason", None)
            applied = await self._show_allocations(control, getattr(outcome, "allocations", ()))
        log.info(
            "OPC UA write by %s: %s = %g MW -> %s%s (command %s)",
            who,
            control.path,
            mw,
            status,
            f", {applied:g} MW applied" if applied is not None else "",
            getattr(outcome, "command_id", "?"),
        )
        if status == "applied":
            return ua.StatusCode()
        if reason:
            log.warning("OPC UA write to %s not applied: %s", control.path, reason)
        if applied is None:  # nothing changed: show the value in force again
            await self._restore(control)
        if status == "rejected":
            return _status(StatusCodes.BadOutOfRange)
        return _status(StatusCodes.BadDeviceFailure)

    def _note_written(self, control: _Control) -> None:
        now = datetime.now(UTC)
        self._written_at[control.path] = now
        if control.site_id is not None:
            for asset_id in self.assets:
                self._written_at[f"Assets/{asset_id}/Controls/SetpointMW"] = now

    async def _show_allocations(self, control: _Control, allocations: Any) -> float | None:
        """Show what the command applied: each asset's setpoint and allocation, and the
        control's own value (the total applied). ``None`` when nothing was applied."""
        applied: list[float] = []
        for allocation in allocations or ():
            if getattr(allocation, "status", None) != "applied":
                continue
            applied.append(float(allocation.mw))
            await self._show_setpoint(allocation.asset_id, float(allocation.mw))
        if not applied:
            return None
        await self._publish_site()
        return math.fsum(applied)

    async def _restore(self, control: _Control) -> None:
        """Put the value in force back into a control a refused write had changed."""
        value = self._effective.get(control.path)
        if value is None:
            await self._set(control.path, None, _status(StatusCodes.BadWaitingForInitialData))
        else:
            await self._set(control.path, ua.Variant(value, ua.VariantType.Double))
