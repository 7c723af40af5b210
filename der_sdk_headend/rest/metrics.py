"""``/metrics`` in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["render_metrics"]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(
        self, name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self.lines.append(
                f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}"
            )


def render_metrics(headend: Headend) -> str:
    """The headend's metrics as Prometheus text."""
    out = _Writer()
    out.metric(
        "der_agents_connected",
        "gauge",
        "Agent streams connected.",
        [({}, headend.agents_connected)],
    )
    out.metric(
        "der_assets_connected",
        "gauge",
        "Assets served by a connected agent.",
        [({}, headend.assets_connected)],
    )
    ingest = headend.ingest_or_none
    if ingest is not None:
        stats = ingest.stats()
        out.metric(
            "der_ingest_queue_batches",
            "gauge",
            "Telemetry batches waiting for storage.",
            [({}, stats.queued_batches)],
        )
        out.metric(
            "der_ingest_queue_samples",
            "gauge",
            "Telemetry samples waiting for storage.",
            [({}, stats.queued_samples)],
        )
        out.metric(
            "der_ingest_queue_max_samples",
            "gauge",
            "The ingest queue bound; readers wait when it is full.",
            [({}, stats.max_queued_samples)],
        )
        out.metric(
            "der_ingest_oldest_queued_seconds",
            "gauge",
            "How long the oldest queued batch has waited.",
            [({}, stats.oldest_queued_s)],
        )
        out.metric(
            "der_ingest_stalled",
            "gauge",
            "1 while telemetry writes are failing or slow.",
            [({}, 1.0 if stats.stalled else 0.0)],
        )
        out.metric(
            "der_ingest_samples_stored_total",
            "counter",
            "Samples written to storage (duplicates included).",
            [({}, stats.samples_stored)],
        )
        out.metric(
            "der_ingest_batches_acked_total",
            "counter",
            "Telemetry batches acknowledged after storage committed.",
            [({}, stats.batches_acked)],
        )
        out.metric(
            "der_ingest_writes_total",
            "counter",
            "Successful storage writes (each stores up to a few thousand samples).",
            [({}, stats.writes)],
        )
        out.metric(
            "der_ingest_write_seconds_total",
            "counter",
            "Time spent in storage writes: its rate near 1 means storage is the bottleneck.",
            [({}, stats.write_seconds)],
        )
        out.metric(
            "der_ingest_write_failures_total",
            "counter",
            "Failed storage writes (each retried).",
            [({}, stats.write_failures)],
        )
        out.metric(
            "der_telemetry_gaps_total",
            "counter",
            "Ranges of telemetry batches that never reached storage.",
            [({}, stats.gaps)],
        )
    buffers = [
        (stream.agent_id, stream.buffer)
        for stream in (headend.presence.streams() if headend.presence_or_none else [])
        if stream.buffer is not None
    ]
    figures = (
        ("der_agent_buffer_samples", "gauge", "Samples held in the agent's buffer.", "samples"),
        ("der_agent_buffer_batches", "gauge", "Batches held in the agent's buffer.", "batches"),
        ("der_agent_buffer_bytes", "gauge", "Bytes held in the agent's buffer.", "bytes"),
        (
            "der_agent_buffer_oldest_seconds",
            "gauge",
            "Age of the oldest held batch.",
            "oldest_age_s",
        ),
        (
            "der_agent_buffer_replay_batches",
            "gauge",
            "Held batches from before the current stream.",
            "replay_batches",
        ),
        (
            "der_agent_buffer_dropped_samples_total",
            "counter",
            "Samples the agent dropped by its buffer bounds.",
            "dropped_samples",
        ),
    )
    for name, kind, help_text, attr in figures:
        out.metric(
            name,
            kind,
            help_text,
            [
                ({"agent_id": agent_id}, float(getattr(buffer, attr)))
                for agent_id, buffer in buffers
            ],
        )
    return "\n".join(out.lines) + "\n"
