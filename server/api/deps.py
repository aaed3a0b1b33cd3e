"""Request dependencies: the per-request session, bearer-token scopes (read, write, admin:
``ReadAuth``, ``WriteAuth``, ``AdminAuth``; ``WriteToken`` gives a route the token itself)
and the parameter types the routes share.

``SessionDep`` opens one session per request from the app's ``Database`` (its
``session()``, i.e. ``session_scope``) and closes it when
the route function returns (dependency scope ``function``), so the commit -- and any error
it raises -- happens before the response is sent. Auth shares that session.

Parameters that reach SQL are bounded to what their column holds (``Offset``, ``ObjectId``,
``IdFilter``, ``CountFilter``: at most 2**63 - 1, a 422 beyond rather than the driver's
overflow error, a 500), and text filters (``TextFilter``) reject NUL as the bodies do
(``server.schemas.NoNul``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from server import crud
from server.core.config import Settings
from server.core.db import Database
from server.models import ApiToken, TokenScope, utcnow
from server.schemas import INT64_MAX, NoNul

Offset = Annotated[int, Query(ge=0, le=INT64_MAX, description="matches to skip")]
Limit = Annotated[int, Query(ge=1, le=1000, description="matches to return")]
ObjectId = Annotated[int, Path(ge=1, le=INT64_MAX)]
IdFilter = Annotated[int | None, Query(ge=1, le=INT64_MAX)]
CountFilter = Annotated[int | None, Query(ge=0, le=INT64_MAX)]
TextFilter = Annotated[str | None, Query(), NoNul]

bearer_scheme = HTTPBearer(auto_error=False, description="API token: `hyperlaw token create`")


def get_session(request: Request) -> Iterator[Session]:
    database: Database = request.app.state.database
    with database.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def authorize(
    needed: TokenScope,
    request: Request,
    session: Session,
    credentials: HTTPAuthorizationCredentials | None,
) -> ApiToken | None:
    """Check the bearer token for ``needed`` scope (401 without a valid one, 403 without the
    scope); None when the route is open to anonymous reads. Routes that avoid a per-request
    session (``/v1/recommendations``) call this directly."""
    settings: Settings = request.app.state.settings
    if needed == TokenScope.READ and not settings.read_requires_token:
        return None
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise HTTPException(
            401, f"missing bearer token; this route needs {needed.value} scope", headers=challenge
        )
    token = crud.authenticate(session=session, secret=credentials.credentials)
    if token is None:
        raise HTTPException(401, "invalid or revoked token", headers=challenge)
    if not TokenScope(token.scope).allows(needed):
        raise HTTPException(
            403, f"token {token.name!r} has scope {token.scope}; this route needs {needed.value}"
        )
    now = utcnow()
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
        token.last_used_at = now
    return token


def require_read(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> ApiToken | None:
    return authorize(TokenScope.READ, request, session, credentials)


def require_write(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> ApiToken | None:
    return authorize(TokenScope.WRITE, request, session, credentials)


def require_admin(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> ApiToken | None:
    """Admin scope, for reads as for writes (``/v1/tokens``): never open."""
    return authorize(TokenScope.ADMIN, request, session, credentials)


async def require_read_apart(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """Read scope like :func:`require_read`, in a session of its own that is closed before
    the route runs, and only when the service requires tokens for reads (no session and no
    thread hop otherwise). For async routes that open their own sessions: on SQLite a
    session holds the write lock, and a route's second session would wait for the first."""
    if not request.app.state.settings.read_requires_token:
        return
    database: Database = request.app.state.database

    def check() -> None:
        with database.session() as session:
            authorize(TokenScope.READ, request, session, credentials)

    await run_in_threadpool(check)


ReadAuth = Depends(require_read)
WriteAuth = Depends(require_write)
AdminAuth = Depends(require_admin)
#: The token of a write request (never None: writes always need one), for routes that record it.
WriteToken = Annotated[ApiToken | None, WriteAuth]
