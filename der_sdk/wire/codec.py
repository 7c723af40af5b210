"""Conversion between the protobuf wire messages and the msgspec domain model.

This is the only module that knows both; the headend and agent speak domain Structs and
call these functions at the stream edge. The link's Structs (:class:`Allocation`,
:class:`LocalDispatchReport`, :class:`BufferStats`, ...) live in :mod:`der_sdk.models`;
the first three are also importable from here, where they were defined before 0.3.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import operator
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import msgspec
from google.protobuf.message import DecodeError

from der_sdk.models import (
    AgentHeartbeat,
    Allocation,
    BufferStats,
    EventAck,
    LocalDispatchReport,
    SeqRange,
    SetpointAck,
    SetpointCommand,
    SetpointOutcomeAck,
    TelemetryAck,
    TelemetryBatch,
    TelemetrySample,
    holds_non_finite,
    refuse_non_finite,
)
from der_sdk.wire import pb
from der_sdk.wire.columns import column_values, encode_columns, rows_from_columns

__all__ = [
    "AgentEventRecord",
    "Allocation",
    "BufferStats",
    "LocalDispatchReport",
    "SeqRange",
    "agent_event",
    "agent_heartbeat",
    "agent_heartbeat_from_pb",
    "agent_local_dispatch",
    "agent_register",
    "agent_setpoint_ack",
    "agent_telemetry",
    "agent_telemetry_payload",
    "allocations_from_pb",
    "batch_dropped",
    "batch_sample_count",
    "buffer_stats_from_pb",
    "buffer_stats_to_pb",
    "checked_sample_from_pb",
    "datetime_from_us",
    "datetime_to_us",
    "event_from_pb",
    "headend_command",
    "headend_event_ack",
    "headend_local_dispatch_ack",
    "headend_message",
    "headend_outcome_ack",
    "headend_register_ack",
    "headend_setpoint",
    "headend_telemetry_ack",
    "local_dispatch_from_pb",
    "parse_agent_message",
    "sample_from_pb",
    "sample_to_pb",
    "samples_from_batch",
    "setpoint_ack_from_pb",
    "telemetry_batch_from_pb",
    "telemetry_payload",
]

_Encoded = TypeVar("_Encoded")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_json_encode = msgspec.json.Encoder().encode
_json_decode_object = msgspec.json.Decoder(dict[str, Any]).decode
_json_decode_objects = msgspec.json.Decoder(list[dict[str, Any]]).decode


class AgentEventRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An agent-side event for the headend's record (``AgentEvent`` on the wire)."""

    event_id: str
    ts: datetime
    kind: str
    message: str
    asset_id: str | None = None
    data: dict[str, Any] = msgspec.field(default_factory=dict)


def datetime_to_us(ts: datetime) -> int:
    """Microseconds since the Unix epoch; a naive datetime is taken as UTC."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def datetime_from_us(us: int) -> datetime:
    """The aware UTC datetime for microseconds since the Unix epoch.

    :raises ValueError: ``us`` is outside the years 1..9999.
    """
    try:
        return _EPOCH + timedelta(0, 0, us)
    except OverflowError:
        raise ValueError(f"timestamp {us} us since the epoch is out of range") from None


# ----------------------------------------------------------------------------- telemetry


def sample_to_pb(sample: TelemetrySample) -> pb.Telemetry:
    msg = pb.Telemetry(
        asset_id=sample.asset_id,
        site_id=sample.site_id,
        ts_us=datetime_to_us(sample.ts),
        mw=sample.mw,
        online=sample.online,
        seq=sample.seq,
        quality=sample.quality,
    )
    if sample.mw_setpoint is not None:
        msg.mw_setpoint = sample.mw_setpoint
    if sample.status is not None:
        msg.status = sample.status
    if sample.fault_code is not None:
        msg.fault_code = sample.fault_code
    if sample.quality_reason is not None:
        msg.quality_reason = sample.quality_reason
    if sample.details:
        msg.details_json = _json_encode(sample.details)
    return msg


def sample_from_pb(msg: pb.Telemetry) -> TelemetrySample:
    """A domain sample from the wire (:func:`checked_sample_from_pb` without the problems).

    :raises ValueError: as :func:`checked_sample_from_pb`.
    """
    return checked_sample_from_pb(msg)[0]


def checked_sample_from_pb(msg: pb.Telemetry) -> tuple[TelemetrySample, Sequence[str]]:
    """A domain sample from the wire, and its non-finite numbers refused.

    A non-finite ``mw``, ``mw_setpoint`` or ``details`` number makes the sample ``bad``
    with the field named (:func:`der_sdk.models.refuse_non_finite`). msgspec's JSON decoder
    refuses ``NaN``, ``Infinity`` and numbers beyond a double; only then is
    ``details_json`` read again by the standard library, which takes them, so that the
    sample is kept (as ``bad``, without those fields) instead of lost.

    :return: ``(sample, problems)``: one message per refused field, empty when none.
    :raises ValueError: ``details_json`` is not a JSON object, or ``quality`` is unknown;
        the message names the asset.
    """
    lenient = False
    try:
        details = _json_decode_object(msg.details_json) if msg.details_json else {}
    except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        with_non_finite = _details_with_non_finite(msg.details_json)
        if with_non_finite is None:
            raise ValueError(
                f"asset {msg.asset_id}: details_json is not a JSON object: {exc}"
            ) from exc
        details, lenient = with_non_finite, True
    quality = msg.quality or "good"
    if quality not in ("good", "uncertain", "bad"):
        raise ValueError(f"asset {msg.asset_id}: unknown quality {quality!r}")
    try:
        ts = datetime_from_us(msg.ts_us)
    except ValueError as exc:
        raise ValueError(f"asset {msg.asset_id}: {exc}") from None
    mw_setpoint = msg.mw_setpoint if msg.HasField("mw_setpoint") else None
    sample = TelemetrySample(
        asset_id=msg.asset_id,
        site_id=msg.site_id,
        ts=ts,
        mw=msg.mw,
        mw_setpoint=mw_setpoint,
        online=msg.online,
        status=msg.status if msg.HasField("status") else None,
        fault_code=msg.fault_code if msg.HasField("fault_code") else None,
        seq=msg.seq,
        quality=quality,  # type: ignore[arg-type]
        quality_reason=msg.quality_reason if msg.HasField("quality_reason") else None,
        details=details,
    )
    if (
        lenient
        or not math.isfinite(sample.mw)
        or (mw_setpoint is not None and not math.isfinite(mw_setpoint))
    ):
        return refuse_non_finite(sample)
    return sample, ()


def _details_with_non_finite(raw: bytes) -> dict[str, Any] | None:
    """``raw`` read by the standard library's JSON parser, which takes ``NaN``,
    ``Infinity`` and overflowing numbers; ``None`` unless that gives an object holding a
    non-finite number (then it was malformed for another reason)."""
    try:
        details = json.loads(raw)
        if isinstance(details, dict) and holds_non_finite(details):
            return details
    except (ValueError, RecursionError):  # RecursionError: nested too deep to walk
        pass
    return None


# The ``Telemetry`` field each TelemetrySample field is made from, in the Struct's order.
_telemetry_fields = operator.attrgetter(
    *(
        {"ts": "ts_us", "details": "details_json"}.get(f, f)
        for f in TelemetrySample.__struct_fields__
    )
)
# The optional fields among them (``None`` when not sent), by position.
_OPTIONAL_FIELDS = ((4, "mw_setpoint"), (6, "status"), (7, "fault_code"), (10, "quality_reason"))
_QUALITIES = frozenset(("", "good", "uncertain", "bad"))


def _samples_of(columns: Sequence[Sequence[Any]]) -> list[TelemetrySample]:
    """The samples of ``columns``: one per field of :class:`TelemetrySample`, in its order,
    every value already checked and converted."""
    return [
        TelemetrySample(
            asset_id=asset_id,
            site_id=site_id,
            ts=ts,
            mw=mw,
            mw_setpoint=mw_setpoint,
            online=online,
            status=status,
            fault_code=fault_code,
            seq=seq,
            quality=quality,
            quality_reason=quality_reason,
            details=details,
        )
        for (
            asset_id,
            site_id,
            ts,
            mw,
            mw_setpoint,
            online,
            status,
            fault_code,
            seq,
            quality,
            quality_reason,
            details,
        ) in zip(*columns, strict=True)
    ]


def _plain_samples(messages: Sequence[pb.Telemetry]) -> list[TelemetrySample] | None:
    """The samples of ``messages`` decoded column by column, when every one decodes
    without a problem; ``None`` when any does not (the caller then decodes each one with
    :func:`checked_sample_from_pb`, which says what is wrong).

    The same samples as :func:`checked_sample_from_pb` gives, but the fields of all the
    messages are read by one ``attrgetter`` each and most conversions run as loops in C
    over a whole column (time stamps, details, finiteness), so the Python code per sample
    is little more than making the Struct.
    """
    columns: list[Sequence[Any]] = list(zip(*map(_telemetry_fields, messages), strict=True))
    if not columns:
        return []
    for index, name in _OPTIONAL_FIELDS:
        values = columns[index]
        if all(values):
            continue
        # A default value (0.0, ""): sent, or not sent at all?
        if not any(values) and not any(map(operator.methodcaller("HasField", name), messages)):
            columns[index] = [None] * len(values)  # the usual case: never sent
        else:
            columns[index] = [
                v if v or m.HasField(name) else None for v, m in zip(values, messages, strict=True)
            ]
    quality = columns[9]
    kinds = set(quality)
    if not kinds <= _QUALITIES:
        return None
    if "" in kinds:
        columns[9] = [q or "good" for q in quality]
    raw = columns[11]
    try:
        if b"" in raw:
            columns[11] = [_json_decode_object(d) if d else {} for d in raw]
        else:
            columns[11] = list(map(_json_decode_object, raw))
        columns[2] = _stamps(columns[2])
    except (msgspec.DecodeError, RecursionError, OverflowError):
        return None
    setpoints = columns[4]
    if None in setpoints:
        setpoints = [s for s in setpoints if s is not None]
    if not (all(map(math.isfinite, columns[3])) and all(map(math.isfinite, setpoints))):
        return None
    return _samples_of(columns)


# Times within this many microseconds of the epoch (2**32 s: 1833 to 2106) convert
# exactly through a float of seconds (tests/test_wire_columns.py shows it, and where the
# float's precision runs out: beyond 2**33 s).
_FLOAT_EXACT_US = 2**32 * 1_000_000
_stamps_from_seconds = functools.partial(msgspec.convert, type=list[datetime], strict=False)


def _stamps(times_us: Sequence[int]) -> list[datetime]:
    """The aware UTC datetimes of ``times_us`` (as :func:`datetime_from_us` gives them).

    msgspec makes datetimes from Unix seconds in C, about five times faster than a
    ``timedelta`` per sample; a float of seconds holds every microsecond exactly within
    :data:`_FLOAT_EXACT_US` of the epoch, so outside that the exact way is taken.

    :raises OverflowError: a time is outside the years 1..9999.
    """
    if times_us and min(times_us) > -_FLOAT_EXACT_US and max(times_us) < _FLOAT_EXACT_US:
        seconds = list(map(operator.truediv, times_us, itertools.repeat(1e6)))
        stamps: list[datetime] = _stamps_from_seconds(seconds)
        return stamps
    deltas = map(timedelta, itertools.repeat(0), itertools.repeat(0), times_us)
    return list(map(operator.add, itertools.repeat(_EPOCH), deltas))


def _column_samples(columns: pb.TelemetryColumns) -> list[TelemetrySample] | None:
    """The samples of ``columns`` when every one decodes without a problem; ``None`` when
    any does not (the caller then checks each one as a row, which says what is wrong).

    The same samples as the rows of :func:`~der_sdk.wire.columns.rows_from_columns` give,
    each field of the batch converted by a loop in C.

    :raises ValueError: the columns do not fit together (the message names the column).
    """
    values = column_values(columns)
    n = columns.count
    kinds = set(columns.qualities)
    if not kinds <= _QUALITIES:
        return None
    quality = values.quality
    if "" in kinds:
        quality = [q or "good" for q in quality]
    raw = values.details_json
    try:
        details = _json_decode_objects(raw) if raw else [{} for _ in range(n)]
        stamps = _stamps(values.ts_us)
    except (msgspec.DecodeError, RecursionError, OverflowError):
        return None
    if len(details) != n:
        raise ValueError(
            f"telemetry columns: details_json holds {len(details)} values for {n} samples"
        )
    setpoints = values.mw_setpoint
    if None in setpoints:
        setpoints = [s for s in setpoints if s is not None]
    if not (all(map(math.isfinite, values.mw)) and all(map(math.isfinite, setpoints))):  # type: ignore[arg-type]
        return None
    return _samples_of(
        [
            values.asset_id,
            values.site_id,
            stamps,
            values.mw,
            values.mw_setpoint,
            values.online,
            values.status,
            values.fault_code,
            values.seq,
            quality,
            values.quality_reason,
            details,
        ]
    )


def batch_sample_count(batch: pb.TelemetryBatch) -> int:
    """How many samples ``batch`` sends, as rows and by column (before any is decoded)."""
    return len(batch.samples) + batch.columns.count


def samples_from_batch(batch: pb.TelemetryBatch) -> list[TelemetrySample]:
    """Every sample of ``batch`` (rows, then columns), as :func:`sample_from_pb` gives it.

    :raises ValueError: as :func:`sample_from_pb`, for the first sample that does not
        decode, or the columns do not fit together.
    """
    messages = list(batch.samples)
    plain = _plain_samples(messages)
    samples = plain if plain is not None else [sample_from_pb(m) for m in messages]
    if batch.HasField("columns"):
        by_column = _column_samples(batch.columns)
        if by_column is None:
            by_column = [sample_from_pb(m) for m in rows_from_columns(batch.columns)]
        samples.extend(by_column)
    return samples


def telemetry_batch_from_pb(
    msg: pb.TelemetryBatch,
) -> tuple[TelemetryBatch, list[tuple[str, str]]]:
    """The domain batch, each sample decoded as :func:`checked_sample_from_pb` does it
    (a batch whose samples all decode without a problem, the common case, in one pass
    over each field: :func:`_plain_samples`, or :func:`_column_samples` for a batch sent
    by column).

    A sample that does not decode is left out; the batch goes on without it.

    :return: ``(batch, skipped)``: ``skipped`` lists ``(asset id, reason)`` for each sample
        left out, empty when none.
    :raises ValueError: the batch's columns do not fit together (the message names the
        column); nothing of the batch is taken.
    """
    messages = list(msg.samples)
    plain = _plain_samples(messages)
    samples, skipped, non_finite = _each_sample(messages) if plain is None else (plain, [], {})
    if msg.HasField("columns"):
        by_column = _column_samples(msg.columns)
        if by_column is None:
            rows = rows_from_columns(msg.columns)
            by_column, more_skipped, more_non_finite = _each_sample(rows)
            skipped.extend(more_skipped)
            offset = len(samples)
            non_finite.update((offset + i, p) for i, p in more_non_finite.items())
        samples.extend(by_column)
    batch = TelemetryBatch(
        seq=msg.seq,
        samples=samples,
        floor_seq=msg.floor_seq,
        dropped=batch_dropped(msg),
        non_finite=non_finite,
    )
    return batch, skipped


def _each_sample(
    messages: Sequence[pb.Telemetry],
) -> tuple[list[TelemetrySample], list[tuple[str, str]], dict[int, Sequence[str]]]:
    """The samples of ``messages`` decoded one at a time by :func:`checked_sample_from_pb`:
    for a batch with a problem, and what the column path must agree with.

    :return: ``(samples, skipped, non_finite)`` as :class:`TelemetryBatch` and
        :func:`telemetry_batch_from_pb` give them.
    """
    samples: list[TelemetrySample] = []
    skipped: list[tuple[str, str]] = []
    non_finite: dict[int, Sequence[str]] = {}
    for message in messages:
        try:
            sample, problems = checked_sample_from_pb(message)
        except ValueError as exc:
            skipped.append((message.asset_id, str(exc)))
            continue
        if problems:
            non_finite[len(samples)] = problems
        samples.append(sample)
    return samples, skipped, non_finite


# ----------------------------------------------------------------------------- agent side


def parse_agent_message(raw: bytes) -> pb.AgentMessage:
    """The ``AgentMessage`` serialized in ``raw`` (the headend reads its stream as bytes).

    :raises ValueError: ``raw`` does not parse as a ``der.v1.AgentMessage``; the message
        is one line saying so and how long it was.
    """
    try:
        message: pb.AgentMessage = pb.AgentMessage.FromString(raw)
    except DecodeError:
        raise ValueError(
            f"a message of {len(raw)} bytes that does not parse as der.v1.AgentMessage"
        ) from None
    return message


def agent_register(
    *,
    agent_id: str,
    site_id: str,
    assets: Mapping[str, str],
    sdk_version: str,
    plugins: Mapping[str, str],
    stream_id: str = "",
    probe: bool = False,
) -> pb.AgentMessage:
    """The Register message. ``assets`` maps asset id → adapter name; ``probe``: a
    commissioning probe (the headend answers and opens nothing)."""
    return pb.AgentMessage(
        register=pb.Register(
            agent_id=agent_id,
            site_id=site_id,
            assets=[pb.ServedAsset(asset_id=a, adapter=ad) for a, ad in assets.items()],
            sdk_version=sdk_version,
            plugins=[pb.PluginVersion(package=p, version=v) for p, v in sorted(plugins.items())],
            stream_id=stream_id,
            probe=probe,
        )
    )


def agent_telemetry(
    seq: int,
    samples: Sequence[TelemetrySample],
    floor_seq: int = 0,
    dropped: Sequence[SeqRange] | None = None,
    *,
    columns: bool = False,
) -> pb.AgentMessage:
    """A ``TelemetryBatch``; ``dropped=None`` leaves the drop list out, as older agents do.
    ``columns``: the samples by column (:mod:`der_sdk.wire.columns`), else as rows."""
    if columns:
        batch = pb.TelemetryBatch(seq=seq, columns=encode_columns(samples))
    else:
        batch = pb.TelemetryBatch(seq=seq, samples=[sample_to_pb(s) for s in samples])
    _set_batch_floor(batch, floor_seq, dropped)
    return pb.AgentMessage(telemetry=batch)


def telemetry_payload(samples: Sequence[TelemetrySample]) -> bytes:
    """A ``TelemetryBatch`` of ``samples`` by column, serialized without ``seq`` and
    ``floor_seq``: how the agent's buffer stores a batch until it is sent
    (:func:`agent_telemetry_payload`)."""
    payload: bytes = pb.TelemetryBatch(columns=encode_columns(samples)).SerializeToString()
    return payload


def agent_telemetry_payload(
    seq: int,
    payload: bytes,
    floor_seq: int = 0,
    dropped: Sequence[SeqRange] | None = None,
    *,
    columns: bool = True,
) -> pb.AgentMessage:
    """The ``TelemetryBatch`` message for a stored :func:`telemetry_payload`.

    ``columns=False``: for a headend that does not read columns (its ``RegisterAck`` did
    not set ``telemetry_columns``), the samples stored by column are sent as rows.
    """
    batch = pb.TelemetryBatch.FromString(payload)
    batch.seq = seq
    if not columns and batch.HasField("columns"):
        rows = rows_from_columns(batch.columns)
        batch.ClearField("columns")
        batch.samples.extend(rows)
    _set_batch_floor(batch, floor_seq, dropped)
    return pb.AgentMessage(telemetry=batch)


def _set_batch_floor(
    batch: pb.TelemetryBatch, floor_seq: int, dropped: Sequence[SeqRange] | None
) -> None:
    batch.floor_seq = floor_seq
    if dropped is not None:
        batch.lists_dropped = True
        batch.dropped.extend(pb.SeqRange(first=first, last=last) for first, last in dropped)


def batch_dropped(batch: pb.TelemetryBatch) -> tuple[SeqRange, ...] | None:
    """The seq ranges a batch lists as dropped by the agent; ``None`` from an agent that
    does not list its drops (older than the field)."""
    if not batch.lists_dropped:
        return None
    return tuple((r.first, r.last) for r in batch.dropped)


def agent_heartbeat(
    agent_id: str,
    ts: datetime,
    uptime_s: float,
    buffer: BufferStats | None = None,
    clock_offset_s: float | None = None,
) -> pb.AgentMessage:
    beat = pb.Heartbeat(agent_id=agent_id, ts_us=datetime_to_us(ts), uptime_s=uptime_s)
    if buffer is not None:
        beat.buffer.CopyFrom(buffer_stats_to_pb(buffer))
    if clock_offset_s is not None:
        beat.clock_offset_s = clock_offset_s
    return pb.AgentMessage(heartbeat=beat)


def buffer_stats_to_pb(stats: BufferStats) -> pb.BufferStats:
    return pb.BufferStats(**msgspec.structs.asdict(stats))


def buffer_stats_from_pb(msg: pb.BufferStats) -> BufferStats:
    return BufferStats(
        batches=msg.batches,
        samples=msg.samples,
        bytes=msg.bytes,
        oldest_age_s=msg.oldest_age_s,
        dropped_samples=msg.dropped_samples,
        dropped_batches=msg.dropped_batches,
        replay_batches=msg.replay_batches,
    )


def agent_event(event: AgentEventRecord) -> pb.AgentMessage:
    msg = pb.AgentEvent(
        event_id=event.event_id,
        ts_us=datetime_to_us(event.ts),
        kind=event.kind,
        message=event.message,
        data_json=_json_encode(event.data),
    )
    if event.asset_id is not None:
        msg.asset_id = event.asset_id
    return pb.AgentMessage(event=msg)


def event_from_pb(msg: pb.AgentEvent) -> AgentEventRecord:
    """:raises ValueError: ``data_json`` is not a JSON object."""
    data: dict[str, Any] = {}
    if msg.data_json:
        try:
            data = _json_decode_object(msg.data_json)
        except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deep
            raise ValueError(
                f"event {msg.event_id}: data_json is not a JSON object: {exc}"
            ) from None
    return AgentEventRecord(
        event_id=msg.event_id,
        ts=datetime_from_us(msg.ts_us),
        kind=msg.kind,
        message=msg.message,
        asset_id=msg.asset_id if msg.HasField("asset_id") else None,
        data=data,
    )


def agent_setpoint_ack(
    command_id: str,
    status: str,
    allocations: Sequence[Allocation],
    reason: str | None = None,
    ts: datetime | None = None,
    step: int | None = None,
    superseded_by: str | None = None,
) -> pb.AgentMessage:
    ack = pb.SetpointAck(
        command_id=command_id,
        status=status,
        ts_us=datetime_to_us(ts) if ts is not None else 0,
        applied_mw=sum(a.mw for a in allocations if a.status == "applied"),
        allocations=[
            pb.Allocation(asset_id=a.asset_id, mw=a.mw, status=a.status, reason=a.reason)
            for a in allocations
        ],
    )
    if reason is not None:
        ack.reason = reason
    if step is not None:
        ack.step = step
    if superseded_by is not None:
        ack.superseded_by = superseded_by
    return pb.AgentMessage(setpoint_ack=ack)


def allocations_from_pb(ack: pb.SetpointAck | pb.LocalDispatch) -> list[Allocation]:
    return [
        Allocation(
            asset_id=a.asset_id,
            mw=a.mw,
            status=a.status or "applied",
            reason=a.reason if a.HasField("reason") else None,
        )
        for a in ack.allocations
    ]


def _sent_at(ts_us: int, what: str) -> datetime | None:
    """An agent's optional time stamp: ``None`` for 0 or less (not given).

    :raises ValueError: ``ts_us`` is outside the years 1..9999, naming ``what``.
    """
    if ts_us <= 0:
        return None
    try:
        return datetime_from_us(ts_us)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def setpoint_ack_from_pb(msg: pb.SetpointAck) -> SetpointAck:
    """The domain acknowledgement; a ``ts_us`` of 0 (not given) is ``ts=None``.

    :raises ValueError: ``ts_us`` is outside the years 1..9999; the message names the
        command.
    """
    ts = _sent_at(msg.ts_us, f"SetpointAck of command {msg.command_id!r}")
    return SetpointAck(
        command_id=msg.command_id,
        status=msg.status,
        applied_mw=msg.applied_mw,
        reason=msg.reason if msg.HasField("reason") else None,
        ts=ts,
        allocations=tuple(allocations_from_pb(msg)),
        step=msg.step if msg.HasField("step") else None,
        superseded_by=msg.superseded_by if msg.HasField("superseded_by") else None,
    )


def agent_local_dispatch(report: LocalDispatchReport) -> pb.AgentMessage:
    msg = pb.LocalDispatch(
        command_id=report.command_id,
        mw=report.mw,
        ts_us=datetime_to_us(report.ts),
        status=report.status,
        allocations=[
            pb.Allocation(asset_id=a.asset_id, mw=a.mw, status=a.status, reason=a.reason)
            for a in report.allocations
        ],
        unallocated_mw=report.unallocated_mw,
    )
    for name in ("asset_id", "site_id", "duration_s", "reason", "policy"):
        value = getattr(report, name)
        if value is not None:
            setattr(msg, name, value)
    return pb.AgentMessage(local_dispatch=msg)


def local_dispatch_from_pb(msg: pb.LocalDispatch) -> LocalDispatchReport:
    return LocalDispatchReport(
        command_id=msg.command_id,
        mw=msg.mw,
        ts=datetime_from_us(msg.ts_us),
        status=msg.status,
        asset_id=msg.asset_id if msg.HasField("asset_id") else None,
        site_id=msg.site_id if msg.HasField("site_id") else None,
        duration_s=msg.duration_s if msg.HasField("duration_s") else None,
        reason=msg.reason if msg.HasField("reason") else None,
        allocations=tuple(allocations_from_pb(msg)),
        unallocated_mw=msg.unallocated_mw,
        policy=msg.policy if msg.HasField("policy") else None,
    )


def agent_heartbeat_from_pb(msg: pb.Heartbeat) -> AgentHeartbeat:
    """The domain heartbeat; a ``ts_us`` of 0 or less (no clock) is ``ts=None``, and one
    outside the years 1..9999 a ``ValueError`` naming the agent."""
    ts = _sent_at(msg.ts_us, f"Heartbeat of agent {msg.agent_id!r}")
    return AgentHeartbeat(
        agent_id=msg.agent_id,
        ts=ts,
        uptime_s=msg.uptime_s,
        buffer=buffer_stats_from_pb(msg.buffer) if msg.HasField("buffer") else None,
        clock_offset_s=msg.clock_offset_s if msg.HasField("clock_offset_s") else None,
    )


# ----------------------------------------------------------------------------- headend side


def headend_register_ack(
    accepted: Sequence[str], refused: Mapping[str, str], message: str = "", *, probe: bool = False
) -> pb.HeadendMessage:
    return pb.HeadendMessage(
        register_ack=pb.RegisterAck(
            accepted=bool(accepted),
            accepted_asset_ids=list(accepted),
            refused=[pb.Refusal(asset_id=a, reason=r) for a, r in refused.items()],
            message=message,
            probe=probe,
            telemetry_columns=True,
        )
    )


def headend_setpoint(
    command_id: str,
    mw: float,
    *,
    asset_id: str | None = None,
    site_id: str | None = None,
    duration_s: float | None = None,
    expires_in_ms: int | None = None,
    expires_at: datetime | None = None,
    start_at: datetime | None = None,
    steps: Sequence[tuple[float, float]] = (),
    cancels: str | None = None,
) -> pb.HeadendMessage:
    sp = pb.Setpoint(command_id=command_id, mw=mw)
    if start_at is not None:
        sp.start_at_us = datetime_to_us(start_at)
        sp.steps.extend(pb.ScheduleStep(offset_s=o, mw=m) for o, m in steps)
    if cancels is not None:
        sp.cancels = cancels
    if expires_in_ms is not None:
        sp.expires_in_ms = expires_in_ms
    if expires_at is not None:
        sp.expires_at_us = datetime_to_us(expires_at)
    if asset_id is not None:
        sp.asset_id = asset_id
    if site_id is not None:
        sp.site_id = site_id
    if duration_s is not None:
        sp.duration_s = duration_s
    return pb.HeadendMessage(setpoint=sp)


def headend_command(command: SetpointCommand) -> pb.HeadendMessage:
    return headend_setpoint(
        command.command_id,
        command.mw,
        asset_id=command.asset_id,
        site_id=command.site_id,
        duration_s=command.duration_s,
        expires_in_ms=command.expires_in_ms,
        expires_at=command.expires_at,
        start_at=command.start_at,
        steps=command.steps,
        cancels=command.cancels,
    )


def headend_message(
    message: TelemetryAck | EventAck | SetpointCommand | SetpointOutcomeAck | _Encoded,
) -> pb.HeadendMessage | _Encoded:
    """The wire form of what an agent stream's outbox holds: a domain message is encoded;
    anything else is a ``HeadendMessage`` built at the link, already in wire form, and is
    returned as is."""
    if isinstance(message, TelemetryAck):  # first: one per stored batch
        return headend_telemetry_ack(message.seq, message.stored_through)
    if isinstance(message, EventAck):
        return headend_event_ack(message.event_id)
    if isinstance(message, SetpointCommand):
        return headend_command(message)
    if isinstance(message, SetpointOutcomeAck):
        return headend_outcome_ack(message.command_id, message.step)
    return message


def headend_telemetry_ack(seq: int, stored_through: int = 0) -> pb.HeadendMessage:
    return pb.HeadendMessage(telemetry_ack=pb.TelemetryAck(seq=seq, stored_through=stored_through))


def headend_outcome_ack(command_id: str, step: int | None = None) -> pb.HeadendMessage:
    ack = pb.SetpointOutcomeAck(command_id=command_id)
    if step is not None:
        ack.step = step
    return pb.HeadendMessage(outcome_ack=ack)


def headend_event_ack(event_id: str) -> pb.HeadendMessage:
    return pb.HeadendMessage(event_ack=pb.EventAck(event_id=event_id))


def headend_local_dispatch_ack(command_id: str) -> pb.HeadendMessage:
    return pb.HeadendMessage(local_dispatch_ack=pb.LocalDispatchAck(command_id=command_id))
