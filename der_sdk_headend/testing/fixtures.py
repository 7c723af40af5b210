"""The fixtures of the test kit that run a reference headend (see ``docs/testing.md``):
``der_headend_config``, ``der_headend`` and ``der_http``. They stand on the fixtures of
:mod:`der_sdk.testing.fixtures` (``der_plugins``, ``der_inventory_path``).

Override ``der_headend_config`` in your ``conftest.py`` or test module for other headend
settings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio

from der_sdk.plugins import Plugins
from der_sdk.testing.waits import WAIT_S
from der_sdk_headend.testing import headend_config, running_headend

if TYPE_CHECKING:
    import httpx

    from der_sdk_headend.config import HeadendConfig
    from der_sdk_headend.service import Headend

__all__ = ["der_headend", "der_headend_config", "der_http"]


@pytest.fixture
def der_headend_config(der_inventory_path: Path) -> HeadendConfig:
    """``memory://`` storage, 127.0.0.1, ports chosen by the OS. Override it to change
    settings: ``return headend_config(der_inventory_path, {"SPLIT_POLICY": "equal"})``."""
    return headend_config(der_inventory_path)


@pytest_asyncio.fixture
async def der_headend(
    der_headend_config: HeadendConfig, der_plugins: Plugins
) -> AsyncIterator[Headend]:
    """A started reference headend (REST and gRPC), stopped at teardown."""
    async with running_headend(der_headend_config, der_plugins) as headend:
        yield headend


@pytest_asyncio.fixture
async def der_http(der_headend: Headend) -> AsyncIterator[httpx.AsyncClient]:
    """An ``httpx.AsyncClient`` with ``base_url`` set to the headend's REST API."""
    import httpx

    async with httpx.AsyncClient(base_url=der_headend.http_url, timeout=WAIT_S) as client:
        yield client
