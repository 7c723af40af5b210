"""The test kit's agent link: a real :class:`der_sdk_agent.agent.Agent` in the test
process, dialling the test headend of :mod:`der_sdk_headend.testing`.

* :class:`AgentLink`, :class:`AgentRunner`, :data:`FAST_AGENT_SETTINGS`
  (:mod:`der_sdk_agent.testing.agent_link`);
* the fixtures ``der_run_agent``, ``der_adapter_type``, ``der_adapter_options``,
  ``der_agent_link`` (:mod:`der_sdk_agent.testing.fixtures`), registered as a pytest
  plugin by the ``pytest11`` entry point ``der_sdk_agent``.
"""

from __future__ import annotations

from der_sdk_agent.testing.agent_link import FAST_AGENT_SETTINGS, AgentLink, AgentRunner

__all__ = ["FAST_AGENT_SETTINGS", "AgentLink", "AgentRunner"]
