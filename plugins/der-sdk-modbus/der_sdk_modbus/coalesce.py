"""Read coalescing: the fewest read requests that cover a set of points.

Points of one table are sorted by address and merged left to right into blocks: the next
point joins the current block when the unused registers between them are at most
``gap_tolerance`` and the block would stay within the device's maximum read length. A
point is never split across two requests, so a 32- or 64-bit value always comes from one
response. For intervals on a line this greedy merge gives the minimum number of blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from der_sdk_modbus.points import BIT_TABLES, Point, ProfileError, Table

__all__ = ["MAX_READ_BITS", "MAX_READ_REGISTERS", "ReadBlock", "plan_reads"]

MAX_READ_REGISTERS = 125
"""The Modbus limit for one read of holding or input registers (function 3 and 4)."""
MAX_READ_BITS = 2000
"""The Modbus limit for one read of coils or discrete inputs (function 1 and 2)."""

_TABLE_ORDER: dict[str, int] = {"holding": 0, "input": 1, "coil": 2, "discrete": 3}


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: ``count`` registers (or bits) of ``table`` from ``start``."""

    table: Table
    start: int
    count: int
    points: tuple[Point, ...]

    @property
    def end(self) -> int:
        return self.start + self.count

    @property
    def has_gaps(self) -> bool:
        """Whether the block reads addresses that no point of it covers."""
        covered = self.start
        for point in sorted(self.points, key=lambda p: p.address):
            if point.address > covered:
                return True
            covered = max(covered, point.end)
        return covered < self.end

    def describe(self) -> str:
        return f"{self.table} {self.start}..{self.end - 1} ({self.count})"


def plan_reads(
    points: Iterable[Point],
    *,
    max_registers: int = MAX_READ_REGISTERS,
    max_bits: int = MAX_READ_BITS,
    gap_tolerance: int = 0,
    readable: Sequence[tuple[Table, int, int]] = (),
) -> list[ReadBlock]:
    """The read requests for ``points``: per table, in address order.

    :param max_registers: the longest register read the device accepts.
    :param max_bits: the longest coil or discrete input read the device accepts.
    :param gap_tolerance: unused registers (or bits) a block may read to save a request.
    :param readable: ``(table, start, end)`` ranges known to be readable as a whole (a
        scanned SunSpec map): a gap inside one may be read whatever its size.
    :raises ProfileError: a point is longer than one read may be.
    """
    by_table: dict[Table, list[Point]] = {}
    for point in points:
        by_table.setdefault(point.table, []).append(point)
    blocks: list[ReadBlock] = []
    for table in sorted(by_table, key=_TABLE_ORDER.__getitem__):
        limit = max_bits if table in BIT_TABLES else max_registers
        members: list[Point] = []
        start = end = 0
        for point in sorted(by_table[table], key=lambda p: (p.address, -p.end)):
            if point.count > limit:
                raise ProfileError(
                    f"point {point.label()} spans {point.count} registers, more than one read "
                    f"may ({limit}); raise max_read_registers or shorten the point"
                )
            if (
                members
                and (
                    point.address - end <= gap_tolerance
                    or any(
                        t == table and lo <= end and point.address <= hi for t, lo, hi in readable
                    )
                )
                and max(end, point.end) - start <= limit
            ):
                members.append(point)
                end = max(end, point.end)
                continue
            if members:
                blocks.append(ReadBlock(table, start, end - start, tuple(members)))
            members, start, end = [point], point.address, point.end
        if members:
            blocks.append(ReadBlock(table, start, end - start, tuple(members)))
    return blocks
