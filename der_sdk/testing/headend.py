"""A real headend for tests: memory storage, 127.0.0.1, ephemeral ports, a small inventory.

:data:`DEFAULT_INVENTORY_YAML` is the inventory the ``der_headend`` fixture serves unless a
test overrides the ``der_inventory_yaml`` fixture: one site with three batteries.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from der_sdk_headend.config import HeadendConfig

__all__ = [
    "DEFAULT_ASSET_IDS",
    "DEFAULT_INVENTORY_YAML",
    "DEFAULT_SITE_ID",
    "WAIT_S",
    "headend_config",
]

WAIT_S = 5.0
"""The default deadline of every wait in the test kit."""

DEFAULT_SITE_ID = "5e7e0000-0000-4000-8000-0000000000a1"
DEFAULT_ASSET_IDS: tuple[str, str, str] = (
    "5e7e0000-0000-4000-8000-000000000001",  # 4 MWh, -2..2 MW
    "5e7e0000-0000-4000-8000-000000000002",  # 2 MWh, -1..1 MW
    "5e7e0000-0000-4000-8000-000000000003",  # 2 MWh, -0.5..0.5 MW
)

DEFAULT_INVENTORY_YAML = f"""\
sites:
  - site_id: {DEFAULT_SITE_ID}
    name: Test Site
assets:
  - asset_id: {DEFAULT_ASSET_IDS[0]}
    site_id: {DEFAULT_SITE_ID}
    name: BESS 1
    asset_type: bess
    capacity_mwh: 4.0
    max_mw: 2.0
    min_mw: -2.0
  - asset_id: {DEFAULT_ASSET_IDS[1]}
    site_id: {DEFAULT_SITE_ID}
    name: BESS 2
    asset_type: bess
    capacity_mwh: 2.0
    max_mw: 1.0
    min_mw: -1.0
  - asset_id: {DEFAULT_ASSET_IDS[2]}
    site_id: {DEFAULT_SITE_ID}
    name: BESS 3
    asset_type: bess
    capacity_mwh: 2.0
    max_mw: 0.5
    min_mw: -0.5
"""


def headend_config(inventory_path: Path, env: Mapping[str, str] | None = None) -> HeadendConfig:
    """The test headend's configuration: ``memory://`` storage on 127.0.0.1, ports chosen
    by the OS, and REST tokens in ``der-tokens.json`` beside the inventory (none, so REST
    needs no token). ``env`` adds or overrides variables (``SPLIT_POLICY``,
    ``DATABASE_URL``, ``HEADEND_AUTH``...)."""
    from der_sdk_headend.config import HeadendConfig

    return HeadendConfig.from_env(
        {
            "ASSETS_PATH": str(inventory_path),
            "DATABASE_URL": "memory://",
            "HEADEND_GRPC_ADDR": "127.0.0.1:0",
            "HEADEND_HTTP_ADDR": "127.0.0.1:0",
            "HEADEND_TOKENS_FILE": str(inventory_path.parent / "der-tokens.json"),
            **(env or {}),
        }
    )
