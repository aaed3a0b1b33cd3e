"""``GET /v1/recommendations``: η, B and the critical batch size for (N, D) from the newest
ok recommender fit of a family (default: ``HYPERLAW_DEFAULT_FAMILY``) or of one experiment
(``server.recommend``: which scope and fit serve, the body, the in-memory cache).

The route is the service's hot path (the query benchmark asks for ≥ 1,000 requests/s): it
answers from the cached recommender without a database session, and returns the body it
encoded itself, so FastAPI does not validate it again; ``response_model`` still documents
the body in the OpenAPI document (``RecommendationPublic``), and the tests check that real
bodies validate against it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials

from client.wire import dumps
from fitting.results import ParameterError
from server.api.deps import authorize, bearer_scheme
from server.core.db import Database
from server.core.errors import FieldError, InputError
from server.models import TokenScope
from server.recommend import RecommenderCache, resolve_scope
from server.recommendation_schemas import RecommendationPublic

#: How long a request may answer from the cached fit before one request checks for a newer.
CHECK_INTERVAL_S = 1.0


def _cache(request: Request) -> RecommenderCache:
    state = request.app.state
    cache = getattr(state, "recommender_cache", None)
    if cache is None:  # created on the event loop's thread, so never twice
        cache = state.recommender_cache = RecommenderCache(state.database, CHECK_INTERVAL_S)
    return cache


def _read_auth(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """Read scope, checked only when the service requires tokens for reads (no database
    session otherwise: this route must stay cheap)."""
    if not request.app.state.settings.read_requires_token:
        return
    database: Database = request.app.state.database
    with database.session() as session:
        authorize(TokenScope.READ, request, session, credentials)


router = APIRouter(tags=["recommendations"])


@router.get(
    "/recommendations",
    response_model=RecommendationPublic,
    responses={
        404: {"description": "the named experiment or family does not exist"},
        422: {
            "description": "a parameter is missing or breaks its rule (family and "
            "experiment together: rule exclusive)"
        },
        503: {"description": "no ok fit yet; the message says why and how to get one"},
    },
)
async def get_recommendation(
    request: Request,
    n_params: Annotated[
        float, Query(gt=0, allow_inf_nan=False, description="non-embedding parameters N")
    ],
    n_tokens: Annotated[float, Query(gt=0, allow_inf_nan=False, description="training tokens D")],
    _auth: Annotated[None, Depends(_read_auth)],
    seq_len: Annotated[int, Query(gt=0, le=2**31 - 1, description="tokens per sequence")] = 2048,
    batch_size_tokens: Annotated[
        float | None,
        Query(
            gt=0,
            allow_inf_nan=False,
            description="impose this global batch size (tokens): adds the best η for it and "
            "its step/token overhead versus the critical batch size",
        ),
    ] = None,
    family: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=100,
            description="the family whose fit answers (default: the service's "
            "HYPERLAW_DEFAULT_FAMILY); not with experiment",
        ),
    ] = None,
    experiment: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            description="experiment id or name: use that experiment's own fit instead of a "
            "family's; not with family",
        ),
    ] = None,
) -> Response:
    """Recommend the peak learning rate η*, batch size B* and critical batch size for a
    model of ``n_params`` trained on ``n_tokens`` (formulas: ``fitting.recommender``), from
    the fit of ``family`` (default: the service's default family) or of ``experiment``."""
    database: Database = request.app.state.database
    default_family = request.app.state.settings.default_family
    # the common query (no experiment) needs no thread hop: a family's scope is its name
    if experiment is None:
        scope = resolve_scope(database, None, family, default_family=default_family)
    else:
        scope = await run_in_threadpool(
            resolve_scope, database, experiment, family, default_family=default_family
        )
    cache = _cache(request)
    served = cache.get(scope)
    if served is None:
        by_default = experiment is None and family is None
        served = await run_in_threadpool(cache.refresh, scope, by_default=by_default)
    try:
        body = served.recommend(
            n_params, n_tokens, seq_len=seq_len, batch_size_tokens=batch_size_tokens
        )
    except ParameterError as exc:
        raise InputError([FieldError(field=exc.field, rule=exc.rule, message=str(exc))]) from exc
    return Response(dumps(body).encode(), media_type="application/json")
