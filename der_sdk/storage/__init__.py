"""The async storage contract and its built-in backends (``memory://``, ``sqlite:///PATH``)."""

from der_sdk.storage.contract import DEFAULT_DATABASE_URL, StorageBackend, open_storage

__all__ = ["DEFAULT_DATABASE_URL", "StorageBackend", "open_storage"]
