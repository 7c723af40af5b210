"""The ``opcua`` adapter: reads one asset's telemetry from an OPC UA server and writes its
setpoint there (asyncua client).

A **node map** says which node feeds which telemetry field: a core field (``mw``,
``mw_setpoint``, ``online``, ``status``, ``fault_code``) or a ``details.<name>`` field of the
asset type. It comes from the options (``nodes: {node id: field}``), from a device profile
with protocol ``opcua`` (``profile: NAME``), or both (the options win per node).

Values arrive by **subscription** (data change notifications, cached) when the server
accepts one, else by **polling** (one Read of every node per telemetry interval). With a
subscription each sample still reads one node (the server state), because a hung server
is as silent as an unchanging one. A subscription that goes quiet past its keep-alive, or
reports a bad status, falls back to polling.

**Quality**: a node with a bad status code makes the sample ``bad`` (no values, the nodes
and codes in ``quality_reason``); an uncertain one makes it ``uncertain``. A lost
connection makes ``read()`` fail with the reason (the agent reports a bad sample) and the
next ``read()`` connects again.

With ``telemetry_write_sim: true`` the roles turn around, as in the original design: the
agent simulates the battery (the ``sim-bess`` model, from the inventory limits) and
**writes** its telemetry into the mapped nodes, e.g. to feed an HMI or historian.

Security is on by default: Basic256Sha256 with SignAndEncrypt and a client certificate.
Security policy None needs ``allow_insecure: true``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.common.subscription import DataChangeNotif, Subscription
from asyncua.crypto import uacrypto
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.uaerrors import UaStatusCodeError
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from der_sdk_sim_bess import SimBattery  # type: ignore[import-not-found,unused-ignore]

from der_sdk.errors import DerSdkError
from der_sdk.extensions import Adapter, AdapterContext, DeviceProfile, SetpointResult
from der_sdk.models import Asset, TelemetrySample, utc_now
from der_sdk_opcua._ua import data_value, quiet_asyncua, status
from der_sdk_opcua.certs import application_uri_of, load_certificate_der, load_private_key_der
from der_sdk_opcua.options import OpcuaAdapterOptions

__all__ = ["CORE_FIELDS", "NodePoint", "OpcuaAdapter", "OpcuaAdapterOptions", "resolve_points"]

log = logging.getLogger("der.opcua.adapter")

CORE_FIELDS: dict[str, type] = {
    "mw": float,
    "mw_setpoint": float,
    "online": bool,
    "status": str,
    "fault_code": str,
}
"""Core telemetry fields a node can feed, and their Python types."""

_DETAIL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STALE_MARGIN = 2.0  # keep-alive periods a subscription may stay silent
_TEMP_RISE_AT_FULL_POWER_C = 18.0
_INTEGER_TYPES = {
    ua.VariantType.SByte,
    ua.VariantType.Byte,
    ua.VariantType.Int16,
    ua.VariantType.UInt16,
    ua.VariantType.Int32,
    ua.VariantType.UInt32,
    ua.VariantType.Int64,
    ua.VariantType.UInt64,
}


@dataclass(frozen=True)
class NodePoint:
    """One mapped node: its id, the field it feeds and the scale (field = value x scale)."""

    node_id: str
    nodeid: ua.NodeId
    field: str
    scale: float = 1.0


def _options(raw: Any) -> OpcuaAdapterOptions:
    if isinstance(raw, OpcuaAdapterOptions):
        return raw
    return msgspec.convert(raw or {}, OpcuaAdapterOptions)


def _parse_node_id(text: str, where: str) -> ua.NodeId:
    try:
        return ua.NodeId.from_string(text)
    except Exception:
        raise DerSdkError(
            f"{where}: {text!r} is not an OPC UA node id (e.g. ns=2;s=Bess.P or ns=3;i=1001)"
        ) from None


def _check_field(field: str, where: str) -> None:
    if field in CORE_FIELDS:
        return
    prefix, _, name = field.partition(".")
    if prefix == "details" and _DETAIL_NAME.match(name):
        return
    raise DerSdkError(
        f"{where}: unknown telemetry field {field!r}; use one of "
        f"{', '.join(CORE_FIELDS)} or details.<name>"
    )


def _find_profile(name: str, profiles: Mapping[str, DeviceProfile]) -> DeviceProfile:
    wanted, _, version = name.partition("@")
    profile = profiles.get(wanted)
    if profile is None or (version and profile.version != version):
        known = ", ".join(sorted(p for p, v in profiles.items() if v.protocol == "opcua"))
        raise DerSdkError(
            f"options.profile: no device profile {name!r} is installed"
            + (f" (OPC UA profiles: {known})" if known else "")
        )
    if profile.protocol != "opcua":
        raise DerSdkError(
            f"options.profile: device profile {name!r} is for protocol {profile.protocol!r}, "
            f"not opcua"
        )
    return profile


def resolve_points(
    options: OpcuaAdapterOptions, profiles: Mapping[str, DeviceProfile]
) -> tuple[list[NodePoint], NodePoint | None]:
    """The node map and the setpoint node from the options and the profile.

    :raises DerSdkError: a node id or field is invalid, the profile is unknown or not for
        OPC UA, or nothing feeds ``mw``.
    """
    by_node: dict[str, NodePoint] = {}
    setpoint: NodePoint | None = None
    if options.profile:
        profile = _find_profile(options.profile, profiles)
        for key, point in profile.points.items():
            where = f"device profile {profile.name} point {key}"
            address = str(point.address)
            nodeid = _parse_node_id(address, where)
            if point.field is not None:
                _check_field(point.field, where)
                if "r" in point.access:
                    by_node[address] = NodePoint(address, nodeid, point.field, point.scale)
                if point.field == "mw_setpoint" and "w" in point.access:
                    setpoint = NodePoint(address, nodeid, "mw_setpoint", point.scale)
    for node_id, field in options.nodes.items():
        where = f"options.nodes[{node_id!r}]"
        _check_field(field, where)
        by_node[node_id] = NodePoint(node_id, _parse_node_id(node_id, where), field)
    if options.setpoint_node:
        nodeid = _parse_node_id(options.setpoint_node, "options.setpoint_node")
        setpoint = NodePoint(options.setpoint_node, nodeid, "mw_setpoint")
    fields = [p.field for p in by_node.values()]
    doubled = sorted({f for f in fields if fields.count(f) > 1})
    if doubled:
        raise DerSdkError(f"node map: several nodes feed {', '.join(doubled)}; keep one each")
    if "mw" not in fields and not options.telemetry_write_sim:
        raise DerSdkError(
            "node map: no node feeds 'mw'; map one in options.nodes or choose a profile"
        )
    return list(by_node.values()), setpoint


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UaStatusCodeError):
        return status(exc.code).name
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _python_value(value: Any, kind: type, scale: float) -> Any:
    """The field value of a node value; raises ValueError when it does not fit."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float):
            return value != 0
        raise ValueError(f"expected a boolean, got {type(value).__name__}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {type(value).__name__}")
        number = float(value) * scale
        if not math.isfinite(number):
            raise ValueError(f"not a finite number: {value}")
        return number
    if kind is str:
        if isinstance(value, ua.LocalizedText):
            return value.Text or ""
        return "" if value is None else str(value)
    # details: JSON-friendly values; numbers are scaled
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return value * scale if scale != 1.0 else value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, ua.LocalizedText):
        return value.Text
    return str(value)


def _variant(value: Any, vtype: ua.VariantType) -> ua.Variant:
    """``value`` as a Variant of the node's own type (servers refuse a type mismatch)."""
    if vtype in _INTEGER_TYPES:
        return ua.Variant(round(value), vtype)
    if vtype in (ua.VariantType.Double, ua.VariantType.Float):
        return ua.Variant(float(value), vtype)
    if vtype == ua.VariantType.Boolean:
        return ua.Variant(bool(value), vtype)
    if vtype == ua.VariantType.String:
        return ua.Variant("" if value is None else str(value), vtype)
    return ua.Variant(value)


class _SubscriptionHandler:
    """Caches data change notifications; a bad subscription status turns polling on."""

    def __init__(self, adapter: OpcuaAdapter) -> None:
        self._adapter = adapter

    def datachange_notification(self, node: Node, val: Any, data: DataChangeNotif) -> None:
        value = data.monitored_item.Value
        if value is not None:
            self._adapter._cache[node.nodeid] = value

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        if status.Status.is_bad():
            self._adapter._subscription_problem = f"subscription ended: {status.Status.name}"


class OpcuaAdapter(Adapter):
    """An OPC UA server as the device of one asset."""

    def __init__(self, context: AdapterContext) -> None:
        quiet_asyncua()
        self.asset: Asset = context.asset
        self.options = _options(context.options)
        self.points, self.setpoint = resolve_points(self.options, context.profiles)
        opts = self.options
        self._certificate: bytes | None = None
        self._certificate_x509: x509.Certificate | None = None
        self._private_key: PrivateKeyTypes | None = None
        self._server_x509: x509.Certificate | None = None
        if opts.security_policy == "None":
            if not opts.allow_insecure:
                raise DerSdkError(
                    "options.security_policy None sends everything in clear text to any "
                    "server that answers; set allow_insecure: true to use it (lab only), or "
                    "use Basic256Sha256 with a client certificate"
                )
        else:
            if not (opts.certificate and opts.private_key):
                raise DerSdkError(
                    f"options.certificate and options.private_key are required for security "
                    f"policy {opts.security_policy}; make a pair with "
                    f"`python -m der_sdk_opcua.certs` and add the certificate to the server's "
                    f"trust list"
                )
            self._certificate = load_certificate_der(opts.certificate, "options.certificate")
            self._certificate_x509 = x509.load_der_x509_certificate(self._certificate)
            self._private_key = serialization.load_der_private_key(
                load_private_key_der(opts.private_key, "options.private_key"), password=None
            )
        if opts.server_certificate:
            self._server_x509 = x509.load_der_x509_certificate(
                load_certificate_der(opts.server_certificate, "options.server_certificate")
            )
        if opts.password is not None and opts.username is None:
            raise DerSdkError("options.password is set but options.username is not")
        self.application_uri = (
            opts.application_uri
            or (application_uri_of(self._certificate) if self._certificate else None)
            or f"urn:der-sdk:agent:{self.asset.asset_id}"
        )
        self._client: Client | None = None
        self._subscription: Subscription | None = None
        self._subscription_problem: str | None = None
        self._cache: dict[ua.NodeId, ua.DataValue] = {}
        self._lost: str | None = None
        self._vtypes: dict[ua.NodeId, ua.VariantType] = {}
        self._warned_unpinned = False
        self._battery: SimBattery | None = None
        self._sim_last: float | None = None
        if opts.telemetry_write_sim:
            self._battery = SimBattery.for_asset(self.asset)

    @property
    def label(self) -> str:
        return f"OPC UA server {self.options.endpoint}"

    @property
    def subscribed(self) -> bool:
        """Whether values currently come from a live subscription (not polling)."""
        return self._subscription_values() is not None

    # ------------------------------------------------------------------ connection

    async def connect(self) -> None:
        await self._open()

    async def close(self) -> None:
        await self._close_client()
        if self._battery is not None:
            self._step_simulation()

    async def _open(self) -> None:
        opts = self.options
        client = Client(opts.endpoint, timeout=opts.timeout_s)
        client.application_uri = self.application_uri
        client.name = client.description = f"der-sdk agent, asset {self.asset.name}"
        try:
            if opts.security_policy == "Basic256Sha256":
                assert self._certificate is not None and self._private_key is not None
                if self._server_x509 is None and not self._warned_unpinned:
                    self._warned_unpinned = True
                    log.warning(
                        "asset %s: the server certificate of %s is not pinned "
                        "(options.server_certificate); trusting the one it presents",
                        self.asset.asset_id,
                        opts.endpoint,
                    )
                mode = getattr(ua.MessageSecurityMode, opts.security_mode)
                server_certificate = self._server_x509 or await self._presented_certificate(
                    client, mode
                )
                # What Client.set_security does, with the key parsed once at construction:
                # parsing a 2048-bit RSA key takes tens of milliseconds of event loop time.
                policy = SecurityPolicyBasic256Sha256(  # type: ignore[no-untyped-call]
                    server_certificate, self._certificate_x509, self._private_key, mode
                )
                client.security_policy = policy  # type: ignore[assignment]  # typed as None
                client.uaclient.set_security(policy)
            if opts.username is not None:
                client.set_user(opts.username)
                client.set_password(opts.password or "")
            client.connection_lost_callback = self._on_connection_lost
            await client.connect()
        except BaseException:
            client.disconnect_socket()
            raise
        self._client = client
        self._lost = None
        self._cache.clear()
        self._subscription = None
        self._subscription_problem = None
        await self._learn_types(client)
        if opts.subscribe and self._battery is None:
            await self._subscribe(client)

    @staticmethod
    async def _presented_certificate(
        client: Client, mode: ua.MessageSecurityMode
    ) -> x509.Certificate:
        """The certificate the server presents on its Basic256Sha256 endpoint for ``mode``."""
        endpoints = await client.connect_and_get_server_endpoints()
        endpoint = Client.find_endpoint(endpoints, mode, SecurityPolicyBasic256Sha256.URI)
        certificate: x509.Certificate = uacrypto.x509_from_der(  # type: ignore[no-untyped-call]
            endpoint.ServerCertificate  # the first certificate of a chain
        )
        return certificate

    async def _learn_types(self, client: Client) -> None:
        """The data types of the nodes this adapter writes (servers refuse a mismatch)."""
        targets = [self.setpoint] if self.setpoint is not None else []
        if self._battery is not None:
            targets += self.points
        for point in targets:
            if point.nodeid in self._vtypes:
                continue
            try:
                node = client.get_node(point.nodeid)
                self._vtypes[point.nodeid] = await node.read_data_type_as_variant_type()
            except Exception as exc:
                log.warning(
                    "asset %s: cannot read the data type of %s (%s); writing a Double",
                    self.asset.asset_id,
                    point.node_id,
                    _describe(exc),
                )

    async def _subscribe(self, client: Client) -> None:
        try:
            subscription = await client.create_subscription(
                self.options.publishing_interval_ms, _SubscriptionHandler(self)
            )
            await subscription.subscribe_data_change(
                [client.get_node(p.nodeid) for p in self.points]
            )
        except Exception as exc:
            self._subscription_problem = f"subscription refused: {_describe(exc)}"
            log.warning(
                "asset %s: %s refused a subscription (%s); polling instead",
                self.asset.asset_id,
                self.options.endpoint,
                _describe(exc),
            )
            return
        self._subscription = subscription

    async def _on_connection_lost(self, exc: Exception) -> None:
        self._lost = f"connection lost: {_describe(exc)}"

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        self._subscription = None
        self._cache.clear()
        if client is None:
            return
        try:
            async with asyncio.timeout(min(2.0, self.options.timeout_s)):
                await client.disconnect()
        except Exception as exc:
            log.debug("asset %s: disconnect: %s", self.asset.asset_id, _describe(exc))
        finally:
            client.disconnect_socket()

    async def _ready(self) -> Client:
        """The connected client, connecting again first if the connection was lost."""
        if self._client is not None and self._lost is None:
            return self._client
        reason = self._lost or "not connected"
        await self._close_client()
        try:
            await self._open()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lost = reason
            raise ConnectionError(
                f"{self.label}: {reason}; connecting again failed: {_describe(exc)}"
            ) from None
        log.info("asset %s: connected again to %s", self.asset.asset_id, self.options.endpoint)
        assert self._client is not None
        return self._client

    def _failed(self, what: str, exc: BaseException) -> ConnectionError:
        """A request failed: drop the connection (the next call connects again)."""
        self._lost = f"{what} failed: {_describe(exc)}"
        return ConnectionError(f"{self.label}: {self._lost}")

    # ------------------------------------------------------------------ telemetry

    async def read(self) -> TelemetrySample:
        client = await self._ready()
        if self._battery is not None:
            return await self._write_simulation(client)
        values = self._subscription_values()
        try:
            if values is None:
                values = await client.read_attributes(
                    [client.get_node(p.nodeid) for p in self.points]
                )
            else:
                # A subscription is silent while nothing changes, and so is a server that
                # hangs: one small read per sample proves the cached values are current.
                await client.read_attributes([client.nodes.server_state])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self._failed("read", exc) from None
        return self._sample(values)

    def _subscription_values(self) -> list[ua.DataValue] | None:
        subscription = self._subscription
        if subscription is None or self._subscription_problem is not None or self._lost:
            return None
        if subscription.is_stale(_STALE_MARGIN):
            return None
        try:
            return [self._cache[p.nodeid] for p in self.points]
        except KeyError:  # the first notification has not arrived yet
            return None

    def _sample(self, values: Sequence[ua.DataValue]) -> TelemetrySample:
        core: dict[str, Any] = {}
        details: dict[str, Any] = {}
        bad: list[str] = []
        uncertain: list[str] = []
        for point, value in zip(self.points, values, strict=True):
            code = value.StatusCode if value.StatusCode is not None else ua.StatusCode()
            if code.is_bad():
                bad.append(f"{point.node_id} ({point.field}): {code.name}")
                continue
            if code.is_uncertain():
                uncertain.append(f"{point.node_id} ({point.field}): {code.name}")
            raw = value.Value.Value if value.Value is not None else None
            kind = CORE_FIELDS.get(point.field, object)
            try:
                converted = _python_value(raw, kind, point.scale)
            except ValueError as exc:
                bad.append(f"{point.node_id} ({point.field}): {exc}")
                continue
            if point.field.startswith("details."):
                details[point.field.removeprefix("details.")] = converted
            else:
                core[point.field] = converted
        now = utc_now()
        if bad:
            return TelemetrySample(
                asset_id=self.asset.asset_id,
                site_id=self.asset.site_id,
                ts=now,
                mw=0.0,
                online=False,
                quality="bad",
                quality_reason=f"{self.label}: bad status: {'; '.join(bad)}",
            )
        return TelemetrySample(
            asset_id=self.asset.asset_id,
            site_id=self.asset.site_id,
            ts=now,
            mw=core.get("mw", 0.0),
            mw_setpoint=core.get("mw_setpoint"),
            online=core.get("online", True),
            status=core.get("status") or None,
            fault_code=core.get("fault_code") or None,
            quality="uncertain" if uncertain else "good",
            quality_reason=f"{self.label}: uncertain: {'; '.join(uncertain)}"
            if uncertain
            else None,
            details=details,
        )

    # ------------------------------------------------------------------ control

    async def apply_setpoint(self, mw: float, duration_s: float | None = None) -> SetpointResult:
        if not math.isfinite(mw):
            return SetpointResult(status="rejected", reason=f"setpoint {mw} is not a number")
        # The agent clamps already; the device's own limits are the asset's, so a caller
        # that skipped the agent never commands beyond them either.
        target = self.asset.clamp(mw)
        clamped = (
            f"clamped {mw:g} MW to the asset's limits [{self.asset.min_mw:g}, "
            f"{self.asset.max_mw:g}] MW"
            if target != mw
            else None
        )
        if self._battery is not None:
            self._step_simulation()
            applied = self._battery.set_setpoint(target)
            return SetpointResult(status="applied", applied_mw=applied, reason=clamped)
        if self.setpoint is None:
            return SetpointResult(
                status="rejected",
                reason="no setpoint node: set options.setpoint_node or use a profile with a "
                "writable mw_setpoint point",
            )
        client = await self._ready()
        point = self.setpoint
        vtype = self._vtypes.get(point.nodeid, ua.VariantType.Double)
        raw = target / point.scale if point.scale else target
        try:
            await client.get_node(point.nodeid).write_value(data_value(_variant(raw, vtype)))
        except UaStatusCodeError as exc:
            return SetpointResult(
                status="failed",
                reason=f"{self.label} refused the write to {point.node_id}: {_describe(exc)}",
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self._failed(f"writing {point.node_id}", exc) from None
        return SetpointResult(status="applied", applied_mw=target, reason=clamped)

    # ------------------------------------------------------------------ telemetry_write_sim

    def _step_simulation(self) -> None:
        assert self._battery is not None
        now = time.monotonic()
        if self._sim_last is not None:
            self._battery.step(now - self._sim_last)
        self._sim_last = now

    def _simulated_fields(self) -> dict[str, Any]:
        battery = self._battery
        assert battery is not None
        rating = max(abs(battery.max_mw), abs(battery.min_mw)) or 1.0
        return {
            "mw": battery.mw,
            "mw_setpoint": battery.mw_setpoint,
            "online": True,
            "status": battery.status,
            "fault_code": "",
            "details.soc_pct": round(battery.soc_pct, 6),
            "details.soh_pct": 100.0,
            "details.energy_mwh": round(battery.energy_mwh, 9),
            "details.usable_energy_mwh": round(battery.usable_energy_mwh, 9),
            "details.inverter_temp_c": round(
                25.0 + _TEMP_RISE_AT_FULL_POWER_C * abs(battery.mw) / rating, 3
            ),
        }

    async def _write_simulation(self, client: Client) -> TelemetrySample:
        self._step_simulation()
        fields = self._simulated_fields()
        targets = [p for p in self.points if p.field in fields]
        if self.setpoint is not None and all(p.nodeid != self.setpoint.nodeid for p in targets):
            targets.append(self.setpoint)
        problems: list[str] = []
        if targets:
            values = []
            for point in targets:
                value = fields[point.field]
                if isinstance(value, float) and point.scale:
                    value = value / point.scale
                vtype = self._vtypes.get(point.nodeid, ua.VariantType.Double)
                values.append(data_value(_variant(value, vtype)))
            try:
                results = await client.write_values(
                    [client.get_node(p.nodeid) for p in targets],
                    values,
                    raise_on_partial_error=False,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise self._failed("writing simulated telemetry", exc) from None
            problems = [
                f"{p.node_id}: {r.name}"
                for p, r in zip(targets, results, strict=True)
                if r.is_bad()
            ]
        details = {
            k.removeprefix("details."): v for k, v in fields.items() if k.startswith("details.")
        }
        return TelemetrySample(
            asset_id=self.asset.asset_id,
            site_id=self.asset.site_id,
            ts=datetime.now(UTC),
            mw=fields["mw"],
            mw_setpoint=fields["mw_setpoint"],
            online=True,
            status=fields["status"],
            # the simulation is the source of truth; a failed write only means the OPC UA
            # nodes lag behind it
            quality="uncertain" if problems else "good",
            quality_reason=f"{self.label}: writing simulated telemetry failed: "
            f"{'; '.join(problems)}"
            if problems
            else None,
            details=details,
        )
