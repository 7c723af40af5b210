"""``der sim opcua``: an OPC UA server that behaves like a battery (BESS).

For tests, demos and trying the ``opcua`` adapter without hardware. The battery is the
:class:`~der_sdk_sim_bess.SimBattery` model (limits, ramp rate, round-trip efficiency,
state of charge); every ``step_s`` the simulator applies the value last written to
``SetpointMW``, steps the battery and publishes its state in the node set below
(namespace ``urn:der-sdk:sim:bess``, index 2, string node ids):

=========================  ========  =======================  =====
node id                    type      telemetry field          access
=========================  ========  =======================  =====
``ns=2;s=Bess.ActivePowerMW``  Double    ``mw``                   read
``ns=2;s=Bess.SetpointMW``     Double    ``mw_setpoint``          read/write
``ns=2;s=Bess.SocPct``         Double    ``details.soc_pct``      read
``ns=2;s=Bess.SohPct``         Double    ``details.soh_pct``      read
``ns=2;s=Bess.EnergyMWh``      Double    ``details.energy_mwh``   read
``ns=2;s=Bess.InverterTempC``  Double    ``details.inverter_temp_c``  read
``ns=2;s=Bess.Status``         String    ``status``               read
``ns=2;s=Bess.Online``         Boolean   ``online``               read
``ns=2;s=Bess.FaultCode``      String    ``fault_code``           read
=========================  ========  =======================  =====

The same map ships as the device profile ``der-sim-bess-opcua``. Security: the simulator
offers Basic256Sha256 (Sign, SignAndEncrypt; with a generated certificate unless one is
given) and, unless told otherwise, security policy None; it accepts any client certificate
and, unless ``users`` are given, anyone may write. It is a stand-in device, not a server
to expose. Faults for tests: :meth:`BessSimulator.set_point_status` makes a node report a
bad or uncertain status, :meth:`BessSimulator.drop_connections` cuts every client off,
:meth:`BessSimulator.stall` leaves their requests unanswered and
:meth:`BessSimulator.hold` freezes the values.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from asyncua import ua
from asyncua.server.server import Server
from asyncua.server.user_managers import PermissiveUserManager, UserManager
from der_sdk_sim_bess import SimBattery  # type: ignore[import-not-found,unused-ignore]

from der_sdk.errors import DerSdkError
from der_sdk_opcua._ua import data_value, node_id, quiet_asyncua, stop_server
from der_sdk_opcua._ua import status as ua_status
from der_sdk_opcua.certs import ApplicationCertificate, make_application_certificate
from der_sdk_opcua.profile import (
    OPCUA_SIMULATOR,
    SIM_APPLICATION_URI,
    SIM_NAMESPACE,
    SIM_NS,
    SIM_POINTS,
    SIM_PROFILE_NAME,
    SimPoint,
    add_simulator_arguments,
    sim_device_profile,
    sim_node_id,
)
from der_sdk_opcua.security import AnonymousReadOnlyRuleset, EdgeInternalServer, EdgeUserManager

__all__ = [
    "OPCUA_SIMULATOR",
    "SIM_NAMESPACE",
    "SIM_POINTS",
    "SIM_PROFILE_NAME",
    "BessSimulator",
    "SimPoint",
    "add_simulator_arguments",
    "run_simulator",
    "sim_device_profile",
    "sim_node_id",
]

log = logging.getLogger("der.opcua.sim")

_TEMP_RISE_AT_FULL_POWER_C = 18.0
_AMBIENT_C = 25.0


class BessSimulator:
    """A simulated battery behind an asyncua server.

    ``endpoint`` may use port 0; :attr:`endpoint_url` has the bound port after
    :meth:`start`. Use it as an async context manager in tests. ``writable_points`` lets
    clients write every point (a tag server fed by ``telemetry_write_sim``; give the
    simulator a long ``step_s`` then, or it overwrites them).
    """

    def __init__(
        self,
        *,
        endpoint: str = "opc.tcp://127.0.0.1:4841/der-sim/",
        max_mw: float = 2.0,
        min_mw: float = -2.0,
        capacity_mwh: float = 4.0,
        ramp_rate_mw_per_min: float | None = None,
        efficiency: float = 0.9,
        soc_pct: float = 50.0,
        step_s: float = 0.2,
        noise_mw: float = 0.0,
        seed: int | None = None,
        allow_insecure: bool = True,
        certificate: ApplicationCertificate | None = None,
        users: Mapping[str, str] | None = None,
        writable_points: bool = False,
    ) -> None:
        quiet_asyncua()
        self.battery = SimBattery(
            capacity_mwh=capacity_mwh,
            max_mw=max_mw,
            min_mw=min_mw,
            ramp_rate_mw_per_min=ramp_rate_mw_per_min,
            efficiency=efficiency,
            soc_pct=soc_pct,
        )
        self._initial_soc_pct = self.battery.soc_pct
        self.endpoint = endpoint
        self.step_s = step_s
        self.noise_mw = noise_mw
        self.allow_insecure = allow_insecure
        self.certificate = certificate
        self.users = dict(users) if users is not None else None
        self.writable_points = writable_points
        self.setpoints_applied: list[float] = []
        self._rng = random.Random(seed)
        self._server: Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._overrides: dict[str, int] = {}
        self._last_setpoint: float | None = 0.0  # the node's initial value
        self._held = False
        self._port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint_url(self) -> str:
        """The endpoint with the bound port (after :meth:`start`)."""
        if self._port is None:
            return self.endpoint
        scheme, _, rest = self.endpoint.partition("://")
        hostport, slash, path = rest.partition("/")
        host = hostport.rsplit(":", 1)[0]
        return f"{scheme}://{host}:{self._port}{slash}{path}"

    async def start(self) -> None:
        """Start the server and the battery loop."""
        if self.certificate is None:
            self.certificate = make_application_certificate(
                common_name="der-sim-bess", application_uri=SIM_APPLICATION_URI
            )
        user_manager: UserManager | PermissiveUserManager = PermissiveUserManager()
        if self.users is not None:
            user_manager = EdgeUserManager(users=self.users, allow_anonymous=True, trust=None)
        iserver = EdgeInternalServer(
            user_manager=user_manager,  # type: ignore[arg-type]
            allow_insecure=self.allow_insecure,
        )
        server = Server(iserver=iserver)
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("der-sdk simulated BESS")
        await server.set_application_uri(SIM_APPLICATION_URI)
        policies = [
            ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            ua.SecurityPolicyType.Basic256Sha256_Sign,
        ]
        if self.allow_insecure:
            policies.append(ua.SecurityPolicyType.NoSecurity)
        ruleset = AnonymousReadOnlyRuleset() if self.users is not None else None
        server.set_security_policy(policies, permission_ruleset=ruleset)
        await server.load_certificate(self.certificate.certificate_der)
        await server.load_private_key(self.certificate.private_key_der)
        idx = await server.register_namespace(SIM_NAMESPACE)
        if idx != SIM_NS:  # pragma: no cover - asyncua changed its standard namespaces
            raise RuntimeError(f"simulator namespace got index {idx}, expected {SIM_NS}")
        bess = await server.nodes.objects.add_object(
            node_id("Bess", idx), ua.QualifiedName("Bess", idx)
        )
        for point in SIM_POINTS:
            initial: Any = {
                ua.VariantType.Double: 0.0,
                ua.VariantType.String: "",
                ua.VariantType.Boolean: True,
            }[point.vtype]
            node = await bess.add_variable(
                node_id(f"Bess.{point.key}", idx),
                ua.QualifiedName(point.key, idx),
                ua.Variant(initial, point.vtype),
            )
            if point.writable or self.writable_points:
                await node.set_writable()
        self._server = server
        await self._publish()
        await server.start()
        self._port = server.bserver.port if server.bserver is not None else None
        self._task = asyncio.create_task(self._run(), name="der-opcua-sim")
        log.info(
            "simulated BESS on %s (%g..%g MW, %g MWh, SOC %.0f %%); security: Basic256Sha256%s; "
            "any client certificate accepted",
            self.endpoint_url,
            self.battery.min_mw,
            self.battery.max_mw,
            self.battery.capacity_mwh,
            self.battery.soc_pct,
            " and None" if self.allow_insecure else "",
        )

    async def stop(self) -> None:
        """Stop the loop and the server. Safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        server, self._server = self._server, None
        if server is not None:
            await stop_server(server)

    async def __aenter__(self) -> BessSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ faults

    def set_point_status(self, key: str, status: int | None) -> None:
        """Make point ``key`` report ``status`` (a ``ua.StatusCodes`` value) from the next
        step on: a bad status without a value, an uncertain one with it; ``None`` clears the
        fault. ``SetpointMW`` keeps a bad status until a client writes it again."""
        if key not in {p.key for p in SIM_POINTS}:
            raise KeyError(f"no simulator point {key!r}")
        if status is None:
            self._overrides.pop(key, None)
        else:
            self._overrides[key] = status

    def hold(self, held: bool = True) -> None:
        """Freeze the device: its values stop changing (``False``: it runs again)."""
        self._held = held

    def stall(self, stalled: bool = True) -> int:
        """Stop answering requests on the open connections, so calls hang (``False``:
        answer again); returns how many connections were affected."""
        if self._server is None:
            return 0
        transports = list(self._server.iserver.asyncio_transports)
        for transport in transports:
            if isinstance(transport, asyncio.ReadTransport):
                if stalled:
                    transport.pause_reading()
                else:
                    transport.resume_reading()
        return len(transports)

    async def reset(self) -> None:
        """Back to the start: idle at the initial state of charge, no faults."""
        self._overrides.clear()
        self._held = False
        self.stall(False)
        self.battery.set_setpoint(0.0)
        self.battery.mw = 0.0
        self.battery.soc_pct = self._initial_soc_pct
        self.setpoints_applied.clear()
        self._last_setpoint = 0.0
        if self._server is not None:
            nodeid = ua.NodeId.from_string(sim_node_id("SetpointMW"))
            await self._server.write_attribute_value(
                nodeid, data_value(ua.Variant(0.0, ua.VariantType.Double))
            )
            await self._publish()

    async def publish_now(self) -> None:
        """Publish the state and any fault now instead of at the next step."""
        await self._publish()

    def drop_connections(self) -> int:
        """Close every client connection (the server stays up); returns how many."""
        if self._server is None:
            return 0
        transports = list(self._server.iserver.asyncio_transports)
        for transport in transports:
            transport.close()
        return len(transports)

    def read_point(self, key: str) -> Any:
        """The value point ``key`` holds now (``None`` while it reports a bad status)."""
        assert self._server is not None, "the simulator is not running"
        value = self._server.read_attribute_value(ua.NodeId.from_string(sim_node_id(key)))
        return value.Value.Value if value.Value is not None else None

    # ------------------------------------------------------------------ the battery

    @property
    def setpoint_mw(self) -> float:
        """The setpoint the battery is following (after its own clamp)."""
        return float(self.battery.mw_setpoint)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.step_s)
            now = loop.time()
            try:
                await self.step(now - last)
            except Exception:
                log.exception("simulated BESS step failed")
            last = now

    async def step(self, dt_s: float) -> None:
        """Apply a newly written setpoint, advance ``dt_s`` and publish the state."""
        if self._held:
            return
        self._follow_setpoint()
        self.battery.step(dt_s)
        await self._publish()

    def _follow_setpoint(self) -> None:
        assert self._server is not None
        value = self._server.read_attribute_value(ua.NodeId.from_string(sim_node_id("SetpointMW")))
        written = value.Value.Value if value.Value is not None else None
        if not isinstance(written, int | float) or isinstance(written, bool):
            return
        if not math.isfinite(written) or written == self._last_setpoint:
            return
        self._last_setpoint = float(written)
        applied = self.battery.set_setpoint(float(written))
        self.setpoints_applied.append(applied)
        log.info("simulated BESS: setpoint %g MW written, following %g MW", written, applied)

    async def _publish(self) -> None:
        assert self._server is not None
        now = datetime.now(UTC)
        battery = self.battery
        mw = battery.mw
        if self.noise_mw > 0:
            mw += self._rng.gauss(0.0, self.noise_mw)
        rating = max(abs(battery.max_mw), abs(battery.min_mw)) or 1.0
        values: dict[str, Any] = {
            "ActivePowerMW": mw,
            "SocPct": round(battery.soc_pct, 6),
            "SohPct": 100.0,
            "EnergyMWh": round(battery.energy_mwh, 9),
            "InverterTempC": round(
                _AMBIENT_C + _TEMP_RISE_AT_FULL_POWER_C * abs(battery.mw) / rating, 3
            ),
            "Status": battery.status,
            "Online": True,
            "FaultCode": "",
        }
        for point in SIM_POINTS:
            if point.key not in values and point.key not in self._overrides:
                continue
            nodeid = ua.NodeId.from_string(sim_node_id(point.key))
            status = self._overrides.get(point.key)
            if status is not None:
                code = ua_status(status)
                # a bad value carries no value; an uncertain one keeps it
                value = values[point.key] if point.key in values else self.read_point(point.key)
                variant = (
                    ua.Variant(None, ua.VariantType.Null)
                    if code.is_bad() or value is None
                    else ua.Variant(value, point.vtype)
                )
                dv = data_value(variant, code=code, source_ts=now, server_ts=now)
            else:
                variant = ua.Variant(values[point.key], point.vtype)
                dv = data_value(variant, source_ts=now, server_ts=now)
            await self._server.write_attribute_value(nodeid, dv)


# --------------------------------------------------------------------------- der sim opcua


async def run_simulator(args: argparse.Namespace) -> None:
    """Serve ``der sim opcua`` until cancelled (Ctrl-C) or ``--duration`` ends."""
    sim = BessSimulator(
        endpoint=args.endpoint,
        max_mw=args.max_mw,
        min_mw=args.min_mw,
        capacity_mwh=args.capacity_mwh,
        soc_pct=args.soc,
        ramp_rate_mw_per_min=args.ramp_mw_per_min,
        efficiency=args.efficiency,
        step_s=args.step,
        noise_mw=args.noise_mw,
        allow_insecure=not args.secure_only,
    )
    try:
        await sim.start()
    except OSError as exc:
        await sim.stop()
        raise DerSdkError(f"der sim opcua: cannot serve on {args.endpoint}: {exc}") from None
    except BaseException:
        await sim.stop()
        raise
    try:
        print(
            f"der sim opcua: simulated BESS on {sim.endpoint_url} "
            f"({args.min_mw:g}..{args.max_mw:g} MW, {args.capacity_mwh:g} MWh; device profile "
            f"{SIM_PROFILE_NAME}; security Basic256Sha256"
            + (" and None" if not args.secure_only else "")
            + "); Ctrl-C to stop",
            flush=True,
        )
        if args.duration is not None:
            await asyncio.sleep(args.duration)
        else:
            await asyncio.Event().wait()
    finally:
        await sim.stop()
