"""der-sdk-example-pack: an example device pack (Modbus register maps).

Each YAML file in ``profiles/`` is one device profile; :func:`der_sdk.device_packs.load_profiles`
validates them when the plugins load. The format is described in ``docs/device_packs.md``.
"""

from __future__ import annotations

from der_sdk import hookimpl
from der_sdk.device_packs import load_profiles
from der_sdk.extensions import DeviceProfile

__all__ = ["der_device_profiles"]
__version__ = "0.1.0"


@hookimpl
def der_device_profiles() -> list[DeviceProfile]:
    return load_profiles(__name__)
