"""Read coalescing: the plan is the minimum number of requests, and that is what the
device sees on the wire (counted at a real pymodbus server)."""

from __future__ import annotations

import asyncio
import random

import pytest
from der_sdk_modbus.coalesce import plan_reads
from der_sdk_modbus.points import Point, ProfileError, compile_profile
from modbus_kit import MakeAdapter, Serve, eventually, good_sample

from der_sdk.extensions import DevicePoint, DeviceProfile

SIZES = {"uint16": 1, "int16": 1, "int32": 2, "uint32": 2, "float32": 2, "float64": 4}


def _forty_points(seed: int = 7) -> DeviceProfile:
    """40 points over holding and input registers and coils: runs of contiguous
    registers, small gaps, large gaps, 16- to 64-bit values."""
    rng = random.Random(seed)
    points: dict[str, DevicePoint] = {
        "power": DevicePoint(address=0, unit="kW", field="mw", extra={"type": "int32"})
    }
    address = {"holding": 2, "input": 1000, "coil": 10}
    for index in range(39):
        table = ("holding", "holding", "input", "coil")[index % 4]
        if table == "coil":
            points[f"c{index}"] = DevicePoint(
                address=address["coil"], field=f"details.c{index}", extra={"table": "coil"}
            )
            address["coil"] += rng.choice((1, 1, 3, 40))
            continue
        data_type = rng.choice(list(SIZES))
        points[f"p{index}"] = DevicePoint(
            address=address[table],
            field=f"details.p{index}",
            extra={"table": table, "type": data_type},
        )
        address[table] += SIZES[data_type] + rng.choice((0, 0, 0, 2, 5, 12, 60))
    return DeviceProfile(
        name="forty", vendor="Test", model="40", version="1.0", protocol="modbus", points=points
    )


def _minimum_requests(points: list[Point], limit: int, bit_limit: int, gap: int) -> int:
    """The fewest reads that cover ``points``, by dynamic programming over each table's
    points in address order (independent of the greedy planner)."""
    total = 0
    for table in {p.table for p in points}:
        ordered = sorted((p for p in points if p.table == table), key=lambda p: p.address)
        cap = bit_limit if table in ("coil", "discrete") else limit
        best = [0] + [len(ordered) + 1] * len(ordered)
        for end in range(1, len(ordered) + 1):
            for start in range(end - 1, -1, -1):
                group = ordered[start:end]
                span = max(p.end for p in group) - group[0].address
                covered, ok = group[0].end, True
                for p in group[1:]:
                    ok = ok and p.address - covered <= gap
                    covered = max(covered, p.end)
                if ok and span <= cap:
                    best[end] = min(best[end], best[start] + 1)
        total += best[-1]
    return total


@pytest.mark.parametrize(("limit", "gap"), [(125, 0), (125, 8), (125, 124), (16, 4), (4, 0)])
def test_plan_is_the_minimum_number_of_requests(limit: int, gap: int) -> None:
    points = compile_profile(_forty_points())
    plan = plan_reads(points, max_registers=limit, max_bits=limit, gap_tolerance=gap)
    assert len(plan) == _minimum_requests(points, limit, limit, gap)
    for block in plan:
        assert block.count <= limit
        for point in block.points:  # whole values only, never split across two reads
            assert block.start <= point.address and point.end <= block.end


def test_gap_tolerance_and_read_length_decide_the_merge() -> None:
    profile = DeviceProfile(
        name="g",
        vendor="T",
        model="T",
        version="1",
        protocol="modbus",
        points={
            "a": DevicePoint(address=0, field="mw"),
            "b": DevicePoint(address=1, field="details.b", extra={"type": "float32"}),
            "c": DevicePoint(address=6, field="details.c"),  # a gap of 3
            "d": DevicePoint(address=200, field="details.d"),
            "e": DevicePoint(address=0, field="details.e", extra={"table": "input"}),
        },
    )
    points = compile_profile(profile)
    starts = lambda plan: [(b.table, b.start, b.count) for b in plan]  # noqa: E731
    assert starts(plan_reads(points, gap_tolerance=0)) == [
        ("holding", 0, 3),
        ("holding", 6, 1),
        ("holding", 200, 1),
        ("input", 0, 1),
    ]
    assert starts(plan_reads(points, gap_tolerance=3)) == [
        ("holding", 0, 7),
        ("holding", 200, 1),
        ("input", 0, 1),
    ]
    assert starts(plan_reads(points, gap_tolerance=3, max_registers=5)) == [
        ("holding", 0, 3),
        ("holding", 6, 1),
        ("holding", 200, 1),
        ("input", 0, 1),
    ]
    with pytest.raises(ProfileError, match="spans 2 registers, more than one read may"):
        plan_reads(points, max_registers=1)


async def test_the_wire_sees_only_the_coalesced_requests(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    profile = _forty_points()
    device, server = await serve([profile])
    adapter = make_adapter(
        server, profile="forty", profiles={"forty": profile}, poll_interval_s=0.05
    )
    points = compile_profile(profile)
    minimum = _minimum_requests(points, 125, 2000, 8)
    assert len(adapter.read_plan) == minimum <= 12  # against 40 requests point by point

    await adapter.connect()
    await good_sample(adapter)
    polls_before, reads_before = adapter.polls, device.read_requests()
    await eventually(
        lambda: asyncio.sleep(0, adapter.polls - polls_before >= 10), what="10 more polls"
    )
    await asyncio.sleep(0.02)  # let a poll under way finish
    polls = adapter.polls - polls_before
    reads = device.read_requests() - reads_before
    assert adapter.failed_polls == 0
    # a poll under way at either end may be counted on one side only
    assert (polls - 1) * minimum <= reads <= (polls + 1) * minimum, (polls, reads, minimum)


async def test_a_device_refusing_reads_across_gaps_is_read_without_them(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    profile = DeviceProfile(
        name="holes",
        vendor="T",
        model="T",
        version="1",
        protocol="modbus",
        points={
            "power": DevicePoint(address=0, unit="W", field="mw", extra={"type": "int32"}),
            "soc": DevicePoint(address=5, field="details.soc_pct"),
        },
    )
    device, server = await serve([profile], strict=True)
    adapter = make_adapter(server, profile="holes", profiles={"holes": profile})
    assert len(adapter.read_plan) == 1  # 0..5 in one read, across the unmapped 2..4
    await adapter.connect()
    sample = await good_sample(adapter)
    assert "soc_pct" in sample.details
    assert len(adapter.read_plan) == 2  # it learnt: one read per mapped run
    assert device.by_function[3] >= 3
