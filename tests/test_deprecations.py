"""Deprecations live in one table and warn with since/removal versions (docs/hook_policy.md)."""

from __future__ import annotations

import logging
import re
import types
import warnings
from pathlib import Path

import pluggy
import pytest

from der_sdk import deprecations, hookspecs
from der_sdk.deprecations import (
    DEPRECATIONS,
    Deprecation,
    DerSdkDeprecationWarning,
    hook_argument_warnings,
    hook_warning,
    warn_deprecated,
)

ROOT = Path(__file__).resolve().parent.parent

TABLE = (
    Deprecation(
        kind="hook-argument",
        name="der_example(legacy)",
        since="0.2",
        removal="0.4",
        replacement="read `current` instead",
    ),
    Deprecation(
        kind="hook",
        name="der_old_hook",
        since="0.2",
        removal="0.3",
        replacement="implement der_example instead",
    ),
    Deprecation(
        kind="api",
        name="der_sdk.example.old_function",
        since="0.3",
        removal="0.5",
        replacement="call der_sdk.example.new_function",
    ),
    Deprecation(
        kind="rest",
        name="GET /example?old=1",
        since="0.2",
        removal="0.3",
        replacement="send new=1",
    ),
)


def old_function() -> None:
    warn_deprecated("der_sdk.example.old_function", table=TABLE)


def test_warn_deprecated_names_since_removal_and_replacement() -> None:
    with pytest.warns(DerSdkDeprecationWarning) as caught:
        old_function()
    (record,) = caught
    assert str(record.message) == (
        "der_sdk.example.old_function is deprecated since der-sdk 0.3 and will be removed "
        "in der-sdk 0.5; call der_sdk.example.new_function"
    )
    assert (record.filename, record.lineno) == (__file__, _line_of("        old_function()"))
    assert issubclass(DerSdkDeprecationWarning, DeprecationWarning)


def test_a_rest_deprecation_is_logged_once_for_the_operator_and_raises_no_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deprecations, "_logged", set())
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="der.deprecations"):
        warnings.simplefilter("error")  # a REST client's use is no Python warning
        warn_deprecated("GET /example?old=1", table=TABLE)
        warn_deprecated("GET /example?old=1", table=TABLE)
    assert [r.getMessage() for r in caplog.records] == [
        "GET /example?old=1 is deprecated since der-sdk 0.2 and will be removed in der-sdk "
        "0.3; send new=1 (a REST client used it; logged once per process)"
    ]


def test_an_unregistered_deprecation_is_a_programming_error() -> None:
    with pytest.raises(KeyError, match="add a row for it"):
        warn_deprecated("der_sdk.nothing", table=TABLE)


def _line_of(text: str) -> int:
    """The line of this file that is exactly ``text`` (the caller a warning blames)."""
    return Path(__file__).read_text().splitlines().index(text) + 1


def _manager(table: tuple[Deprecation, ...]) -> pluggy.PluginManager:
    spec = pluggy.HookspecMarker("demo")

    class Specs:
        @spec(warn_on_impl_args=hook_argument_warnings("der_example", table))
        def der_example(self, current: int, legacy: int) -> None: ...

        @spec(warn_on_impl=hook_warning("der_old_hook", table))
        def der_old_hook(self) -> None: ...

    pm = pluggy.PluginManager("demo")
    pm.add_hookspecs(Specs)
    return pm


def test_a_plugin_using_a_deprecated_hook_argument_is_warned_at_registration() -> None:
    impl = pluggy.HookimplMarker("demo")
    pm = _manager(TABLE)

    class Current:
        @impl
        def der_example(self, current: int) -> None: ...

    class Legacy:
        @impl
        def der_example(self, legacy: int) -> None: ...

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm.register(Current())  # only asks for the current argument: silent
    with pytest.warns(DerSdkDeprecationWarning, match=r"der_example\(legacy\).*since der-sdk 0\.2"):
        pm.register(Legacy())


def test_a_plugin_implementing_a_deprecated_hook_is_warned() -> None:
    impl = pluggy.HookimplMarker("demo")
    pm = _manager(TABLE)

    class Old:
        @impl
        def der_old_hook(self) -> None: ...

    with pytest.warns(DerSdkDeprecationWarning, match=r"removed in der-sdk 0\.3; implement"):
        pm.register(Old())


def test_the_table_only_names_real_hooks_and_is_listed_in_the_policy() -> None:
    policy = (ROOT / "docs" / "hook_policy.md").read_text().split("## Current deprecations")[1]
    listed = re.findall(r"^\| `([^`]+)` \|", policy, flags=re.M)
    assert sorted(listed) == sorted(row.name for row in DEPRECATIONS)
    for row in DEPRECATIONS:
        if row.kind in ("hook", "hook-argument"):
            assert hasattr(hookspecs, row.name.split("(")[0]), row.name


def test_the_policy_example_is_the_mechanism() -> None:
    policy = (ROOT / "docs" / "hook_policy.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", policy, flags=re.S)
    module = types.ModuleType("policy_example")
    exec(compile(block, "docs/hook_policy.md", "exec"), module.__dict__)
    with pytest.warns(DerSdkDeprecationWarning, match=r"der_example_hook\(old_arg\)"):
        module.pm.register(module.LegacyPlugin())
