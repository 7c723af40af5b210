"""Telemetry ingest: decode, check, keep the latest, store, then acknowledge."""

from der_sdk_headend.ingest.telemetry import TelemetryIngest

__all__ = ["TelemetryIngest"]
