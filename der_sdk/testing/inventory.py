"""The small inventory the test kit's headend serves unless a test overrides the
``der_inventory_yaml`` fixture: one site with three batteries."""

from __future__ import annotations

__all__ = ["DEFAULT_ASSET_IDS", "DEFAULT_INVENTORY_YAML", "DEFAULT_SITE_ID"]

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
