"""The Modbus plugin's fixtures live in modbus_kit (importable by the tests as well)."""

from modbus_kit import asset, make_adapter, serve

__all__ = ["asset", "make_adapter", "serve"]
