"""The agent's pytest plugin, registered through the ``pytest11`` entry point
``der_sdk_agent`` (``-p no:der_sdk_agent`` turns it off): ``der_run_agent``,
``der_adapter_type``, ``der_adapter_options`` and ``der_agent_link`` of
:mod:`der_sdk_agent.testing.fixtures`, which run real agents against the headend of the
``der_sdk_headend`` plugin. Without pytest-asyncio it adds nothing.
"""

from __future__ import annotations

from der_sdk.testing.pytest_plugin import HAVE_PYTEST_ASYNCIO

if HAVE_PYTEST_ASYNCIO:
    from der_sdk_agent.testing.fixtures import (
        der_adapter_options,
        der_adapter_type,
        der_agent_link,
        der_run_agent,
    )

    __all__ = ["der_adapter_options", "der_adapter_type", "der_agent_link", "der_run_agent"]
