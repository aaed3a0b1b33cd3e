"""``GET /v1/recommendations``: η, B and the critical batch size for (N, D) from the newest
ok recommender fit of a family (default: ``HYPERLAW_DEFAULT_FAMILY``) or of one experiment
(``server.recommend``: which scope and fit serve, the body, the in-memory cache).

The route is the service's hot path (``benchmarks/query.py`` compares it with a bare
endpoint on the same server stack): it answers from the cached recommender without a
database session, and returns the body that recommender encoded once per distinct query
(``ServedFit.answer``), so FastAPI does not validate it again; ``response_model`` still
documents the body in the OpenAPI document (``RecommendationPublic``), and the tests check
that real bodies validate against it. A query string answered before is answered from that
body before FastAPI parses the parameters (:class:`_KnownQueryRoute`), while the fit that
answered it still serves and was checked within ``CHECK_INTERVAL_S``, and only when reads
need no token (with ``HYPERLAW_READ_REQUIRES_TOKEN`` every request is authorized first).

Parameters are bounded to physically sensible values (:data:`N_PARAMS_RANGE`,
:data:`N_TOKENS_RANGE`, :data:`BATCH_SIZE_TOKENS_RANGE`): beyond them the laws' powers
overflow or divide by zero, and the answer is a 422 naming the field and the rule
(``greater_than_equal`` / ``less_than_equal``), as for NaN and ±inf (``finite_number``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute

from fitting.results import ParameterError
from server.api.deps import require_read_apart
from server.core.db import Database
from server.core.errors import FieldError, InputError
from server.recommend import RecommenderCache, ServedFit, answer_key, resolve_scope
from server.recommendation_schemas import RecommendationPublic
from server.schemas import NoNul

#: How long a request may answer from the cached fit before one request checks for a newer.
CHECK_INTERVAL_S = 1.0
#: Physically sensible bounds of the float parameters (module docstring), inclusive.
N_PARAMS_RANGE = (1e3, 1e15)
N_TOKENS_RANGE = (1e3, 1e16)
BATCH_SIZE_TOKENS_RANGE = (1.0, 1e12)
#: Query strings remembered for :class:`_KnownQueryRoute`, least recently used dropped first.
KNOWN_QUERIES = 4096

# raw query string -> (scope, the ServedFit.answer key); on the event loop's thread only
_Known = OrderedDict[bytes, tuple[str, tuple]]


def recommender_cache(request: Request) -> RecommenderCache:
    """The app's cache of served fits; call it on the event loop's thread."""
    state = request.app.state
    cache = getattr(state, "recommender_cache", None)
    if cache is None:  # created on the event loop's thread, so never twice
        cache = state.recommender_cache = RecommenderCache(state.database, CHECK_INTERVAL_S)
        state.recommendation_queries = _Known()
    return cache


def _known_answer(request: Request) -> Response | None:
    """The body for a query string answered before (module docstring), or None."""
    state = request.app.state
    if state.settings.read_requires_token:
        return None
    known: _Known | None = getattr(state, "recommendation_queries", None)
    hit = None if known is None else known.get(request.scope["query_string"])
    if hit is None:
        return None
    served = state.recommender_cache.peek(hit[0])
    body = None if served is None else served.kept_answer(hit[1])
    return None if body is None else Response(body, media_type="application/json")


class _KnownQueryRoute(APIRoute):
    """Answers a known query string (:func:`_known_answer`) before the parameters are
    parsed and validated; any other request takes the route as declared."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        declared = super().get_route_handler()

        async def handler(request: Request) -> Response:
            return _known_answer(request) or await declared(request)

        return handler


router = APIRouter(tags=["recommendations"], route_class=_KnownQueryRoute)


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
        float,
        Query(
            ge=N_PARAMS_RANGE[0],
            le=N_PARAMS_RANGE[1],
            allow_inf_nan=False,
            description="non-embedding parameters N, from 1e3 to 1e15",
        ),
    ],
    n_tokens: Annotated[
        float,
        Query(
            ge=N_TOKENS_RANGE[0],
            le=N_TOKENS_RANGE[1],
            allow_inf_nan=False,
            description="training tokens D, from 1e3 to 1e16",
        ),
    ],
    _auth: Annotated[None, Depends(require_read_apart)],
    seq_len: Annotated[int, Query(gt=0, le=2**31 - 1, description="tokens per sequence")] = 2048,
    batch_size_tokens: Annotated[
        float | None,
        Query(
            ge=BATCH_SIZE_TOKENS_RANGE[0],
            le=BATCH_SIZE_TOKENS_RANGE[1],
            allow_inf_nan=False,
            description="impose this global batch size (tokens): adds the best η for it and "
            "its step/token overhead versus the critical batch size; from 1 to 1e12",
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
        NoNul,
    ] = None,
    experiment: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            description="experiment id or name: use that experiment's own fit instead of a "
            "family's; not with family",
        ),
        NoNul,
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
    cache = recommender_cache(request)
    served: ServedFit | None = cache.get(scope)
    if served is None:
        by_default = experiment is None and family is None
        served = await run_in_threadpool(cache.refresh, scope, by_default=by_default)
    try:
        body = served.answer(
            n_params, n_tokens, seq_len=seq_len, batch_size_tokens=batch_size_tokens
        )
    except ParameterError as exc:
        raise InputError([FieldError(field=exc.field, rule=exc.rule, message=str(exc))]) from exc
    if experiment is None or experiment.isdigit():  # a name may come to mean another one
        known: _Known = request.app.state.recommendation_queries
        known[request.scope["query_string"]] = (
            scope,
            answer_key(n_params, n_tokens, seq_len, batch_size_tokens),
        )
        known.move_to_end(request.scope["query_string"])
        if len(known) > KNOWN_QUERIES:
            known.popitem(last=False)
    return Response(body, media_type="application/json")
