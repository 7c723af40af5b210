"""der_test_device: a simulated device whose faults you switch on and off, driven by a
real agent (adapter type "test-device")."""

from der_sdk.testing import DEFAULT_ASSET_IDS, SimulatedDevicePlugin
from der_sdk_agent.testing import AgentRunner

BESS_1 = DEFAULT_ASSET_IDS[0]


async def test_a_device_error_shows_as_bad_quality_until_cleared(
    der_run_agent: AgentRunner, der_test_device: SimulatedDevicePlugin
) -> None:
    link = await der_run_agent(adapter_type="test-device", assets=[BESS_1])
    await link.wait_for_telemetry(BESS_1, lambda s: s.quality == "good")

    der_test_device.device(BESS_1).inject("error")
    bad = await link.wait_for_telemetry(BESS_1, lambda s: s.quality == "bad")
    assert "fault 'error'" in (bad.quality_reason or "")

    der_test_device.device(BESS_1).clear()
    await link.wait_for_telemetry(BESS_1, lambda s: s.quality == "good")
