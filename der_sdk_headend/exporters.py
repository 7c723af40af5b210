"""Runs the continuous exporters of ``HEADEND_EXPORTERS`` (the ``der_exporters`` hook),
each from its durable cursor in storage (docs/export.md).

One task per exporter: read the samples stored after its cursor in storage order
(:meth:`~der_sdk.storage.contract.StorageBackend.telemetry_changes`), await
``export(batch)``, then store the batch's cursor. Only then does the next batch start,
so an exporter that is down, or a headend that was stopped, resumes where the last
saved cursor points: no sample is skipped. A batch whose cursor was not saved (the
exporter raised, the headend stopped in between) is given again with the same
``batch_id``. Failures are logged with the exporter's name and retried with backoff;
one exporter's trouble never holds up another's or the headend.

Each exporter runs on one headend at a time: the one that holds its lease in storage
(:meth:`~der_sdk.storage.contract.StorageBackend.exporter_lease`). The other replicas of
a cluster stand by and try again every interval; the one that gets the lease reads the
cursor from storage then, and a holder that loses its lease stops before its next batch
and saves no cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from der_sdk.backoff import Backoff
from der_sdk.errors import DerSdkError, UnknownNameError
from der_sdk.extensions import ExportBatch, Exporter, ExporterContext
from der_sdk.plugins import Plugins
from der_sdk.storage.contract import ExporterLease, ExporterLeaseLostError, StorageBackend
from der_sdk_headend.config import ExporterConfig

__all__ = ["STOP_TIMEOUT_S", "ExporterRunner", "ExporterStats", "batch_id"]

log = logging.getLogger("der.headend.exporters")

STOP_TIMEOUT_S = 10.0
"""How long a stopping headend lets a batch in progress finish before cancelling it
(its cursor is then not saved, and the batch comes again at the next start)."""


def batch_id(name: str, cursor: str | None) -> str:
    """The id of exporter ``name``'s batch that starts after ``cursor``: the same for the
    same start, whenever the batch is given again."""
    return hashlib.sha256(f"{name}\0{cursor or ''}".encode()).hexdigest()[:24]


@dataclass
class _Running:
    config: ExporterConfig
    exporter: Exporter
    task: asyncio.Task[None] | None = None
    started: bool = False
    exported: int = 0
    failures: int = 0
    failing: bool = False
    active: bool = False
    """Whether this headend holds the exporter's lease and runs it; ``False``: another
    replica does (standby), or it was not got yet."""
    last_success: float | None = None
    """Unix time of the last batch exported (or of catching up with nothing to export)."""


@dataclass(frozen=True)
class ExporterStats:
    """One exporter's figures for ``/metrics``."""

    name: str
    type: str
    exported: int
    failures: int
    failing: bool
    last_success: float | None
    active: bool
    """This headend runs the exporter (holds its lease); ``False``: standby."""


class ExporterRunner:
    """The configured exporters of one headend: built (options checked) by
    :meth:`build`, run by :meth:`start`, stopped by :meth:`close`."""

    def __init__(
        self,
        storage: StorageBackend,
        plugins: Plugins,
        configs: Sequence[ExporterConfig],
        *,
        asset_type_of: Mapping[str, str],
        batch_rows: int,
        interval_s: float,
        backoff: Backoff | None = None,
    ) -> None:
        self.storage = storage
        self.plugins = plugins
        self.configs = tuple(configs)
        self.asset_type_of = dict(asset_type_of)
        self.batch_rows = batch_rows
        self.interval_s = interval_s
        self.backoff = backoff or Backoff(initial_s=1.0, max_s=60.0)
        self._running: dict[str, _Running] = {}
        self._stop = asyncio.Event()

    def build(self) -> None:
        """Make every configured exporter through its type's factory.

        :raises DerSdkError: an exporter type is not installed, or a factory refused its
            options; the message names ``HEADEND_EXPORTERS`` or the option's variable.
        """
        asset_types = [self.plugins.asset_types.get(n) for n in self.plugins.asset_types.names()]
        for config in self.configs:
            try:
                kind = self.plugins.exporters.get(config.type)
            except UnknownNameError as exc:
                raise DerSdkError(f"HEADEND_EXPORTERS: exporter {config.name!r}: {exc}") from None
            context = ExporterContext(
                name=config.name,
                options=config.options,
                asset_types=asset_types,
                asset_type_of=self.asset_type_of,
            )
            self._running[config.name] = _Running(config, kind.factory(context))

    def exporter(self, name: str) -> Exporter:
        return self._running[name].exporter

    def exported(self, name: str) -> int:
        """Samples exporter ``name`` has exported since this headend started."""
        return self._running[name].exported

    def stats(self) -> list[ExporterStats]:
        return [
            ExporterStats(
                name=name,
                type=r.config.type,
                exported=r.exported,
                failures=r.failures,
                failing=r.failing,
                last_success=r.last_success,
                active=r.active,
            )
            for name, r in self._running.items()
        ]

    def start(self) -> None:
        storage = self.storage
        if storage.shared and type(storage).exporter_lease is StorageBackend.exporter_lease:
            log.warning(
                "storage %s (%s) is shared but grants every process the lease of an "
                "exporter: each replica that sets HEADEND_EXPORTERS exports the same batches; "
                "upgrade the storage plugin (docs/export.md)",
                storage.name,
                type(storage).__module__,
            )
        for name, running in self._running.items():
            running.task = asyncio.create_task(self._run(running), name=f"exporter:{name}")

    async def _run(self, running: _Running) -> None:
        name = running.config.name
        lease: ExporterLease | None = None
        cursor: str | None = None
        cursor_read = False
        standby_logged = False
        attempt = 0
        try:
            while not self._stop.is_set():
                try:
                    if lease is None:
                        lease = await self.storage.exporter_lease(name)
                        if lease is None:
                            running.active = running.failing = False
                            if not standby_logged:
                                log.info(
                                    "exporter %s runs on another replica; this one takes it "
                                    "over when that one stops",
                                    name,
                                )
                                standby_logged = True
                            await self._pause(self.interval_s)
                            continue
                        running.active, standby_logged, cursor_read = True, False, False
                        log.info("exporter %s (%s) runs on this headend", name, running.config.type)
                    if not running.started:
                        await running.exporter.start()
                        running.started = True
                    if not cursor_read:  # never a cursor read before this lease
                        cursor = await self.storage.exporter_cursor(name)
                        cursor_read = True
                    changes = await self.storage.telemetry_changes(cursor, self.batch_rows)
                    await lease.check()
                    if changes.samples and changes.cursor is not None:
                        batch = ExportBatch(
                            samples=changes.samples,
                            batch_id=batch_id(name, cursor),
                            cursor=changes.cursor,
                        )
                        await running.exporter.export(batch)
                        await lease.save_cursor(changes.cursor)
                        cursor = changes.cursor
                        running.exported += len(changes.samples)
                        if attempt:
                            log.info("exporter %s recovered after %d failure(s)", name, attempt)
                        attempt = 0
                    running.failing = False
                    running.last_success = time.time()
                    if changes.samples and len(changes.samples) >= self.batch_rows:
                        continue  # behind: the next batch at once
                    delay = self.interval_s
                except ExporterLeaseLostError as exc:
                    log.warning("exporter %s stopped on this headend: %s", name, exc)
                    if lease is not None:
                        await lease.release()
                    lease, running.active, running.failing = None, False, False
                    delay = self.interval_s
                except Exception as exc:
                    attempt += 1
                    running.failures += 1
                    running.failing = True
                    delay = self.backoff.delay(attempt)
                    log.warning(
                        "exporter %s (%s) failed (attempt %d), retrying the same batch in "
                        "%.1f s: %s",
                        name,
                        running.config.type,
                        attempt,
                        delay,
                        exc,
                        exc_info=attempt == 1,
                    )
                await self._pause(delay)
        finally:
            running.active = False
            if lease is not None:
                await lease.release()

    async def _pause(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)

    async def close(self) -> None:
        """Let each batch in progress finish (up to :data:`STOP_TIMEOUT_S`), then stop
        the exporters."""
        self._stop.set()
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for name, running in self._running.items():
            if running.started:
                running.started = False
                try:
                    await running.exporter.stop()
                except Exception:
                    log.exception("exporter %s failed to stop", name)
