"""What the operations files (docs/runbooks.md, deploy/prometheus/rules.yml, the Grafana
dashboard) name, and what a real headend exposes, for the tests that keep them in step
(tests/test_runbooks.py, tests/test_deploy.py, tests/cluster/test_ops_metrics.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from der_sdk.testing.services import service_missing

ROOT = Path(__file__).resolve().parents[1]
RUNBOOKS = ROOT / "docs" / "runbooks.md"
DEPLOYMENT = ROOT / "docs" / "deployment.md"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "der-headend.json"

EXTERNAL_METRICS = frozenset({"up"})
"""Metrics Prometheus writes itself, not the headend."""
BUS_ONLY_PREFIXES = ("der_bus_", "der_cluster_")
"""Metrics a headend exposes only as a replica in bus mode (tests/cluster)."""

_PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left",
     "group_right", "offset", "inf", "nan"}
)  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_OFFSET = re.compile(r"\boffset\s+-?\w+", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![\w:])", re.IGNORECASE)
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)")
_DER_METRIC = re.compile(r"\b(der_[a-z0-9_]*)(?:\(([a-z0-9_|]+)\))?")
"""A metric name, or a grep pattern's prefix and alternatives: ``der_ingest_(queue|stalled)``."""


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions,
    keywords, label names (in matchers and ``by (...)`` clauses) or numbers."""
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function call
        if match.group().lower() not in _PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def rules() -> list[dict[str, Any]]:
    """Every rule of rules.yml."""
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    """``(where, PromQL)`` of every dashboard query, the template variables' included."""
    document = json.loads(DASHBOARD.read_text())
    for panel in document["panels"]:
        for target in panel.get("targets", ()):
            yield f"panel {panel['title']!r}", target["expr"]
    for variable in document["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            for metric in _LABEL_VALUES.findall(query.get("query", "")):
                yield f"variable {variable['name']!r}", metric


def named_metrics() -> dict[str, set[str]]:
    """Metric name → where the operations files name it."""
    found: dict[str, set[str]] = {}
    for prefix, alternatives in _DER_METRIC.findall(RUNBOOKS.read_text()):
        for name in [prefix + a for a in alternatives.split("|")] if alternatives else [prefix]:
            found.setdefault(name, set()).add("docs/runbooks.md")
    for rule in rules():
        for name in promql_metric_names(rule["expr"]):
            found.setdefault(name, set()).add(f"rules.yml {rule['alert']}")
    for where, expr in dashboard_exprs():
        for name in promql_metric_names(expr):
            found.setdefault(name, set()).add(f"der-headend.json {where}")
    return found


def exposed_metric_names(exposition: str) -> set[str]:
    """The names a scraper can query from ``exposition`` (a ``/metrics`` body): counters
    with their ``_total``; families without samples (no agent connected yet) included."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
        names.update(sample.name for sample in family.samples)
    return names


def promtool() -> str:
    """The promtool binary: ``$PROMTOOL``, then ``PATH``, then the cache .ci/run fills
    (``$XDG_CACHE_HOME/der-sdk/promtool``). Skips without it, or fails when
    ``DER_SDK_REQUIRE_SERVICES=1``."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "der-sdk"
    for candidate in (os.environ.get("PROMTOOL"), shutil.which("promtool"), cache / "promtool"):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    service_missing(
        "promtool is not installed (Debian: apt-get install prometheus, or set PROMTOOL; "
        ".ci/run fetches it)"
    )
