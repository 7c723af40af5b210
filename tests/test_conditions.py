"""Device conditions as adapters report them: the queue behind the agent's reporter, and
the default reporter of a context built by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from der_sdk.conditions import ConditionQueue
from der_sdk.extensions import AdapterContext, NoConditions
from der_sdk.models import Asset

ASSET = Asset(asset_id="a", site_id="s", name="A")


def test_a_context_built_without_a_reporter_drops_conditions() -> None:
    context = AdapterContext(asset=ASSET, options=None)
    assert isinstance(context.conditions, NoConditions)
    context.conditions.raise_condition("trip", "major", "ignored")
    context.conditions.clear_condition("trip")


def test_changes_are_queued_once_per_activation_in_order_with_their_times() -> None:
    times = iter(datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=s) for s in range(10))
    woken: list[int] = []
    queue = ConditionQueue(notify=lambda: woken.append(1), clock=lambda: next(times))

    queue.raise_condition("trip", "major", "tripped")
    queue.raise_condition("trip", "critical", "tripped harder")  # already active
    queue.raise_condition("door", "info", "door open")
    assert queue.active == {"trip": "major", "door": "info"}
    queue.clear_condition("trip", "restarted")
    queue.clear_condition("trip")  # no longer active
    queue.clear_condition("never")  # never raised
    queue.raise_condition("trip", "warning", "")  # raised again after the clear

    changes = queue.drain()
    assert [(c.kind, c.code, c.severity, c.message) for c in changes] == [
        ("condition_raised", "trip", "major", "tripped"),
        ("condition_raised", "door", "info", "door open"),
        ("condition_cleared", "trip", "major", "restarted"),
        ("condition_raised", "trip", "warning", "trip raised"),
    ]
    assert [c.ts.second for c in changes] == [0, 1, 2, 3]
    assert len(woken) == 4
    assert queue.drain() == []
    assert queue.active == {"door": "info", "trip": "warning"}


def test_a_clear_without_text_says_which_code_cleared() -> None:
    queue = ConditionQueue()
    queue.raise_condition("overspeed_stop", "warning", "stopped")
    queue.clear_condition("overspeed_stop")
    assert queue.drain()[-1].message == "overspeed_stop cleared"


def test_an_empty_code_or_unknown_severity_is_refused_naming_it() -> None:
    queue = ConditionQueue()
    with pytest.raises(ValueError, match="code must be a non-empty string"):
        queue.raise_condition("", "major", "x")
    with pytest.raises(ValueError, match=r"raise_condition\('trip'\): severity must be one of"):
        queue.raise_condition("trip", "fatal", "x")  # type: ignore[arg-type]
    assert queue.drain() == []


def test_the_plugin_guide_example_raises_and_clears_through_the_context() -> None:
    import re
    from pathlib import Path

    from der_sdk.extensions import Adapter

    guide = (Path(__file__).resolve().parent.parent / "docs" / "plugin_guide.md").read_text()
    section = guide.split("## Device conditions", 1)[1].split("\n## ", 1)[0]
    example = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    namespace: dict[str, object] = {"Adapter": Adapter, "AdapterContext": AdapterContext}
    exec(example, namespace)
    adapter_class = namespace["InverterAdapter"]
    adapter_class.__abstractmethods__ = frozenset()  # type: ignore[attr-defined]
    queue = ConditionQueue()
    adapter = adapter_class(AdapterContext(asset=ASSET, options=None, conditions=queue))  # type: ignore[operator]
    adapter._check_fault_word(0b1)
    adapter._check_fault_word(0b1)
    adapter._check_fault_word(0b0)
    assert [(c.kind, c.code, c.message) for c in queue.drain()] == [
        ("condition_raised", "inverter_trip", "inverter tripped: grid fault"),
        ("condition_cleared", "inverter_trip", "inverter running again"),
    ]


def test_changes_put_back_come_first_again() -> None:
    woken: list[int] = []
    queue = ConditionQueue(notify=lambda: woken.append(1))
    queue.raise_condition("a", "info", "")
    queue.raise_condition("b", "info", "")
    taken = queue.drain()
    queue.raise_condition("c", "info", "")
    queue.restore(taken[1:])  # "a" was committed, "b" was not
    assert [c.code for c in queue.drain()] == ["b", "c"]
    assert len(woken) == 4
