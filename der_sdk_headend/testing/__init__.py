"""The test kit's headend: a real headend on memory storage, 127.0.0.1, ephemeral ports,
serving the inventory of :mod:`der_sdk.testing.inventory` (one site, three batteries).

Its fixtures (``der_headend_config``, ``der_headend``, ``der_http``) are in
:mod:`der_sdk_headend.testing.fixtures`, registered as a pytest plugin by the ``pytest11``
entry point ``der_sdk_headend`` (:mod:`der_sdk_headend.testing.pytest_plugin`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from der_sdk.plugins import Plugins
    from der_sdk_headend.config import HeadendConfig
    from der_sdk_headend.service import Headend

__all__ = ["headend_config", "running_headend"]


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


@contextlib.asynccontextmanager
async def running_headend(config: HeadendConfig, plugins: Plugins) -> AsyncIterator[Headend]:
    """A started :class:`~der_sdk_headend.service.Headend` with ``plugins``, stopped on
    exit (the ``der_headend`` fixture's, for tests that build their own config)."""
    from der_sdk_headend.service import Headend

    headend = Headend(config, plugins=plugins)
    await headend.start()
    try:
        yield headend
    finally:
        await headend.stop()
