"""der_register_plugin: a plugin object registered for this test only."""

from collections.abc import Sequence

from der_sdk import hookimpl
from der_sdk.models import TelemetrySample
from der_sdk.testing import RegisterPlugin
from der_sdk_agent.testing import AgentRunner


class TelemetryCounter:
    def __init__(self) -> None:
        self.samples = 0

    @hookimpl
    def der_telemetry_received(self, samples: Sequence[TelemetrySample]) -> None:
        self.samples += len(samples)


async def test_an_observer_sees_the_agents_telemetry(
    der_register_plugin: RegisterPlugin, der_run_agent: AgentRunner
) -> None:
    counter = TelemetryCounter()
    der_register_plugin(counter)  # into der_plugins, which the headend uses

    link = await der_run_agent(adapter_type="test-device")
    await link.wait_for_telemetry()

    assert counter.samples > 0
