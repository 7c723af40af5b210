"""Request bodies: JSON only, of bounded size, refused with a 4xx that says what and where.

The app's request class (:class:`JsonBodyRequest`) checks a route's body before Litestar
turns it into the handler's ``data``:

- larger than :data:`MAX_BODY_BYTES`: 413 (Litestar, from ``request_max_body_size``);
- a ``Content-Type`` other than JSON: 415;
- not JSON, or not of the route's body type: 400 naming the field (``$.mw``) or, for
  malformed JSON, the byte where decoding stopped.

JSON is decoded the way Litestar does (into plain values, then converted to the body
type). When that fails, the body is decoded once more straight into the body type, which
stops at the first wrong value and names its field: the plain decode cannot name the
field of a number out of range (``1e400``), and recurses into nesting that the body type
never allows (``[[[[...`` thousands deep) until Python's recursion limit, a
``RecursionError`` and, before this module, a 500.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.exceptions import ClientException, HTTPException, ValidationException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.serialization import default_serializer
from litestar.types import Empty

__all__ = ["JSON_MEDIA_TYPES", "MAX_BODY_BYTES", "JsonBodyRequest", "body_error", "encode_json"]

MAX_BODY_BYTES = 64 * 1024
"""The largest request body accepted (413 beyond); the API's bodies are a few hundred bytes."""

JSON_MEDIA_TYPES = ("application/json",)
"""``Content-Type`` values of a JSON body; ``application/<anything>+json`` is JSON too."""

_plain_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder(enc_hook=default_serializer)


def encode_json(value: object) -> bytes:
    """The JSON of a response body, byte for byte what Litestar makes of ``value``
    returned by a handler (the same msgspec encoder and fallback for other types), for a
    hot route that answers bytes and skips Litestar's generic serialisation."""
    return _encoder.encode(value)


def _is_json(media_type: str) -> bool:
    media_type = media_type.strip().lower()
    return media_type in JSON_MEDIA_TYPES or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def _path_and_message(error: msgspec.ValidationError) -> tuple[str | None, str]:
    """``("mw", "Number out of range")`` from msgspec's ``Number out of range - at `$.mw```."""
    message, sep, where = str(error).rpartition(" - at `")
    if not sep:
        return None, str(error)
    path = where.rstrip("`")
    return (path.removeprefix("$.") if path.startswith("$.") else path), message


def body_error(body: bytes, body_type: Any, cause: BaseException) -> HTTPException:
    """The 400 for a body that the plain JSON decode refused with ``cause``: decoded again
    into ``body_type`` to name the field at fault."""
    try:
        msgspec.json.decode(body, type=body_type)
    except msgspec.ValidationError as exc:
        key, message = _path_and_message(exc)
        if key is None:
            detail = f"invalid request body: {message}"
        else:
            detail = f"invalid request body at `$.{key}`: {message}"
        return ValidationException(
            detail, extra=[{"message": message, "key": key or "data", "source": "body"}]
        )
    except msgspec.DecodeError as exc:
        reason = str(exc).removeprefix("JSON is malformed: ")
        return ClientException(f"request body is malformed JSON: {reason}")
    except RecursionError:
        pass
    if isinstance(cause, RecursionError):
        return ClientException(
            "request body is malformed JSON: nested too deeply to decode (arrays or objects "
            "inside each other hundreds of levels deep)"
        )
    return ClientException(f"request body is malformed JSON: {cause}")


class JsonBodyRequest(Request[Any, Any, Any]):
    """The request class of the app: a route's JSON body checked as the module says."""

    async def body(self) -> bytes:
        try:
            return await super().body()
        except RequestEntityTooLarge:
            limit = self.route_handler.resolve_request_max_body_size()
            raise RequestEntityTooLarge(
                f"request body larger than {limit} bytes; the bodies of this API are a "
                "JSON object of a few fields"
            ) from None

    async def json(self) -> Any:
        if self._json is not Empty:
            return self._json
        media_type = self.content_type[0]
        if not _is_json(media_type):
            raise HTTPException(
                status_code=415,
                detail=f"request body must be JSON: send `Content-Type: application/json` "
                f"(got {f'`{media_type}`' if media_type else 'no Content-Type'})",
            )
        body = await self.body()
        try:
            value = _plain_decoder.decode(body or b"null")
        except (msgspec.DecodeError, RecursionError) as exc:
            field = self.route_handler.parsed_data_field
            raise body_error(body, field.annotation if field else Any, exc) from None
        self._json = self._connection_state.json = value
        return value
