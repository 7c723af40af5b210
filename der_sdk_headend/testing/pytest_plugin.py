"""The headend's pytest plugin, registered through the ``pytest11`` entry point
``der_sdk_headend`` (``-p no:der_sdk_headend`` turns it off): the fixtures
``der_headend_config``, ``der_headend`` and ``der_http`` of
:mod:`der_sdk_headend.testing.fixtures`, for every test suite in an environment where
der-sdk is installed. Like der-sdk's own plugin it needs pytest-asyncio for them.
"""

from __future__ import annotations

from der_sdk.testing.pytest_plugin import HAVE_PYTEST_ASYNCIO

if HAVE_PYTEST_ASYNCIO:
    from der_sdk_headend.testing.fixtures import der_headend, der_headend_config, der_http

    __all__ = ["der_headend", "der_headend_config", "der_http"]
