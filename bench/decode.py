"""The headend's Python work per telemetry sample, in CPU microseconds (issue 19).

No server: the same batches the load generator sends (100 samples, 5 batteries x 20
ticks, three ``details`` fields) are put through each stage of ingest's own code on this
process, timed with ``time.thread_time`` (CPU of this thread, not wall clock, so a busy
machine skews it less; not the whole process's CPU either, which in ``bench all`` also
counts the gRPC threads the benchmarks before it left running) as the best of several
repeats:

* **decode**: ``telemetry_batch_from_pb`` of a parsed batch sent by column (as
  ``der_sdk_agent`` sends it), beside protobuf's own ``ParseFromString`` of that batch
  (the raw limit) and beside decoding each sample of the same batch sent as rows alone
  with ``checked_sample_from_pb`` (how every batch was decoded before issue 19, measured
  in the same run); and, for the record, the rows batch through the column-wise row
  decoder (``_plain_samples``) that older agents' batches take;
* **details check**: ``validate_details`` of each sample's details, beside a bare
  ``msgspec.convert`` of them to the asset type (the C conversion it starts with);
* **SQLite rows**: the parameter list the SQLite backend binds, beside the rows built one
  sample at a time as before.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable

import msgspec

from bench.common import Context, Figure
from bench.loadgen import (
    T0_US,
    _columns_template,
    _sample_template,
    encode_batch,
    encode_columns_batch,
)
from der_sdk.asset_types import BUILTIN_ASSET_TYPES, validate_details
from der_sdk.storage.sqlite import _telemetry_params, _telemetry_row
from der_sdk.wire import codec, pb

__all__ = ["run"]


def cpu_us_per_sample(work: Callable[[], object], samples: int, quick: bool) -> float:
    """CPU microseconds per sample of ``work`` (which handles ``samples`` samples): the
    best of several repeats, each long enough to swamp the clock's granularity."""
    number, repeats = (20, 3) if quick else (400, 7)
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(number):
            work()
        best = min(best, time.thread_time() - start)
    return best / number / samples * 1e6


def _where_it_goes(
    name: str, value: float, raw: float, raw_label: str, shape: dict[str, int]
) -> Figure:
    """An informative figure (no goal) of CPU microseconds per sample beside ``raw``."""
    return Figure(
        name=name,
        value=round(value, 3),
        unit="µs CPU",
        goal="none: where the CPU goes",
        met=None,
        raw=round(raw, 3),
        raw_label=raw_label,
        ratio=round(value / raw, 2),
        details=shape,
    )


async def run(ctx: Context) -> list[Figure]:
    site_id = str(uuid.uuid4())
    asset_ids = [str(uuid.uuid4()) for _ in range(5)]
    templates = [_sample_template(a, site_id) for a in asset_ids]
    rows_raw = encode_batch(templates, 1, T0_US, 20)
    batch = pb.AgentMessage.FromString(rows_raw).telemetry
    raw = encode_columns_batch(_columns_template(asset_ids, site_id, 20), 5, 1, T0_US, 20)
    by_column = pb.AgentMessage.FromString(raw).telemetry
    messages = list(batch.samples)
    n = len(messages)
    samples = codec.telemetry_batch_from_pb(by_column)[0].samples
    if samples != codec.telemetry_batch_from_pb(batch)[0].samples:
        raise AssertionError("the batch by column and as rows decode differently")
    bess = next(t for t in BUILTIN_ASSET_TYPES if t.name == "bess")
    details = [s.details for s in samples]

    def one_at_a_time() -> object:
        return [codec.checked_sample_from_pb(m) for m in messages]

    def rows_one_at_a_time() -> object:
        return list(itertools.chain.from_iterable(map(_telemetry_row, samples)))

    q = ctx.quick
    parse = cpu_us_per_sample(lambda: pb.AgentMessage.FromString(raw), n, q)
    parse_rows = cpu_us_per_sample(lambda: pb.AgentMessage.FromString(rows_raw), n, q)
    decode = cpu_us_per_sample(lambda: codec.telemetry_batch_from_pb(by_column), n, q)
    decode_rows = cpu_us_per_sample(lambda: codec.telemetry_batch_from_pb(batch), n, q)
    before = cpu_us_per_sample(one_at_a_time, n, q)
    check = cpu_us_per_sample(lambda: [validate_details(bess, d) for d in details], n, q)
    convert = cpu_us_per_sample(lambda: [msgspec.convert(d, bess.details) for d in details], n, q)
    rows = cpu_us_per_sample(lambda: _telemetry_params(samples), n, q)
    rows_before = cpu_us_per_sample(rows_one_at_a_time, n, q)
    ctx.say(
        f"per sample, CPU: parse {parse:.3f} us (rows {parse_rows:.3f}), decode {decode:.3f} us "
        f"(rows {decode_rows:.3f}, rows one at a time {before:.3f}), "
        f"details check {check:.3f} us (convert {convert:.3f}), "
        f"SQLite rows {rows:.3f} us (one at a time {rows_before:.3f})"
    )
    shape = {"samples_per_batch": n, "details_fields": len(details[0])}
    return [
        Figure(
            name="telemetry decode per sample",
            value=round(decode, 3),
            unit="µs CPU",
            goal="<= 0.5 of decoding each sample alone (same run)",
            met=decode <= 0.5 * before,
            raw=round(parse, 3),
            raw_label="protobuf ParseFromString of the batch",
            ratio=round(decode / parse, 2),
            details={
                **shape,
                "one_at_a_time_us": round(before, 3),
                "rows_us": round(decode_rows, 3),
                "rows_parse_us": round(parse_rows, 3),
                "bytes": len(raw),
                "rows_bytes": len(rows_raw),
            },
        ),
        _where_it_goes(
            "telemetry decode per sample, sent as rows",
            decode_rows,
            before,
            "each sample decoded alone (the decode before issue 19)",
            shape,
        ),
        _where_it_goes(
            "details check per sample", check, convert, "msgspec.convert to the asset type", shape
        ),
        _where_it_goes(
            "SQLite rows per sample", rows, rows_before, "rows built one sample at a time", shape
        ),
    ]
