"""Telemetry ingest for one batch at a time.

The order of a batch matters and is fixed here:

1. decode each sample through :mod:`der_sdk.wire.codec`; a sample that does not decode is
   logged with its asset and skipped, the rest of the batch goes on;
2. drop samples for assets the stream does not serve (an event and one warning per
   stream and asset);
3. check ``details`` against the asset type: a bad field is dropped from ``details``, the
   sample is kept and its quality downgraded from ``good`` to ``uncertain`` with the
   problem appended to ``quality_reason``; unknown fields are kept, missing ones are fine;
4. update the in-memory latest sample of each asset (only by a newer ``ts``);
5. fire ``der_telemetry_received``, store the batch, and only then acknowledge its
   sequence number, so an acknowledged batch is never lost.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import msgspec

from der_sdk.asset_types import validate_details
from der_sdk.errors import UnknownNameError
from der_sdk.inventory import Inventory
from der_sdk.models import Event, TelemetrySample, utc_now
from der_sdk.plugins import Plugins
from der_sdk.storage.contract import StorageBackend
from der_sdk.wire import codec, pb
from der_sdk_headend.observers import notify
from der_sdk_headend.presence import AgentStream, Presence

__all__ = ["TelemetryIngest"]

log = logging.getLogger("der.headend.ingest")


class TelemetryIngest:
    """Stores telemetry batches and keeps the latest sample of every asset in memory."""

    def __init__(
        self,
        inventory: Inventory,
        plugins: Plugins,
        storage: StorageBackend,
        presence: Presence,
    ) -> None:
        self._inventory = inventory
        self._plugins = plugins
        self._storage = storage
        self._presence = presence
        self._latest: dict[str, TelemetrySample] = {}

    # ------------------------------------------------------------------ latest

    async def warm(self) -> None:
        """Fill the latest-sample cache from storage (at start, before agents connect)."""
        stored = await self._storage.latest_telemetry()
        self._latest = {a: s for a, s in stored.items() if a in self._inventory.assets}

    def latest(self, asset_id: str) -> TelemetrySample | None:
        return self._latest.get(asset_id)

    @property
    def latest_by_asset(self) -> Mapping[str, TelemetrySample]:
        return self._latest

    # ------------------------------------------------------------------ a batch

    async def ingest(self, stream: AgentStream, batch: pb.TelemetryBatch) -> int:
        """Ingest one batch from ``stream`` and acknowledge it once stored.

        :return: how many samples were new in storage.
        :raises Exception: whatever storage raised; the batch is then not acknowledged,
            so the agent sends it again.
        """
        self._presence.touch(stream)
        samples: list[TelemetrySample] = []
        for message in batch.samples:
            sample = await self._accept(stream, message)
            if sample is not None:
                samples.append(sample)

        for sample in samples:
            current = self._latest.get(sample.asset_id)
            if current is None or sample.ts > current.ts:
                self._latest[sample.asset_id] = sample

        stored = 0
        if samples:
            notify(self._plugins, "der_telemetry_received", samples=samples)
            stored = await self._storage.append_telemetry(samples)
        stream.send(codec.headend_telemetry_ack(batch.seq))
        log.debug(
            "batch %d from %s: %d samples, %d new",
            batch.seq,
            stream.describe(),
            len(samples),
            stored,
        )
        return stored

    async def _accept(self, stream: AgentStream, message: pb.Telemetry) -> TelemetrySample | None:
        """The checked sample for ``message``, or ``None`` when it is skipped."""
        try:
            sample = codec.sample_from_pb(message)
        except ValueError as exc:
            log.warning(
                "skipped a sample from %s for asset %s: %s",
                stream.describe(),
                message.asset_id or "<none>",
                exc,
            )
            return None

        try:
            asset = self._inventory.asset(sample.asset_id)
        except UnknownNameError:
            asset = None
        if asset is None or not stream.serves(asset.asset_id):
            await self._refuse_unserved(stream, sample.asset_id)
            return None

        quality = sample.quality
        reason = sample.quality_reason
        details = sample.details
        problems: list[str] = []
        if asset.asset_type in self._plugins.asset_types:
            details, problems = validate_details(
                self._plugins.asset_types.get(asset.asset_type), sample.details
            )
        if problems:
            self._warn_once(
                stream,
                f"details:{asset.asset_id}:{';'.join(problems)}",
                "telemetry details of asset %s (%s) from %s: %s; sample kept as uncertain",
                asset.asset_id,
                asset.asset_type,
                stream.describe(),
                "; ".join(problems),
            )
            if quality == "good":
                quality = "uncertain"
            reason = "; ".join([*([reason] if reason else []), *problems])

        return msgspec.structs.replace(
            sample,
            asset_id=asset.asset_id,
            site_id=asset.site_id,
            quality=quality,
            quality_reason=reason,
            details=details,
        )

    async def _refuse_unserved(self, stream: AgentStream, asset_id: str) -> None:
        key = f"unserved:{asset_id}"
        if key in stream.warned:
            return
        known = asset_id in self._inventory.assets
        why = "is not served by this stream" if known else "is not in the inventory"
        self._warn_once(
            stream,
            key,
            "dropped telemetry for asset %s from %s: the asset %s (logged once per stream)",
            asset_id or "<none>",
            stream.describe(),
            why,
        )
        await self._storage.append_event(
            Event(
                ts=utc_now(),
                kind="telemetry_dropped",
                message=f"telemetry for asset {asset_id} from agent {stream.agent_id} "
                f"dropped: the asset {why}",
                asset_id=asset_id or None,
                site_id=stream.site_id or None,
                data={"agent_id": stream.agent_id, "peer": stream.peer},
            )
        )

    @staticmethod
    def _warn_once(stream: AgentStream, key: str, message: str, *args: object) -> None:
        if key in stream.warned:
            log.debug(message, *args)
            return
        stream.warned.add(key)
        log.warning(message, *args)
