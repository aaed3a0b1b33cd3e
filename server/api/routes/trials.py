"""``/v1/trials``: trials, their heartbeats and their loss curves; excluding a trial from the
fits (``PATCH``) and deleting one (``DELETE``, admin scope): ``server.curation``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from client.wire import MAX_POINTS_PER_REQUEST
from server import crud, curation, points
from server.api.deps import (
    AdminAuth,
    CountFilter,
    IdFilter,
    Limit,
    ObjectId,
    Offset,
    ReadAuth,
    SessionDep,
    TextFilter,
    WriteAuth,
    WriteToken,
)
from server.api.limits import JsonLimitsRoute
from server.api.metrics import note_points_stored
from server.models import TrialSource, TrialStatus
from server.point_schemas import EXTRAS_NOTE, PointsCreate, PointsPublic, PointsStored
from server.schemas import NONFINITE_NOTE, TrialCreate, TrialPublic, TrialsPublic, TrialUpdate

router = APIRouter(prefix="/trials", tags=["trials"], route_class=JsonLimitsRoute)


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` inlined (for a hand-parsed body)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


@router.post(
    "",
    response_model=TrialPublic,
    status_code=201,
    responses={
        200: {"description": "idempotency_key already used here; that trial is returned"},
        404: {"description": "experiment_id names no experiment"},
    },
)
def create_trial(
    trial_in: TrialCreate, session: SessionDep, response: Response, token: WriteToken
) -> TrialPublic:
    """Create a trial, recording the request's token as its ``created_by``. Re-posting an
    ``idempotency_key`` already used in the same experiment returns the stored trial with
    200 instead of creating a second one."""
    trial, created = crud.create_trial(session=session, trial_in=trial_in, token=token)
    if not created:
        response.status_code = 200
    return TrialPublic.model_validate(trial)


@router.get("", response_model=TrialsPublic, dependencies=[ReadAuth])
def list_trials(
    session: SessionDep,
    experiment_id: IdFilter = None,
    status: Annotated[list[TrialStatus] | None, Query()] = None,
    source: TrialSource | None = None,
    n_params_min: CountFilter = None,
    n_params_max: CountFilter = None,
    n_tokens_min: CountFilter = None,
    n_tokens_max: CountFilter = None,
    idempotency_key: TextFilter = None,
    family: TextFilter = None,
    excluded: Annotated[bool | None, Query(description="excluded from the fits or not")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> TrialsPublic:
    """Trials matching all filters (ranges inclusive; ``status`` may repeat), by id."""
    rows, count = crud.list_trials(
        session=session,
        experiment_id=experiment_id,
        status=status,
        source=source,
        n_params_min=n_params_min,
        n_params_max=n_params_max,
        n_tokens_min=n_tokens_min,
        n_tokens_max=n_tokens_max,
        idempotency_key=idempotency_key,
        family=family,
        excluded=excluded,
        limit=limit,
        offset=offset,
    )
    return TrialsPublic(data=[TrialPublic.model_validate(r) for r in rows], count=count)


@router.get("/{trial_id}", response_model=TrialPublic, dependencies=[ReadAuth])
def get_trial(trial_id: ObjectId, session: SessionDep) -> TrialPublic:
    return TrialPublic.model_validate(crud.get_trial(session=session, trial_id=trial_id))


@router.patch("/{trial_id}", response_model=TrialPublic, dependencies=[WriteAuth])
def update_trial(trial_id: ObjectId, trial_in: TrialUpdate, session: SessionDep) -> TrialPublic:
    """Update status and results. Allowed: queued -> anything, running -> running/finished;
    a finished trial (completed/failed/pruned) answers 409 to any other status.
    ``{"excluded": true, "excluded_reason": "..."}`` leaves the trial out of every fit (its
    scope is refitted); ``{"excluded": false}`` brings it back and clears the reason."""
    return TrialPublic.model_validate(
        curation.update_trial(session=session, trial_id=trial_id, trial_in=trial_in)
    )


@router.delete(
    "/{trial_id}",
    response_model=TrialPublic,
    dependencies=[AdminAuth],
    responses={
        401: {"description": "no bearer token, or a bad or revoked one"},
        403: {"description": "the token lacks admin scope"},
        404: {"description": "no trial has this id"},
    },
)
def delete_trial(trial_id: ObjectId, session: SessionDep) -> TrialPublic:
    """Delete the trial and its loss curve, for an admin token only, and answer the deleted
    trial. Its scope is refitted without it; to leave a trial out of the fits but keep it,
    exclude it instead (``PATCH`` with ``excluded``)."""
    trial = curation.delete_trial(session=session, trial_id=trial_id)
    return TrialPublic.model_validate(trial)


@router.post("/{trial_id}/heartbeat", response_model=TrialPublic, dependencies=[WriteAuth])
def heartbeat(trial_id: ObjectId, session: SessionDep) -> TrialPublic:
    """Record that the trial is alive (a queued trial becomes running). Trials silent for
    longer than ``HYPERLAW_HEARTBEAT_GRACE_S`` are failed by the reaper; a heartbeat to a
    finished trial answers 409."""
    return TrialPublic.model_validate(crud.heartbeat(session=session, trial_id=trial_id))


@router.post(
    "/{trial_id}/points",
    response_model=PointsStored,
    dependencies=[WriteAuth],
    description=(
        f"Upsert up to {MAX_POINTS_PER_REQUEST} loss-curve points keyed by step, in one "
        "transaction: a rejected batch stores nothing, re-sending stores nothing new, and a "
        "null value keeps the stored one. " + EXTRAS_NOTE
    ),
    responses={
        409: {"description": "the trial is failed or pruned: it takes no more points"},
        415: {"description": "the body was not sent as Content-Type: application/json"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inline_schema(PointsCreate)}},
        }
    },
)
async def post_points(trial_id: ObjectId, request: Request, session: SessionDep) -> PointsStored:
    """The body must be sent as ``Content-Type: application/json`` (415 otherwise); a
    failed or pruned trial answers 409 (``server.points``)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        shown = f"Content-Type {media_type!r}" if media_type else "no Content-Type"
        raise HTTPException(415, f"points must be sent as application/json (got {shown})")
    # The body is parsed and validated in one pass from bytes (pydantic's JSON parser, into
    # dicts: server.points.parse_points), off the event loop, like the upsert.
    body = await request.body()

    def store() -> int:
        try:
            rows = points.parse_points(body)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None
        return points.upsert_points(session=session, trial_id=trial_id, points=rows)

    count = await run_in_threadpool(store)
    note_points_stored(request, count)
    return PointsStored(trial_id=trial_id, count=count)


@router.get(
    "/{trial_id}/points",
    response_model=PointsPublic,
    dependencies=[ReadAuth],
    description=(
        "Points with step_min <= step <= step_max, by step, each with its extras (the "
        "client's own metrics; null when none). " + NONFINITE_NOTE
    ),
)
def get_points(
    trial_id: ObjectId,
    session: SessionDep,
    step_min: CountFilter = None,
    step_max: CountFilter = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 100_000,
    offset: Offset = 0,
) -> Response:
    rows, count = points.get_points(
        session=session,
        trial_id=trial_id,
        step_min=step_min,
        step_max=step_max,
        limit=limit,
        offset=offset,
    )
    body = PointsPublic.model_validate({"trial_id": trial_id, "data": rows, "count": count})
    return Response(body.model_dump_json(), media_type="application/json")
