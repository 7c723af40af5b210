"""``/tokens``: REST bearer tokens, for admins only, whatever ``HEADEND_AUTH`` says (the
first admin token is made with ``der tokens create``). Every change is audited."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException, NotFoundException
from litestar.params import FromPath, JSONBody

from der_sdk.errors import DerSdkError
from der_sdk_headend.rest.auth import TOKEN_ALWAYS, access, actor_of, client_source
from der_sdk_headend.rest.openapi import NEEDS_STORAGE
from der_sdk_headend.rest.schemas import NewToken, TokenRequest, TokenRow
from der_sdk_headend.tokens import UnknownTokenError

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["TokensController"]


def _file_error(exc: DerSdkError) -> HTTPException:
    return HTTPException(
        status_code=500, detail=f"{exc}; nothing was changed, fix the file and retry"
    )


class TokensController(Controller):
    path = "/tokens"
    tags = ["admin"]
    # An admin token even while authentication is off (auto on loopback with no token
    # yet): otherwise any local process could mint the first admin token for itself.
    opt = TOKEN_ALWAYS

    @get("/", summary="Every REST token (no secrets), oldest first", **access("admin"))
    async def list_tokens(self, headend: NamedDependency[Headend]) -> list[TokenRow]:
        return [TokenRow.of(t) for t in headend.rest_auth.tokens()]

    @post(
        "/",
        status_code=201,
        summary="Create a REST token",
        description="`role`: `viewer` (every GET but /audit and /tokens), `operator` "
        "(viewer + POST /dispatch) or `admin` (everything). The response holds the secret "
        "`token`: it is shown this once and stored only as a hash. Use it as "
        "`Authorization: Bearer <token>`.",
        **access("admin"),
        **NEEDS_STORAGE,  # the audit trail
    )
    async def create_token(
        self,
        request: Request[Any, Any, Any],
        headend: NamedDependency[Headend],
        data: JSONBody[TokenRequest],
    ) -> Response[NewToken]:
        auditor = headend.auditor  # 503 before storage is open: no change goes unaudited
        actor, source = actor_of(request), client_source(request)
        try:
            token, secret = await headend.rest_auth.create(role=data.role, name=data.name)
        except DerSdkError as exc:
            raise _file_error(exc) from None
        await auditor.record(
            "token.create",
            actor=actor,
            source=source,
            outcome="ok",
            message=f"token {token.label()} ({token.role}) created by {actor.describe()}",
            token_id=token.id,
            token_name=token.name,
            role=token.role,
        )
        created = NewToken(
            id=token.id,
            name=token.name,
            role=token.role,
            created_at=token.created_at,
            revoked_at=token.revoked_at,
            active=token.active,
            token=secret,
        )
        return Response(created, status_code=201, headers={"Cache-Control": "no-store"})

    @delete(
        "/{token_id:str}",
        status_code=200,
        summary="Revoke a REST token",
        description="Refused from the next request on. Revoking a revoked token changes "
        "nothing and returns it.",
        **access("admin"),
        **NEEDS_STORAGE,  # the audit trail
    )
    async def revoke_token(
        self,
        request: Request[Any, Any, Any],
        headend: NamedDependency[Headend],
        token_id: FromPath[str],
    ) -> TokenRow:
        auditor = headend.auditor
        actor, source = actor_of(request), client_source(request)
        try:
            token, changed = await headend.rest_auth.revoke(token_id)
        except UnknownTokenError:
            raise NotFoundException(f"unknown token {token_id}") from None
        except DerSdkError as exc:
            raise _file_error(exc) from None
        if changed:
            await auditor.record(
                "token.revoke",
                actor=actor,
                source=source,
                outcome="ok",
                message=f"token {token.label()} ({token.role}) revoked by {actor.describe()}",
                token_id=token.id,
                token_name=token.name,
                role=token.role,
            )
        return TokenRow.of(token)
