"""Which headend the agent dials: the address list and the order it is tried in.

``HEADEND_GRPC`` holds one headend address or several, separated by commas:
``a.example:50051, b.example:50051, [2001:db8::7]:50051``. Each entry is ``host:port``
(an IPv6 address in brackets); whitespace around an entry is ignored. An empty entry, a
missing or bad port, an unbracketed IPv6 address or an address listed twice is refused
at start, naming the entry and the variable (:func:`parse_headend_addresses`).

**The policy** (:class:`HeadendRotation`): the agent shuffles its list once, at start (so
a fleet with the same list spreads over the headends), and dials the first address of its
order. Every failure, whether the address was unreachable, refused the registration or
lost a registered stream, moves it to the next address in that order, after the first
backoff delay (``reconnect_initial_s``, 1 s ± 20 %): each address is tried once, quickly,
in turn. When every address has failed in a row, the delay grows per failed round as for
one address (times 1.6 up to ``reconnect_max_s``, ± 20 %). A good register resets the count;
the next failure moves on again. With one address every failure ends a round, so the
delays are exactly those of a single headend.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence

from der_sdk.backoff import Backoff
from der_sdk.errors import DerSdkError

__all__ = ["HeadendRotation", "parse_headend_addresses"]


def parse_headend_addresses(
    value: str | Sequence[str], *, source: str = "HEADEND_GRPC"
) -> tuple[str, ...]:
    """The headend addresses in ``value``, in the order given, each stripped.

    :param value: a comma-separated list, or a sequence of addresses.
    :param source: how to name the setting in errors (``HEADEND_GRPC``, ``--headend``).
    :raises DerSdkError: the list is empty, an entry is empty, has no port, a port that is
        not a number from 1 to 65535, an IPv6 address without brackets, or repeats an
        earlier entry; the message names the entry and ``source``.
    """
    raw = value if isinstance(value, str) else ",".join(value)
    entries = [entry.strip() for entry in raw.split(",")]
    if entries == [""]:
        raise DerSdkError(f"{source} is empty: give the headend's gRPC address as host:port")
    addresses: list[str] = []
    seen: dict[tuple[str, int], str] = {}
    for n, entry in enumerate(entries, start=1):
        where = f"{source}={raw!r}: entry {n}" if len(entries) > 1 else f"{source}={raw!r}"
        if not entry:
            raise DerSdkError(f"{where} is empty; separate host:port addresses by single commas")
        key = _address_key(entry, where)
        if key in seen:
            raise DerSdkError(f"{where} ({entry}) repeats {seen[key]}; list each headend once")
        seen[key] = entry
        addresses.append(entry)
    return tuple(addresses)


def _address_key(entry: str, where: str) -> tuple[str, int]:
    """``(host, port)`` of one ``host:port`` entry, the host in a comparable form."""
    if any(c.isspace() for c in entry):
        raise DerSdkError(f"{where} ({entry!r}) contains whitespace; expected host:port")
    if entry.startswith("["):
        host, bracket, port = entry[1:].partition("]")
        if not bracket or not port.startswith(":"):
            raise DerSdkError(
                f"{where} ({entry}) is not [IPv6 address]:port, e.g. [2001:db8::7]:50051"
            )
        try:
            normal = ipaddress.IPv6Address(host).compressed
        except ValueError:
            raise DerSdkError(
                f"{where} ({entry}): {host!r} in brackets is not an IPv6 address"
            ) from None
        return normal, _port(port[1:], entry, where)
    host, colon, port = entry.rpartition(":")
    if not colon or not host:
        raise DerSdkError(f"{where} ({entry}) has no port; expected host:port, e.g. {entry}:50051")
    if ":" in host:
        raise DerSdkError(
            f"{where} ({entry}) looks like an IPv6 address: put it in brackets, e.g. "
            f"[{host}]:{port}"
        )
    return host.lower(), _port(port, entry, where)


def _port(text: str, entry: str, where: str) -> int:
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise DerSdkError(f"{where} ({entry}): port {text!r} is not a number from 1 to 65535")
    return int(text)


class HeadendRotation:
    """The address to dial now and the delay before the next one (see the module doc).

    :param addresses: the headend addresses (:func:`parse_headend_addresses`).
    :param backoff: the reconnect schedule; ``backoff.delay(1)`` separates the addresses
        of one round, ``backoff.delay(n)`` ends the ``n``-th round in which all failed.
    :param rng: shuffles the order (seed one for a repeatable order); default:
        ``backoff.rng``.
    """

    def __init__(
        self, addresses: Sequence[str], backoff: Backoff, rng: random.Random | None = None
    ) -> None:
        if not addresses:
            raise ValueError("at least one headend address is needed")
        self.backoff = backoff
        rng = rng if rng is not None else backoff.rng
        self.order: tuple[str, ...] = tuple(rng.sample(list(addresses), len(addresses)))
        self._at = 0
        self._failed_in_round = 0
        self._failed_rounds = 0

    @property
    def current(self) -> str:
        """The address to dial."""
        return self.order[self._at]

    def registered(self) -> None:
        """A register succeeded on :attr:`current`: the backoff starts over."""
        self._failed_in_round = 0
        self._failed_rounds = 0

    def failed(self) -> float:
        """:attr:`current` failed: move to the next address; the seconds to wait first."""
        self._at = (self._at + 1) % len(self.order)
        self._failed_in_round += 1
        if self._failed_in_round < len(self.order):
            return self.backoff.delay(1)
        self._failed_in_round = 0
        self._failed_rounds += 1
        return self.backoff.delay(self._failed_rounds)
