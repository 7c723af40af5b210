"""The REST API under a schema-driven fuzzer: schemathesis reads the OpenAPI document the
headend serves and sends every operation requests made from it, valid ones and ones that
break the schema on purpose (wrong types, missing fields, other media types), without a
token and with an operator's and an admin's.

Every answer must be no server error (never a 500), a status the operation declares,
of the declared media type, and a body that matches the declared schema. The app is
driven through ASGI in-process (no socket); the headend behind it is a real one on
memory storage, started by the app's lifespan on the loop that serves the requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from headend_kit import BESS_1, SITE_A, bearer, make_config
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from litestar import Litestar
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from der_sdk.plugins import Plugins
from der_sdk_headend import Headend
from der_sdk_headend.rest import create_app

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_OPERATION = {None: 5, "operator": 20, "admin": 20}
"""Per operation. Without a token every protected operation answers 401 before it reads
its input, so a few examples suffice there."""
KNOWN_IDS = {"asset_id": BESS_1, "site_id": SITE_A}
"""Ids of the inventory, put into half the cases: random ids alone would stop at the 404
of an unknown asset and never reach the code behind it."""


def with_known_ids(case: Any, use: bool) -> Any:
    if not use:
        return case
    for name, value in KNOWN_IDS.items():
        if case.path_parameters and name in case.path_parameters:
            case.path_parameters[name] = value
        if isinstance(case.body, dict) and name in case.body:
            case.body[name] = value
    return case


@pytest.fixture
def fuzzed_app(
    inventory_path: Path, plugins: Plugins, role_tokens: dict[str, str]
) -> Iterator[Litestar]:
    """The REST app of a headend with ``HEADEND_AUTH=on``; its lifespan starts and stops
    the headend on the event loop schemathesis runs the app on."""
    headend = Headend(make_config(inventory_path, HEADEND_AUTH="on"), plugins=plugins)
    app = create_app(headend)
    app.on_startup.append(headend.start)
    app.on_shutdown.append(headend.stop)
    try:
        yield app
    finally:
        asgi.shutdown_lifespans()


def fuzz(app: Litestar, headers: dict[str, str], examples: int) -> dict[str, list[str]]:
    """Run the fuzzer on every operation: the failures by operation (empty: none)."""
    schema = schemathesis.openapi.from_asgi("/schema/openapi.json", app)
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    failures: dict[str, list[str]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        cases = st.one_of(operation.as_strategy(generation_mode=mode) for mode in GenerationMode)
        strategy = st.builds(with_known_ids, cases, st.booleans())

        @given(case=strategy)
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            run()
        except (FailureGroup, AssertionError) as exc:
            failures[operation.label] = [str(exc)]
    return failures


@pytest.mark.parametrize("role", [None, "operator", "admin"], ids=lambda r: r or "no-token")
def test_the_fuzzer_finds_no_server_error_and_only_declared_answers(
    fuzzed_app: Litestar, role_tokens: dict[str, str], role: str | None
) -> None:
    headers = bearer(role_tokens[role]) if role else {}
    failures = fuzz(fuzzed_app, headers, EXAMPLES_PER_OPERATION[role])
    assert not failures, "\n\n".join(
        f"{label}:\n" + "\n".join(found) for label, found in failures.items()
    )
