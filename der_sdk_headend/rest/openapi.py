"""The OpenAPI document tells the truth: every refusal a route can answer is declared.

:func:`declare_refusals` adds to each route the error statuses it can answer with,
derived from what the route is, so a new route gets them without anyone remembering:

- its access rule (:func:`der_sdk_headend.rest.auth.access`) is not ``open``: 401 (no,
  malformed, unknown or revoked token) and 403 (a token whose role is too weak);
- a path parameter (``{asset_id}``): 404 (no such asset, dispatch or token);
- any parameter or a body: 400 (a value that does not parse or is out of range);
- a body: 413 (larger than :data:`~der_sdk_headend.rest.body.MAX_BODY_BYTES`) and 415
  (not ``application/json``);
- ``NEEDS_STORAGE`` in its decorator: 503 (storage unavailable, or not open yet).

Every one of them carries the error body (:class:`~der_sdk_headend.rest.schemas.ErrorBody`).
Statuses a route declares itself (``responses=``) are kept.

:class:`StrictStructSchemaPlugin` gives a request body struct that refuses unknown fields
(``forbid_unknown_fields``) ``additionalProperties: false`` in its schema.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

# Litestar's own schema of a msgspec struct, extended below; not re-exported publicly.
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.constants import RESERVED_KWARGS
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.typing import FieldDefinition

from der_sdk_headend.rest.auth import access_of
from der_sdk_headend.rest.body import MAX_BODY_BYTES
from der_sdk_headend.rest.schemas import ErrorBody

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.openapi.spec import Schema

__all__ = [
    "NEEDS_STORAGE",
    "REFUSAL_DESCRIPTIONS",
    "StrictStructSchemaPlugin",
    "declare_refusals",
    "refusals_of",
]

_NEEDS_STORAGE_KEY = "der_needs_storage"


class _NeedsStorage(TypedDict):
    der_needs_storage: bool


NEEDS_STORAGE: _NeedsStorage = {"der_needs_storage": True}
"""Route decorator arguments of a route that reads or writes storage (or the live parts
opened with it): ``@get("/x", **access("viewer"), **NEEDS_STORAGE)``. It answers 503
while storage is unavailable or not open yet."""

REFUSAL_DESCRIPTIONS: dict[int, str] = {
    400: "Bad input: `detail` names the parameter or the body field (`$.mw`) and what is "
    "wrong, or where the JSON body is malformed.",
    401: "No token, a malformed `Authorization` header, an unknown or a revoked token "
    "(header `WWW-Authenticate: Bearer`).",
    403: "The token's role is too weak: `detail` names the role needed and the token's.",
    404: "No such item: `detail` names the id.",
    413: f"The request body is larger than {MAX_BODY_BYTES} bytes.",
    415: "The request body is not JSON: send `Content-Type: application/json`.",
    503: "Storage is unavailable or not open yet; nothing was changed, retry later (see /healthz).",
}


def _has_parameters(handler: HTTPRouteHandler, path: str) -> bool:
    """Whether the route takes a path, query or header parameter or a body: the rule
    Litestar uses to declare its validation 400."""
    if "{" in path or handler.parsed_data_field is not None:
        return True
    ignored = {*RESERVED_KWARGS, *handler.resolve_dependencies()}
    return any(name not in ignored for name in handler.parsed_fn_signature.parameters)


def refusals_of(handler: HTTPRouteHandler, path: str) -> set[int]:
    """The error statuses the route ``handler`` at ``path`` can answer with (the module
    docstring says why each)."""
    statuses: set[int] = set()
    if access_of(handler) not in (None, "open"):
        statuses |= {401, 403}
    if "{" in path:
        statuses.add(404)
    if _has_parameters(handler, path):
        statuses.add(400)
    if handler.parsed_data_field is not None:
        statuses |= {413, 415}
    if handler.opt.get(_NEEDS_STORAGE_KEY):
        statuses.add(503)
    return statuses


def declare_refusals(app: Litestar) -> None:
    """Add to every route of ``app`` in the OpenAPI document the refusals it can answer
    with (:func:`refusals_of`); a status the route declares itself is kept. Call before
    the document is first made."""
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            if not isinstance(handler, HTTPRouteHandler) or not handler.include_in_schema:
                continue
            declared = dict(handler.responses or {})
            for status in sorted(refusals_of(handler, route.path)):
                declared.setdefault(
                    status, ResponseSpec(ErrorBody, description=REFUSAL_DESCRIPTIONS[status])
                )
            handler.responses = declared


class StrictStructSchemaPlugin(StructSchemaPlugin):
    """The schema of a msgspec struct, with ``additionalProperties: false`` when the struct
    refuses unknown fields (``forbid_unknown_fields=True``, as request bodies do)."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        return super().is_plugin_supported_field(field_definition) and bool(
            field_definition.type_.__struct_config__.forbid_unknown_fields
        )

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        schema.additional_properties = False
        return schema
