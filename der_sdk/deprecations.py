"""Every deprecation of der-sdk, in one table, and the one way to announce them.

The rules are in ``docs/hook_policy.md``: hooks change only by adding arguments; anything a
plugin may use (a hook, a hook argument, a public name, a configuration key) is deprecated
for at least one minor release before it is removed, and every deprecation is a row of
:data:`DEPRECATIONS`, listed in that page.

How a deprecation is announced, by kind:

``hook-argument`` (name ``der_hook(arg)``)
    The spec keeps the argument and passes :func:`hook_argument_warnings` to pluggy, which
    warns when a plugin *registers* an implementation that asks for the argument::

        @hookspec(warn_on_impl_args=hook_argument_warnings("der_hook"))
        def der_hook(new_arg, old_arg): ...

``hook`` (name ``der_hook``)
    ``@hookspec(warn_on_impl=hook_warning("der_hook"))``: pluggy warns when a plugin
    implements it.

``api`` and ``config`` (a dotted name or a configuration key)
    The code path calls :func:`warn_deprecated` with the row's name, when it is used.

``rest`` (name ``METHOD /path?parameter=value``)
    The request handler calls :func:`warn_deprecated` with the row's name. A REST client
    is no Python program that could see a warning, so the row's message is logged on the
    ``der.deprecations`` logger at WARNING, once per process, for the operator to pass on.

Every warning is a :class:`DerSdkDeprecationWarning` whose message says what is
deprecated, since which version, in which version it goes, and what to use instead. Plugin
authors can make them errors in their tests:
``pytest -W error::der_sdk.deprecations.DerSdkDeprecationWarning``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DEPRECATIONS",
    "Deprecation",
    "DerSdkDeprecationWarning",
    "hook_argument_warnings",
    "hook_warning",
    "lookup",
    "warn_deprecated",
]

Kind = Literal["hook", "hook-argument", "api", "config", "rest"]

log = logging.getLogger("der.deprecations")


class DerSdkDeprecationWarning(DeprecationWarning):
    """Something a plugin or configuration uses will be removed in a later der-sdk."""


@dataclass(frozen=True, kw_only=True)
class Deprecation:
    """One row of the deprecation table.

    :param name: what is deprecated: ``der_hook`` (hook), ``der_hook(arg)`` (hook argument),
        ``der_sdk.module.name`` (api), a configuration key such as ``agent.old_key``
        (config) or ``GET /path?parameter=value`` (rest).
    :param since: the der-sdk version that deprecated it (it warns from then on).
    :param removal: the version that removes it (at least one minor release later).
    :param replacement: what to use instead, said so a user can act on it.
    """

    kind: Kind
    name: str
    since: str
    removal: str
    replacement: str

    @property
    def message(self) -> str:
        return (
            f"{self.name} is deprecated since der-sdk {self.since} and will be removed in "
            f"der-sdk {self.removal}; {self.replacement}"
        )

    def warning(self) -> DerSdkDeprecationWarning:
        return DerSdkDeprecationWarning(self.message)

    def warn(self, *, stacklevel: int = 2) -> None:
        """Emit the warning, attributed to ``stacklevel`` frames above the caller."""
        warnings.warn(self.warning(), stacklevel=stacklevel + 1)


DEPRECATIONS: tuple[Deprecation, ...] = (
    Deprecation(
        kind="rest",
        name="GET /dispatch/history?state=pending",
        since="0.2",
        removal="0.3",
        replacement="filter with state=submitted, the same state under its new name",
    ),
)
"""Every current deprecation. Add a row here (and to the table in ``docs/hook_policy.md``)
when something is deprecated, and remove the row with the thing."""

_logged: set[str] = set()
"""Names of ``rest`` rows already logged by this process (each is logged once)."""


def lookup(name: str, table: tuple[Deprecation, ...] | None = None) -> Deprecation:
    """The row called ``name``; :class:`KeyError` means it was never registered here."""
    for row in DEPRECATIONS if table is None else table:
        if row.name == name:
            return row
    raise KeyError(f"{name!r} is not in der_sdk.deprecations.DEPRECATIONS; add a row for it")


def warn_deprecated(
    name: str, *, stacklevel: int = 2, table: tuple[Deprecation, ...] | None = None
) -> None:
    """Warn that ``name`` (a row of :data:`DEPRECATIONS`) was used.

    Call it on the code path of the deprecated thing; ``stacklevel=2`` blames the caller
    of the function that calls this, which is usually the plugin's line. A ``rest`` row is
    logged on ``der.deprecations`` instead, the first time it is used in this process.
    """
    row = lookup(name, table)
    if row.kind != "rest":
        row.warn(stacklevel=stacklevel + 1)
    elif row.name not in _logged:
        _logged.add(row.name)
        log.warning("%s (a REST client used it; logged once per process)", row.message)


def hook_argument_warnings(
    hook: str, table: tuple[Deprecation, ...] | None = None
) -> dict[str, Warning]:
    """``warn_on_impl_args`` for the spec of ``hook``: deprecated argument → warning."""
    rows = DEPRECATIONS if table is None else table
    prefix = f"{hook}("
    return {
        row.name[len(prefix) : -1]: row.warning()
        for row in rows
        if row.kind == "hook-argument" and row.name.startswith(prefix) and row.name[-1] == ")"
    }


def hook_warning(hook: str, table: tuple[Deprecation, ...] | None = None) -> Warning | None:
    """``warn_on_impl`` for the spec of ``hook``: its warning if the hook is deprecated."""
    rows = DEPRECATIONS if table is None else table
    for row in rows:
        if row.kind == "hook" and row.name == hook:
            return row.warning()
    return None
