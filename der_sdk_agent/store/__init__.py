"""The agent's durable stores, kept in one SQLite buffer file (:mod:`.file`).

* :class:`~.telemetry.TelemetryQueue` — sampler batches and the seq ranges dropped;
* :class:`~.journal.CommandJournal` — headend command outcomes and the setpoints in force;
* :class:`~.outbox.Outbox` — events and local command reports until acknowledged.

Each store attaches itself to the :class:`~.file.BufferFile` it is given; the file opens
once for all of them.
"""

from der_sdk_agent.store.file import MEMORY, BufferFile, SyncMode
from der_sdk_agent.store.journal import CommandJournal, JournalEntry
from der_sdk_agent.store.outbox import Outbox, OutboxQueue
from der_sdk_agent.store.telemetry import TelemetryQueue

__all__ = [
    "MEMORY",
    "BufferFile",
    "CommandJournal",
    "JournalEntry",
    "Outbox",
    "OutboxQueue",
    "SyncMode",
    "TelemetryQueue",
]
