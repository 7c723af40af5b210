"""Fixtures of the OPC UA plugin's tests (helpers live in ``opcua_kit``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from der_sdk_opcua.simulator import BessSimulator
from opcua_kit import Pki, SimulatorThread, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Made once per session (RSA keys are slow to make)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[BessSimulator]:
    """A simulated battery (+-2 MW, 4 MWh) on a free loopback port, stepping fast."""
    simulator = BessSimulator(endpoint="opc.tcp://127.0.0.1:0/der-sim/", step_s=0.05)
    async with simulator:
        yield simulator


@pytest.fixture(scope="module")
def device_thread() -> Iterator[SimulatorThread]:
    """One simulated battery (4 MWh, +-2 MW) for a whole module, in a thread of its own."""
    thread = SimulatorThread()
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest_asyncio.fixture
async def device(device_thread: SimulatorThread) -> SimulatorThread:
    """The module's simulated battery, back to idle at 50 % with no faults."""
    await device_thread.run(lambda sim: sim.reset())
    return device_thread
