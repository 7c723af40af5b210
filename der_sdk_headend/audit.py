"""The audit trail: who did what, when, from where, and how it ended.

Audit records are stored as events of kind :data:`AUDIT_KIND` (so every storage backend
keeps them without a schema change) and served by ``GET /audit`` to admins. A record
never holds a secret: tokens are named by their id, certificates by their fingerprint or
subject.

Actions used by the headend:

======================  =====================================================
action                  when
======================  =====================================================
``dispatch.create``     ``POST /dispatch`` made (or refused to make) a dispatch;
                        also a program (actor ``program``, ``via: program:NAME``,
                        outcome ``ok``, ``held`` or ``refused``)
``dispatch.cancel``     a dispatch was cancelled (REST, console or a program)
``token.create``        a REST token was created
``token.revoke``        a REST token was revoked
``agent.refused``       an agent stream (identity, site or asset) or its TLS
                        handshake (``stage: tls``) was refused
``rest.denied``         a REST request was refused (401 or 403)
======================  =====================================================
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from der_sdk.models import Event, utc_now
from der_sdk.storage.contract import StorageBackend

__all__ = ["ANONYMOUS", "AUDIT_KIND", "Actor", "Auditor"]

log = logging.getLogger("der.headend.audit")

AUDIT_KIND = "audit"


class Actor(msgspec.Struct, frozen=True, kw_only=True):
    """Who acted: a REST token, an agent identity, the CLI, or nobody authenticated."""

    kind: str  # token | agent | cli | anonymous
    name: str  # token id and name, certificate fingerprint or subject, "anonymous"
    role: str | None = None  # viewer | operator | admin, for tokens

    def describe(self) -> str:
        role = f" ({self.role})" if self.role else ""
        return f"{self.kind} {self.name}{role}"


ANONYMOUS = Actor(kind="anonymous", name="anonymous")


class Auditor:
    """Writes audit records to storage. A failed write is logged, never raised: an audit
    record must not turn a refusal into a 500."""

    def __init__(self, storage: StorageBackend) -> None:
        self._storage = storage

    async def record(
        self,
        action: str,
        *,
        actor: Actor,
        source: str,
        outcome: str,
        message: str,
        asset_id: str | None = None,
        site_id: str | None = None,
        **details: Any,
    ) -> None:
        """Store one audit record.

        :param source: where the request came from (client address, agent peer).
        :param outcome: ``ok``, ``refused``, ``denied``, ``failed``...
        :param details: more JSON-able facts (never secrets).
        """
        await self.store(
            self.event(
                action,
                actor=actor,
                source=source,
                outcome=outcome,
                message=message,
                asset_id=asset_id,
                site_id=site_id,
                **details,
            )
        )

    async def store(self, event: Event) -> None:
        """Store an audit record made by :meth:`event` (a failed write is logged)."""
        try:
            await self._storage.append_event(event)
        except Exception as exc:
            data = event.data or {}
            log.error(
                "audit record not stored (%s from %s: %s; %s): %s: %s",
                data.get("action"),
                data.get("source"),
                data.get("outcome"),
                event.message,
                type(exc).__name__,
                exc,
            )

    @staticmethod
    def event(
        action: str,
        *,
        actor: Actor,
        source: str,
        outcome: str,
        message: str,
        asset_id: str | None = None,
        site_id: str | None = None,
        **details: Any,
    ) -> Event:
        """The audit record :meth:`record` stores, for a caller that stores it itself
        together with what it records (a new dispatch and its audit record in one
        transaction)."""
        return Event(
            ts=utc_now(),
            kind=AUDIT_KIND,
            message=message,
            asset_id=asset_id,
            site_id=site_id,
            data={
                "action": action,
                "actor": msgspec.structs.asdict(actor),
                "source": source,
                "outcome": outcome,
                **details,
            },
        )
