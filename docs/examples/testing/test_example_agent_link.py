"""der_run_agent: drive your adapter through the real agent, against der_headend."""

from der_sdk.testing import DEFAULT_ASSET_IDS
from der_sdk_agent.testing import AgentRunner

BESS_1 = DEFAULT_ASSET_IDS[0]  # limited to -2..2 MW


async def test_a_dispatch_reaches_the_device(der_run_agent: AgentRunner) -> None:
    link = await der_run_agent(adapter_type="sim-bess", options={"initial_soc_pct": 60})

    sample = await link.wait_for_telemetry(BESS_1)
    assert sample.details["soc_pct"] > 0

    dispatch = await link.dispatch(5.0, asset_id=BESS_1)  # above the limit: clamped
    applied = await link.wait_for_dispatch(dispatch.dispatch_id, "applied")

    assert applied.targets[0].applied_mw == 2.0
    await link.wait_for_telemetry(BESS_1, lambda s: s.mw_setpoint == 2.0)
