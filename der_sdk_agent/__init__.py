"""The reference edge agent: dials out to the headend over one gRPC stream, serves one
asset or a whole site (gateway mode), and reads and controls devices through adapter
plugins. See ``docs/agent.md``.
"""

from der_sdk_agent.agent import Agent, AgentStats
from der_sdk_agent.launch import launch, run_agent, run_launch
from der_sdk_agent.settings import AgentSettings

__all__ = ["Agent", "AgentSettings", "AgentStats", "launch", "run_agent", "run_launch"]
