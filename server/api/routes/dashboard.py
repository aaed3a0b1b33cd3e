"""``/v1/dashboard/*``: what the web dashboard at ``/`` and ``hyperlaw plot`` draw
(:mod:`server.dashboard`), and ``/`` itself: the page and its static files
(``server/static``), shipped in the package and served by this app, nothing loaded from
elsewhere.

The JSON routes follow the API's read auth (open unless ``HYPERLAW_READ_REQUIRES_TOKEN``);
the page and its files are always open (they hold no data) and ask for a read token when a
JSON route answers 401. ``family`` defaults to the service's default family; a family that
holds no experiment is a 404 naming the known ones. Recommendations come from the same
cached fit as ``/v1/recommendations``: a family without an ok fit shows its runs and the
reason, not an error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import Field

from server import dashboard
from server.api.deps import require_read_apart
from server.api.routes.recommendations import recommender_cache
from server.core.errors import HyperlawError
from server.recommend import ServedFit
from server.schemas import INT64_MAX, NoNul
from server.worker.scopes import family_scope

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"

# auth in its own session: the routes open theirs (server.api.deps.require_read_apart)
router = APIRouter(
    prefix="/dashboard", tags=["dashboard"], dependencies=[Depends(require_read_apart)]
)
page = APIRouter(include_in_schema=False)

Family = Annotated[
    str | None,
    Query(min_length=1, max_length=100, description="default: HYPERLAW_DEFAULT_FAMILY"),
    NoNul,
]
# N and D as the recommendations take them (1e9 or 1000000000); a group's are integers
Count = Annotated[float, Query(ge=1, le=INT64_MAX, allow_inf_nan=False)]


def _family(request: Request, family: str | None) -> str:
    return family or request.app.state.settings.default_family


async def _recommend(request: Request, family: str) -> Callable[..., dict[str, Any]]:
    """The served fit's ``recommend`` for the family's scope; while the family has no ok
    fit, a function that raises why (the page shows the runs and that reason)."""
    cache = recommender_cache(request)
    scope = family_scope(family)
    served: ServedFit | None = cache.get(scope)
    if served is None:
        try:
            served = await run_in_threadpool(cache.refresh, scope)
        except HyperlawError as exc:
            error = exc

            def unavailable(*_args: Any, **_kwargs: Any) -> dict[str, Any]:
                raise error

            return unavailable
    return served.recommend


def _in_session(request: Request, build: Callable[..., dict[str, Any]], **kwargs: Any):
    def run() -> dict[str, Any]:
        with request.app.state.database.session() as session:
            return build(session=session, **kwargs)

    return run_in_threadpool(run)


@router.get("/overview")
async def overview(request: Request) -> dict[str, Any]:
    """Families, experiments with their trials' status counts and running trials' progress,
    and the newest fits (without their params)."""
    default = request.app.state.settings.default_family
    return await _in_session(request, dashboard.overview, default_family=default)


@router.get("/groups", responses={404: {"description": "the family holds no experiment"}})
async def groups(request: Request, family: Family = None) -> dict[str, Any]:
    """The family's (N, D) groups: run counts by status and the best completed run."""
    return await _in_session(request, dashboard.groups, family=_family(request, family))


@router.get("/group", responses={404: {"description": "no such family, or no run at (N, D)"}})
async def group(
    request: Request, n_params: Count, n_tokens: Count, family: Family = None
) -> dict[str, Any]:
    """One (N, D) group: its runs, best run, the recommendation at (N, D), the bell fit's
    η* per batch size and the cbs fit's steps to target."""
    name = _family(request, family)
    recommend = await _recommend(request, name)
    return await _in_session(
        request,
        dashboard.group,
        family=name,
        n_params=round(n_params),
        n_tokens=round(n_tokens),
        recommend=recommend,
    )


@router.get("/laws", responses={404: {"description": "the family holds no experiment"}})
async def laws(
    request: Request,
    family: Family = None,
    n_params: Annotated[
        list[Annotated[float, Field(ge=1, le=INT64_MAX, allow_inf_nan=False)]] | None,
        Query(max_length=8, description="model sizes to draw (repeat; default: the family's)"),
    ] = None,
) -> dict[str, Any]:
    """η*, B* and the CBS against D for a few model sizes with their intervals, the groups'
    own optima and the published Step Law formula."""
    name = _family(request, family)
    recommend = await _recommend(request, name)
    sizes = None if n_params is None else [round(n) for n in n_params]
    return await _in_session(
        request, dashboard.laws, family=name, recommend=recommend, n_params=sizes
    )


@page.get("/")
def index() -> FileResponse:
    """The dashboard (its scripts and styles are under ``/static``, mounted by the app)."""
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
