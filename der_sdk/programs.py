"""Program sources: northbound standards (IEEE 2030.5, OpenADR...) that feed the headend
scheduled dispatches (``docs/programs.md``).

A plugin returns :class:`ProgramSourceType` descriptors from the ``der_program_sources``
hook. The headend builds one :class:`ProgramSource` for each entry of the ``programs:``
section of its inventory, giving it a :class:`ProgramContext` (its scope, and the way to
schedule, cancel and follow dispatches through the headend's normal planning) and its
options validated into the descriptor's ``options`` Struct. The headend then runs
``run()`` as a supervised task: one that raises is logged with its plugin and started
again with backoff.

What a source does with the context:

* :meth:`ProgramContext.schedule` a :class:`ProgramDispatch` for each control it receives
  upstream, named by the upstream id (``external_id``). The headend plans it as it plans
  ``POST /dispatch`` (validation, the asset's limits, split, clamp), records it with
  ``source="program:<program>"`` and the ``external_id``, and audits it. Scheduling the
  same ``external_id`` with the same content again returns the same dispatch; with other
  content the old one is cancelled and a new one made.
* A dispatch the precedence rule holds back (an operator's manual dispatch holds an asset
  for its duration) or that is invalid raises :class:`ProgramRefusedError`: report it
  upstream as "cannot comply" (or "opt out").
* :meth:`ProgramSource.dispatch_changed` is called with each change of the record of a
  dispatch the source made (sent, scheduled, active, completed, superseded, cancelled...):
  report it upstream.
* :meth:`ProgramContext.report_health` says whether the upstream server answers: a source
  that lost it keeps running the schedule the headend already has, ``/healthz`` answers
  ``degraded`` naming the program, and a ``program_comms_loss`` alarm is raised for its
  assets until the source reports it is back.

This module is the ground floor: it imports nothing from the headend or the agent.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import msgspec

from der_sdk.errors import DerSdkError
from der_sdk.models import Asset, Dispatch, ScheduleStep, Site, TelemetrySample

__all__ = [
    "PROGRAM_COMMS_LOSS",
    "PROGRAM_SOURCE_PREFIX",
    "ProgramContext",
    "ProgramDispatch",
    "ProgramRefusedError",
    "ProgramSource",
    "ProgramSourceType",
    "program_of",
    "program_source_name",
]

PROGRAM_SOURCE_PREFIX = "program:"
"""The ``source`` of a dispatch a program made: ``program:<program name>``."""

PROGRAM_COMMS_LOSS = "program_comms_loss"
"""The code of the alarm raised for a program's assets while its source has lost its
upstream server."""


def program_source_name(program: str) -> str:
    """The ``source`` of the dispatches program ``program`` makes."""
    return f"{PROGRAM_SOURCE_PREFIX}{program}"


def program_of(source: str) -> str | None:
    """The program that made a dispatch with ``source``, or ``None`` (not a program)."""
    if source.startswith(PROGRAM_SOURCE_PREFIX):
        return source[len(PROGRAM_SOURCE_PREFIX) :]
    return None


class ProgramDispatch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A control a program received upstream, as a scheduled dispatch.

    ``external_id`` names it upstream (an OpenADR event id and signal, a 2030.5 DERControl
    mRID); the headend keeps it on the dispatch record. Give ``asset_id`` or ``site_id``
    (``asset_id`` wins), within the program's scope.

    ``mw`` holds from ``start_at`` for ``duration_s``; or give ``steps`` (``mw`` is then
    ignored), each step's ``mw`` holding from ``start_at + offset_s``. ``start_at`` of
    ``None`` or in the past means the control is in force now: the headend starts it now,
    shortening ``duration_s`` by the time already past and starting from the step in force
    now, so that re-receiving an event that already started changes nothing.
    ``duration_s`` of ``None``: in force until something replaces it.

    ``reason`` is free text for the record and the audit trail (the upstream program or
    event name).
    """

    external_id: str
    site_id: str | None = None
    asset_id: str | None = None
    mw: float | None = None
    start_at: datetime | None = None
    duration_s: float | None = None
    steps: list[ScheduleStep] | None = None
    reason: str | None = None


RefusalKind = Literal["held", "invalid", "out_of_scope"]


class ProgramRefusedError(DerSdkError):
    """The headend did not make a program's dispatch; ``str(error)`` says why.

    ``kind``: ``held`` (the precedence rule: an operator's manual dispatch holds an asset
    for its duration; ``held_by`` names that dispatch), ``invalid`` (the headend's planning
    refused it: no MW, a start too far ahead...), or ``out_of_scope`` (an asset or site
    the program does not control). Report it upstream as "cannot comply" or "opt out".
    """

    def __init__(self, kind: RefusalKind, message: str, *, held_by: str | None = None) -> None:
        super().__init__(message)
        self.kind: RefusalKind = kind
        self.held_by = held_by


class ProgramContext(abc.ABC):
    """What the headend gives a program source: its scope and the headend's dispatch path.

    ``program`` is the configured program name; ``sites`` and ``assets`` its scope (the
    sites listed, and the assets listed plus those of the sites listed); ``log`` a logger
    named after the program. Every method may be called from the source's own tasks, on
    the headend's event loop.
    """

    program: str
    sites: Sequence[Site]
    assets: Sequence[Asset]
    log: logging.Logger

    @abc.abstractmethod
    async def schedule(self, request: ProgramDispatch) -> Dispatch:
        """Create (or update) the dispatch for ``request.external_id`` through the
        headend's normal planning, as a schedule, and audit it.

        The same ``external_id`` with the same content returns the existing record; with
        other content the old dispatch is cancelled and a new one made.

        :return: a copy of the dispatch record.
        :raises ProgramRefusedError: held back by the precedence rule, invalid, or
            outside the program's scope.
        """

    @abc.abstractmethod
    async def cancel(self, external_id: str, reason: str) -> Dispatch | None:
        """Stop the dispatch for ``external_id`` (the control was cancelled upstream).

        :return: a copy of the record, or ``None`` when the program has no open dispatch
            for ``external_id``.
        """

    @abc.abstractmethod
    async def open_dispatches(self) -> list[Dispatch]:
        """The program's dispatches that are not in a final state, oldest first."""

    @abc.abstractmethod
    async def latest(self, asset_id: str) -> TelemetrySample | None:
        """The latest telemetry sample of an asset in scope (``None``: none yet)."""

    @abc.abstractmethod
    def report_health(self, ok: bool, detail: str) -> None:
        """Say whether the upstream server answers (cheap; call it on every change or
        every poll). ``ok=False`` makes ``/healthz`` degraded naming the program and
        raises ``program_comms_loss`` for its assets; ``ok=True`` clears them."""


class ProgramSource(abc.ABC):
    """One running program: talks to its upstream server, schedules dispatches through
    its :class:`ProgramContext` and reports their lifecycle back upstream."""

    @abc.abstractmethod
    async def run(self) -> None:
        """Poll or subscribe upstream until :meth:`close`; return only then.

        An exception is logged with the plugin's name and ``run()`` is called again after
        a backoff (1 s, growing to 60 s). A lost server is not an exception to raise:
        report it with :meth:`ProgramContext.report_health` and keep trying.
        """

    @abc.abstractmethod
    async def dispatch_changed(self, dispatch: Dispatch) -> None:
        """The record of a dispatch this program made changed (a copy; its
        ``external_id`` says which control): report it upstream. Called in order, one at
        a time; an exception is logged and the next change is still delivered."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop: make :meth:`run` return, release connections. Called once at shutdown."""


@dataclass(frozen=True, kw_only=True)
class ProgramSourceType:
    """A northbound standard the headend can run as a program, chosen by ``name`` in the
    inventory's ``programs:`` section (``source: openadr2b``).

    ``options`` is a msgspec Struct type: the headend validates each program's
    ``options:`` mapping into it at start (server URL, credentials, certificate paths,
    polling interval...), naming the program and the field on error. ``factory(context,
    options)`` builds an unstarted :class:`ProgramSource`; it must not do I/O.
    """

    name: str
    factory: Callable[[ProgramContext, Any], ProgramSource]
    options: type[msgspec.Struct] | None = None
    description: str = ""
