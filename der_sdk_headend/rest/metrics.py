"""``/metrics``: the headend's live state through prometheus-client.

:class:`HeadendCollector` is a custom collector: each scrape reads the figures the
headend already keeps (the ingest's :meth:`~der_sdk_headend.ingest.telemetry.
TelemetryIngest.stats`, presence's streams and each agent's buffer from its heartbeats),
so there is no second set of counters to keep in step. prometheus-client writes the
exposition, in the format the scraper asks for in ``Accept`` (the Prometheus text format
0.0.4 by default, OpenMetrics when asked), with every value written out in full.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from der_sdk.models import ALARM_SEVERITIES
from der_sdk_headend import gc_pauses

if TYPE_CHECKING:
    from der_sdk_headend.cluster.ingest import StreamWriterStats
    from der_sdk_headend.exporters import ExporterStats
    from der_sdk_headend.presence.registry import Presence
    from der_sdk_headend.service import Headend

__all__ = ["HeadendCollector", "render_metrics"]

_BUFFER_FIGURES = (
    ("der_agent_buffer_samples", "gauge", "Samples held in the agent's buffer.", "samples"),
    ("der_agent_buffer_batches", "gauge", "Batches held in the agent's buffer.", "batches"),
    ("der_agent_buffer_bytes", "gauge", "Bytes held in the agent's buffer.", "bytes"),
    ("der_agent_buffer_oldest_seconds", "gauge", "Age of the oldest held batch.", "oldest_age_s"),
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
"""Each connected agent's buffer figures: name, type, help, ``BufferStats`` field."""


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, value=value)


class HeadendCollector(Collector):
    """A prometheus-client collector over one headend's live state (module docstring)."""

    def __init__(
        self,
        headend: Headend,
        alarm_counts: Mapping[str, int] | None = None,
        healthy: bool | None = None,
    ) -> None:
        self.headend = headend
        self.alarm_counts = alarm_counts
        self.healthy = healthy

    def collect(self) -> Iterator[Metric]:
        headend = self.headend
        if self.healthy is not None:
            yield _gauge(
                "der_healthy",
                "1 while GET /healthz answers 200, 0 while it answers 503 degraded.",
                1.0 if self.healthy else 0.0,
            )
        yield _gauge(
            "der_agents_connected",
            "Agent streams connected (in a cluster: to any replica).",
            headend.agents_connected,
        )
        yield _gauge(
            "der_assets_connected",
            "Assets served by a connected agent (in a cluster: on any replica).",
            headend.assets_connected,
        )
        cluster = headend.cluster_presence
        if cluster is not None:
            yield _gauge(
                "der_cluster_replicas",
                "Live replicas of the cluster, this one included.",
                len(cluster.replicas()),
            )
        replica = headend.cluster
        if replica is not None:
            yield _gauge(
                "der_bus_connected",
                "1 while this replica's message bus connection is up.",
                1.0 if replica.bus.state == "connected" else 0.0,
            )
        if self.alarm_counts is not None:
            alarms = GaugeMetricFamily(
                "der_alarms_active",
                "Active alarms by severity (in a cluster: of every replica, from storage).",
                labels=["severity"],
            )
            for severity in ALARM_SEVERITIES:
                alarms.add_metric([severity], float(self.alarm_counts.get(severity, 0)))
            yield alarms
        ingest = headend.ingest_or_none
        if ingest is not None:
            stats = ingest.stats()
            yield _gauge(
                "der_ingest_queue_batches",
                "Telemetry batches waiting for storage.",
                stats.queued_batches,
            )
            yield _gauge(
                "der_ingest_queue_samples",
                "Telemetry samples waiting for storage.",
                stats.queued_samples,
            )
            yield _gauge(
                "der_ingest_queue_max_samples",
                "The ingest queue bound; readers wait when it is full.",
                stats.max_queued_samples,
            )
            yield _gauge(
                "der_ingest_oldest_queued_seconds",
                "How long the oldest queued batch has waited.",
                stats.oldest_queued_s,
            )
            yield _gauge(
                "der_ingest_stalled",
                "1 while telemetry writes are failing or slow.",
                1.0 if stats.stalled else 0.0,
            )
            yield _counter(
                "der_ingest_samples_stored_total",
                "Samples written to storage (duplicates included).",
                stats.samples_stored,
            )
            yield _counter(
                "der_ingest_batches_acked_total",
                "Telemetry batches acknowledged after storage committed.",
                stats.batches_acked,
            )
            yield _counter(
                "der_ingest_writes_total",
                "Successful storage writes (each stores up to a few thousand samples).",
                stats.writes,
            )
            yield _counter(
                "der_ingest_write_seconds_total",
                "Time spent in storage writes: its rate near 1 means storage is the bottleneck.",
                stats.write_seconds,
            )
            yield _counter(
                "der_ingest_write_failures_total",
                "Failed storage writes (each retried).",
                stats.write_failures,
            )
            yield _counter(
                "der_telemetry_gaps_total",
                "Ranges of telemetry batches that never reached storage.",
                stats.gaps,
            )
        yield from _gc_metrics()
        exporters = headend.exporters
        if exporters is not None:
            yield from _exporter_metrics(exporters.stats())
        writers = headend.stream_writers
        if writers is not None:
            yield from _stream_metrics(writers.stats())
        presence = headend.presence_or_none
        yield from _certificate_metrics(headend, presence)
        buffers = [
            (stream.agent_id, stream.buffer)
            for stream in (presence.streams() if presence is not None else [])
            if stream.buffer is not None
        ]
        for name, kind, help_text, field in _BUFFER_FIGURES:
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                name, help_text, labels=["agent_id"]
            )
            for agent_id, buffer in buffers:
                family.add_metric([agent_id], float(getattr(buffer, field)))
            yield family


def _exporter_metrics(stats: Sequence[ExporterStats]) -> Iterator[Metric]:
    """The continuous exporters' figures, one series per exporter (docs/export.md)."""
    figures: list[
        tuple[
            type[CounterMetricFamily | GaugeMetricFamily],
            str,
            str,
            Callable[[ExporterStats], float | None],
        ]
    ] = [
        (
            CounterMetricFamily,
            "der_exporter_samples_total",
            "Samples a continuous exporter exported since the headend started.",
            lambda s: s.exported,
        ),
        (
            CounterMetricFamily,
            "der_exporter_failures_total",
            "Failed attempts of a continuous exporter (each batch retried).",
            lambda s: s.failures,
        ),
        (
            GaugeMetricFamily,
            "der_exporter_failing",
            "1 while a continuous exporter's last attempt failed.",
            lambda s: 1.0 if s.failing else 0.0,
        ),
        (
            GaugeMetricFamily,
            "der_exporter_active",
            "1 while this headend runs a continuous exporter (holds its lease), 0 while "
            "another replica does (standby).",
            lambda s: 1.0 if s.active else 0.0,
        ),
        (
            GaugeMetricFamily,
            "der_exporter_last_success_timestamp_seconds",
            "When a continuous exporter last exported a batch or found nothing new "
            "(only where it runs).",
            lambda s: s.last_success if s.active else None,
        ),
    ]
    for family_type, name, help_text, value in figures:
        family = family_type(name, help_text, labels=["exporter"])
        for stat in stats:
            figure = value(stat)
            if figure is not None:
                family.add_metric([stat.name], float(figure))
        yield family


def render_metrics(
    headend: Headend,
    accept: str | None = None,
    alarm_counts: Mapping[str, int] | None = None,
    *,
    healthy: bool | None = None,
) -> tuple[bytes, str]:
    """The headend's metrics in the format ``accept`` (a request's ``Accept`` header)
    asks for, and its content type, as prometheus-client negotiates them.

    :param alarm_counts: active alarms by severity, read from storage by the caller
        (collectors are synchronous); ``None`` leaves ``der_alarms_active`` out.
    :param healthy: whether ``/healthz`` would answer 200 (``der_healthy``), checked by the
        caller for the same reason; ``None`` leaves it out.
    """
    encode, content_type = choose_encoder(accept or "")
    return encode(HeadendCollector(headend, alarm_counts, healthy)), content_type


def _certificate_metrics(headend: Headend, presence: Presence | None) -> Iterator[Metric]:
    """When the headend's own certificate and each connected agent's client certificate
    expire, as Unix times (alert on ``... - time()``; docs/runbooks.md)."""
    server = headend.server_certificate_not_after
    if server is not None:
        yield _gauge(
            "der_tls_certificate_expiry_timestamp_seconds",
            "When the headend's certificate (HEADEND_TLS_CERT, read at start) expires.",
            server.timestamp(),
        )
    agents = GaugeMetricFamily(
        "der_agent_certificate_expiry_timestamp_seconds",
        "When each connected agent's client certificate expires (mutual TLS).",
        labels=["agent_id"],
    )
    for stream in presence.streams() if presence is not None else ():
        if stream.certificate_not_after is not None:
            agents.add_metric([stream.agent_id], stream.certificate_not_after.timestamp())
    yield agents


def _gc_metrics() -> Iterator[Metric]:
    """The cycle collector's pauses, per generation (``der headend`` only: the monitor is
    installed once the headend started, :mod:`der_sdk_headend.gc_pauses`)."""
    monitor = gc_pauses.installed()
    if monitor is None:
        return
    figures = (
        (CounterMetricFamily, "der_gc_pauses_total", "Cycle collections.", "collections"),
        (
            CounterMetricFamily,
            "der_gc_pause_seconds_total",
            "Time the cycle collector held the event loop.",
            "seconds_total",
        ),
        (
            GaugeMetricFamily,
            "der_gc_pause_max_seconds",
            f"The longest of the last {gc_pauses.KEEP} collections' pauses.",
            "max_s",
        ),
        (
            GaugeMetricFamily,
            "der_gc_pause_p99_seconds",
            f"The 99th percentile of the last {gc_pauses.KEEP} collections' pauses.",
            "p99_s",
        ),
        (
            GaugeMetricFamily,
            "der_gc_pause_cpu_max_seconds",
            f"The most CPU time one of the last {gc_pauses.KEEP} collections took.",
            "cpu_max_s",
        ),
    )
    stats = monitor.stats()
    for family_type, name, help_text, field in figures:
        family = family_type(name, help_text, labels=["generation"])
        for generation in stats:
            family.add_metric([str(generation.generation)], float(getattr(generation, field)))
        yield family


def _stream_metrics(stats: StreamWriterStats) -> Iterator[Metric]:
    """The bus's telemetry stream and this replica's stream writers (bus mode)."""
    backlog = stats.backlog
    if backlog is not None:
        yield _gauge(
            "der_bus_stream_messages",
            "Telemetry messages the bus stream holds for the writers (unacknowledged).",
            backlog.messages,
        )
        yield _gauge("der_bus_stream_bytes", "Bytes the bus telemetry stream holds.", backlog.bytes)
        yield _gauge(
            "der_bus_stream_max_messages",
            "The stream's message limit; at it agents are held back and buffer.",
            backlog.max_messages,
        )
        yield _gauge(
            "der_bus_stream_max_bytes",
            "The stream's byte limit; at it agents are held back and buffer.",
            backlog.max_bytes,
        )
    yield _gauge("der_bus_writers", "Stream writers on this replica.", stats.writers)
    yield _gauge(
        "der_bus_writers_stalled",
        "1 while the stream writers cannot store or the stream is near full.",
        1.0 if stats.stalled else 0.0,
    )
    yield _counter(
        "der_bus_writer_samples_stored_total",
        "Samples this replica's stream writers stored (redeliveries included).",
        stats.samples_stored,
    )
    yield _counter(
        "der_bus_writer_messages_acked_total",
        "Stream messages stored and acknowledged by this replica's writers.",
        stats.messages_acked,
    )
    yield _counter(
        "der_bus_writer_messages_redelivered_total",
        "Stream messages this replica received again (a writer died or was too slow).",
        stats.messages_redelivered,
    )
    yield _counter(
        "der_bus_writer_messages_undecodable_total",
        "Stream messages that were not telemetry (logged, acknowledged, left out).",
        stats.messages_undecodable,
    )
    yield _counter(
        "der_bus_writer_stores_total", "Successful stores by the stream writers.", stats.stores
    )
    yield _counter(
        "der_bus_writer_store_seconds_total",
        "Time the stream writers spent storing (retries included).",
        stats.store_seconds,
    )
    yield _counter(
        "der_bus_writer_store_failures_total",
        "Failed stores by the stream writers (each retried).",
        stats.store_failures,
    )
    yield _counter(
        "der_bus_latest_received_total",
        "Latest-telemetry fan-out messages this replica received.",
        stats.latest_received,
    )
