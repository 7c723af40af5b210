"""HTTP to an IEEE 2030.5 server: GET a resource into its schema model, page through a
list, POST a model. Every document is read and written by envoy-schema's pydantic-xml
models; nothing here builds XML by hand.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urljoin

import httpx
from pydantic import ValidationError
from pydantic_xml import BaseXmlModel

from der_sdk.errors import DerSdkError

__all__ = ["SEP_XML", "Sep2Client", "Sep2Error", "build_ssl_context"]

SEP_XML = "application/sep+xml"
PAGE_SIZE = 100
"""Items asked for per list page (``?s=<start>&l=<limit>``)."""

M = TypeVar("M", bound=BaseXmlModel)
T = TypeVar("T")


class Sep2Error(DerSdkError):
    """The server could not be reached (``unreachable``), or answered with an error or a
    document that is not what the standard says; the message names the URL."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def build_ssl_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext:
    """A TLS client context with the client certificate. Reads files: call it off the
    event loop."""
    context = ssl.create_default_context(cafile=ca)
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


class Sep2Client:
    """One server: ``base_url`` is the DeviceCapability URL; hrefs resolve against it."""

    def __init__(self, base_url: str, *, verify: ssl.SSLContext | bool, timeout_s: float) -> None:
        self.base_url = base_url
        self._http = httpx.AsyncClient(
            verify=verify, timeout=timeout_s, headers={"Accept": SEP_XML}
        )

    def url(self, href: str) -> str:
        return urljoin(self.base_url, href)

    async def get(self, href: str, model: type[M], params: dict[str, int] | None = None) -> M:
        url = self.url(href)
        response = await self._request("GET", url, params=params)
        try:
            return model.from_xml(response.content)
        except (ValidationError, ValueError) as exc:
            raise Sep2Error(
                f"GET {url}: not a valid {model.__name__}: {_first_line(exc)}"
            ) from None

    async def get_all(
        self, href: str, model: type[M], items: Callable[[M], Sequence[T] | None]
    ) -> tuple[M, list[T]]:
        """Every item of a list resource, page by page; the first page and the items."""
        first: M | None = None
        found: list[T] = []
        start = 0
        while True:
            page = await self.get(href, model, params={"s": start, "l": PAGE_SIZE})
            first = first or page
            batch = list(items(page) or [])
            found.extend(batch)
            start += len(batch)
            total = int(getattr(page, "all_", len(found)))
            if not batch or start >= total:
                return first, found

    async def post(self, href: str, body: BaseXmlModel) -> str | None:
        """POST ``body``; the ``Location`` the server answered, if any (absolute)."""
        url = self.url(href)
        response = await self._request(
            "POST",
            url,
            content=body.to_xml(skip_empty=True, exclude_none=True),
            headers={"Content-Type": SEP_XML},
        )
        location = response.headers.get("Location")
        return self.url(location) if location else None

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise Sep2Error(
                f"{method} {url}: {type(exc).__name__}: {exc}", unreachable=True
            ) from None
        if response.status_code >= 400:
            raise Sep2Error(f"{method} {url}: HTTP {response.status_code}")
        return response

    async def aclose(self) -> None:
        await self._http.aclose()


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
