"""The options of the ``opcua`` adapter and the ``opcua-server`` edge service.

Apart from the adapter and the server so that registering them (every ``der`` process
loads the plugin) does not import asyncua: the agent checks each asset's options
against these types when it loads its configuration, before anything connects.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

__all__ = ["DEFAULT_NAMESPACE", "OpcuaAdapterOptions", "OpcuaServerOptions"]

DEFAULT_NAMESPACE = "urn:der-sdk:edge"
"""The namespace URI of the edge server's address space unless its options say another."""


class OpcuaAdapterOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-asset options of the ``opcua`` adapter (``assets.<id>.options``)."""

    endpoint: str
    """The server, e.g. ``opc.tcp://10.0.0.5:4840/``."""
    profile: str | None = None
    """A device profile with protocol ``opcua`` (``NAME`` or ``NAME@VERSION``)."""
    nodes: dict[str, str] = msgspec.field(default_factory=dict)
    """Node id → telemetry field (``mw``, ``details.soc_pct``...); wins over the profile."""
    setpoint_node: str | None = None
    """The node to write setpoints (MW) to; default: the profile's writable ``mw_setpoint``."""
    subscribe: bool = True
    """Use a subscription (polling when the server refuses one or it goes quiet)."""
    publishing_interval_ms: Annotated[int, msgspec.Meta(ge=10)] = 500
    security_policy: Literal["Basic256Sha256", "None"] = "Basic256Sha256"
    security_mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    allow_insecure: bool = False
    """Required to use ``security_policy: None`` (clear text, any server)."""
    certificate: str | None = None
    """The client application certificate (PEM or DER); required with Basic256Sha256."""
    private_key: str | None = None
    """Its private key (PEM or DER, unencrypted)."""
    server_certificate: str | None = None
    """Pin the server's certificate; without it the one the server presents is used."""
    application_uri: str | None = None
    """Default: the URI in the client certificate."""
    username: str | None = None
    password: str | None = None
    telemetry_write_sim: bool = False
    """Simulate telemetry and write it into the mapped nodes instead of reading them."""
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 4.0
    """Limit of one OPC UA request."""


class OpcuaServerOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Options of the ``opcua-server`` edge service (``edge_services[].options``)."""

    endpoint: str = "opc.tcp://0.0.0.0:4840/der-sdk/"
    namespace: str = DEFAULT_NAMESPACE
    certificate: str | None = None
    """The server's application certificate (PEM or DER); required unless insecure only."""
    private_key: str | None = None
    application_uri: str | None = None
    """Default: the URI in the certificate, else ``urn:der-sdk:edge:<agent_id>``."""
    security_modes: list[Literal["Sign", "SignAndEncrypt"]] = msgspec.field(
        default_factory=lambda: ["SignAndEncrypt"]
    )
    """Basic256Sha256 endpoints to offer."""
    allow_insecure: bool = False
    """Also offer security policy None (no signing, no encryption). Lab and demo only."""
    trusted_certificates: str | None = None
    """Folder of trusted client certificates (PEM or DER); nobody is trusted without it."""
    revoked_certificates: str | None = None
    """Folder of certificate revocation lists (PEM or DER)."""
    allow_anonymous: bool = True
    """Anonymous sessions may browse, read and subscribe (never write)."""
    users: dict[str, str] = msgspec.field(default_factory=dict)
    """Username → password of the users who may write controls."""
    site_controls: bool | None = None
    """``Site/`` controls; default: when the agent serves more than one asset (a gateway)."""
    setpoint_duration_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    """Hold a setpoint written here this long, then return to 0 MW (default: until replaced)."""
