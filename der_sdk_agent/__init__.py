"""The reference edge agent: dials out to the headend over one gRPC stream, serves one
asset or a whole site (gateway mode), and reads and controls devices through adapter
plugins. See ``docs/agent.md``.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from der_sdk.lazy_exports import lazy_getattr

if TYPE_CHECKING:
    from der_sdk_agent.agent import Agent, AgentStats
    from der_sdk_agent.launch import launch, run_agent, run_launch
    from der_sdk_agent.settings import AgentSettings

__all__ = ["Agent", "AgentSettings", "AgentStats", "launch", "run_agent", "run_launch"]

# Imported on first use: the ``der`` command loads this package's command plugin
# (:mod:`der_sdk_agent.commands`) on every run, and must not pay for gRPC and the agent.
_EXPORTS = {
    "Agent": "agent",
    "AgentStats": "agent",
    "AgentSettings": "settings",
    "launch": "launch",
    "run_agent": "launch",
    "run_launch": "launch",
}


__getattr__ = lazy_getattr(__name__, _EXPORTS)


class _AgentPackage(types.ModuleType):
    """``der_sdk_agent.launch`` stays the function: importing the submodule of that name
    would otherwise replace it with the module (eager imports used to rebind it)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "launch" and isinstance(value, types.ModuleType):
            value = value.launch
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _AgentPackage
