"""Observer hooks are isolated: one plugin that raises is logged by name, the others still run."""

from __future__ import annotations

import inspect
import logging

import pytest
from headend_kit import Observer, make_exploding_observer_plugin, make_observer_plugin

from der_sdk import hookspecs, load_plugins


def test_the_observer_hooks_are_the_hooks_that_return_nothing() -> None:
    returning_none = sorted(
        name
        for name in dir(hookspecs)
        if name.startswith("der_")
        and inspect.signature(getattr(hookspecs, name)).return_annotation == "None"
    )
    assert sorted(hookspecs.OBSERVER_HOOKS) == returning_none
    recording = make_observer_plugin(Observer())
    assert sorted(n for n in dir(recording) if n.startswith("der_")) == returning_none


@pytest.mark.parametrize("hook", hookspecs.OBSERVER_HOOKS)
def test_an_observer_that_raises_is_logged_by_name_and_the_next_is_still_called(
    hook: str, caplog: pytest.LogCaptureFixture
) -> None:
    observer = Observer()
    exploded: list[str] = []
    plugins = load_plugins(entry_points=False, env={})
    plugins.register(make_observer_plugin(observer), "recording")
    # pluggy calls the last registered first: the exploding plugin goes before the other.
    plugins.register(make_exploding_observer_plugin(exploded), "exploding", package="der-x")
    arguments = {
        name: [object()] for name in inspect.signature(getattr(hookspecs, hook)).parameters
    }

    with caplog.at_level(logging.ERROR, logger="der.plugins"):
        plugins.notify(hook, **arguments)

    assert exploded == [hook]
    assert observer.calls == [(hook, arguments)]
    (record,) = caplog.records
    assert record.getMessage() == (
        f"observer {hook} of plugin 'exploding' (der-x) raised; "
        "the other observers were called and the caller carries on"
    )
    assert record.exc_info is not None and str(record.exc_info[1]) == f"boom in {hook}"
