"""``/v1/tokens``: API tokens, for a token with admin scope only (reads too, whatever
``HYPERLAW_READ_REQUIRES_TOKEN`` says): list them, create one (its secret in the answer,
this once), revoke one by name. What ``hyperlaw token create|list|revoke`` does on the
database, over the API; neither ever shows a secret again or a hash."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from server import crud
from server.api.deps import AdminAuth, Limit, Offset, SessionDep
from server.api.limits import JsonLimitsRoute
from server.schemas import NoNul, TokenCreate, TokenCreated, TokenPublic, TokensPublic

router = APIRouter(prefix="/tokens", tags=["tokens"], route_class=JsonLimitsRoute)

#: Admin routes answer 401 and 403 whatever the settings (the defaults of main.py's
#: document say that reads need a token only when the service requires it).
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "no bearer token, or a bad or revoked one"},
    403: {"description": "the token lacks admin scope"},
}
TokenName = Annotated[
    str, Path(min_length=1, max_length=200, description="the token's name"), NoNul
]


@router.get("", response_model=TokensPublic, dependencies=[AdminAuth], responses=ADMIN_ERRORS)
def list_tokens(session: SessionDep, limit: Limit = 100, offset: Offset = 0) -> TokensPublic:
    """Every token, revoked ones too, by id: names, scopes, owners, dates; never a secret."""
    rows, count = crud.page_tokens(session=session, limit=limit, offset=offset)
    return TokensPublic(data=[TokenPublic.model_validate(t) for t in rows], count=count)


@router.post(
    "",
    response_model=TokenCreated,
    status_code=201,
    dependencies=[AdminAuth],
    responses={**ADMIN_ERRORS, 409: {"description": "a token of that name exists (revoked too)"}},
)
def create_token(token_in: TokenCreate, session: SessionDep) -> TokenCreated:
    """Create a token; the answer holds its ``secret``, shown this once (only its hash is
    stored). A name in use, by a live or a revoked token, answers 409."""
    token, secret = crud.create_token(
        session=session, name=token_in.name, scope=token_in.scope, owner=token_in.owner
    )
    return TokenCreated.model_validate(
        {**TokenPublic.model_validate(token).model_dump(), "secret": secret}
    )


@router.delete(
    "/{name:path}",
    response_model=TokenPublic,
    dependencies=[AdminAuth],
    responses={**ADMIN_ERRORS, 404: {"description": "no token has this name"}},
)
def revoke_token(name: TokenName, session: SessionDep) -> TokenPublic:
    """Revoke the token (it fails from the next request on, this one's own included) and
    answer its record; revoking a revoked token changes nothing. Tokens are kept, for the
    trials they created."""
    return TokenPublic.model_validate(crud.revoke_token(session=session, name=name))
