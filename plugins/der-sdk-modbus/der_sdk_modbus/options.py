"""Per-asset options of the ``modbus`` adapter (the ``options`` block in the agent config)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

__all__ = ["ModbusOptions", "options_from"]


class ModbusOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the device is, which profile describes it, and how to poll it.

    Give ``profile`` (a device profile name from an installed device pack), or set
    ``sunspec_scan`` to let the adapter find the SunSpec models on the device and use the
    matching profiles, or both (a profile whose points are relative to SunSpec models).
    """

    host: Annotated[str, msgspec.Meta(min_length=1)]
    """Host name or IP address of the device or Modbus TCP gateway."""
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 502
    unit_id: Annotated[int, msgspec.Meta(ge=0, le=255)] = 1
    """Modbus unit (slave, device) id; behind a gateway, the device's serial address."""
    profile: str | None = None
    """Device profile name (``der profiles`` lists the installed ones)."""
    profile_version: str | None = None
    """An exact profile version; default: the highest installed."""
    sunspec_scan: bool = False
    """Find the SunSpec marker (40000, 0, 50000) and walk the model chain at connect."""
    poll_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    """How often the device is read; each asset polls on its own schedule."""
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    """Limit for connecting and for each request."""
    retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 1
    """Extra attempts for a request that timed out or found the device busy."""
    max_read_registers: Annotated[int, msgspec.Meta(ge=1, le=125)] = 125
    """The longest register read the device accepts (Modbus allows 125)."""
    max_read_bits: Annotated[int, msgspec.Meta(ge=1, le=2000)] = 2000
    """The longest coil or discrete input read the device accepts (Modbus allows 2000)."""
    gap_tolerance: Annotated[int, msgspec.Meta(ge=0, le=124)] = 8
    """Unused registers one read may span to save a request (0: read only mapped ones)."""
    reconnect_max_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    """Longest wait between connection attempts while the device is unreachable; default
    the poll interval, so a device that comes back is read within one poll."""

    def __post_init__(self) -> None:
        if self.profile is None and not self.sunspec_scan:
            raise ValueError(
                "give a device profile (profile: NAME) or set sunspec_scan: true, or both"
            )
        if self.profile_version is not None and self.profile is None:
            raise ValueError("profile_version needs profile")


def options_from(raw: Any) -> ModbusOptions:
    """``raw`` (already validated by the agent, or a mapping) as :class:`ModbusOptions`."""
    if isinstance(raw, ModbusOptions):
        return raw
    return msgspec.convert(raw or {}, ModbusOptions)
