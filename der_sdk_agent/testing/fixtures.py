"""The fixtures of the test kit that run a reference agent against the test headend (see
``docs/testing.md``): ``der_run_agent``, ``der_adapter_type``, ``der_adapter_options`` and
``der_agent_link``. They stand on ``der_headend`` and ``der_http``
(:mod:`der_sdk_headend.testing.fixtures`) and ``der_plugins`` / ``der_test_device``
(:mod:`der_sdk.testing.fixtures`).

Override ``der_adapter_type`` / ``der_adapter_options`` in your ``conftest.py`` or test
module for ``der_agent_link``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from der_sdk.plugins import Plugins
from der_sdk.testing.devices import TEST_DEVICE
from der_sdk_agent.testing.agent_link import AgentLink, AgentRunner

if TYPE_CHECKING:
    import httpx

    from der_sdk_headend.service import Headend

__all__ = ["der_adapter_options", "der_adapter_type", "der_agent_link", "der_run_agent"]


@pytest_asyncio.fixture
async def der_run_agent(
    request: pytest.FixtureRequest,
    der_headend: Headend,
    der_plugins: Plugins,
    der_http: httpx.AsyncClient,
) -> AsyncIterator[AgentRunner]:
    """``await der_run_agent(adapter_type=..., options=..., assets=...)`` starts a real
    agent against ``der_headend`` and returns an :class:`AgentLink`; every agent started
    is stopped at teardown. ``adapter_type="test-device"`` registers that type if needed.
    """

    def provide(adapter_type: str) -> None:
        if adapter_type == TEST_DEVICE:
            request.getfixturevalue("der_test_device")

    runner = AgentRunner(der_headend, der_plugins, der_http, provide_adapter=provide)
    try:
        yield runner
    finally:
        await runner.close()


@pytest.fixture
def der_adapter_type() -> str:
    """The adapter type ``der_agent_link`` runs. Override it with your adapter's name."""
    return TEST_DEVICE


@pytest.fixture
def der_adapter_options() -> Mapping[str, Any]:
    """The adapter options ``der_agent_link`` gives every asset. Override as needed."""
    return {}


@pytest_asyncio.fixture
async def der_agent_link(
    der_run_agent: AgentRunner, der_adapter_type: str, der_adapter_options: Mapping[str, Any]
) -> AgentLink:
    """A registered agent serving the inventory's first site with ``der_adapter_type``."""
    return await der_run_agent(adapter_type=der_adapter_type, options=der_adapter_options)
