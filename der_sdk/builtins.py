"""The built-in plugins: registered through the same hooks as external ones, in this order."""

BUILTIN_PLUGINS: tuple[str, ...] = (
    "der_sdk.asset_types",
    "der_sdk.split",
    "der_sdk.storage.memory",
    "der_sdk.storage.sqlite",
    "der_sdk.bus.memory",
    "der_sdk.commands",
    "der_sdk.export.folder",
)
