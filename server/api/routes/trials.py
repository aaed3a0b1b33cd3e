"""``/v1/trials``: trials, their heartbeats and their loss curves."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from server import crud, points
from server.api.deps import ReadAuth, SessionDep, WriteAuth
from server.models import TrialSource, TrialStatus
from server.schemas import (
    MAX_POINTS_PER_REQUEST,
    NONFINITE_NOTE,
    PointsCreate,
    PointsPublic,
    PointsStored,
    TrialCreate,
    TrialPublic,
    TrialsPublic,
    TrialUpdate,
)

router = APIRouter(prefix="/trials", tags=["trials"])


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
    dependencies=[WriteAuth],
    responses={200: {"description": "idempotency_key already used here; that trial is returned"}},
)
def create_trial(trial_in: TrialCreate, session: SessionDep, response: Response) -> TrialPublic:
    """Create a trial. Re-posting an ``idempotency_key`` already used in the same experiment
    returns the stored trial with 200 instead of creating a second one."""
    trial, created = crud.create_trial(session=session, trial_in=trial_in)
    if not created:
        response.status_code = 200
    return TrialPublic.model_validate(trial)


@router.get("", response_model=TrialsPublic, dependencies=[ReadAuth])
def list_trials(
    session: SessionDep,
    experiment_id: int | None = None,
    status: Annotated[list[TrialStatus] | None, Query()] = None,
    source: TrialSource | None = None,
    n_params_min: Annotated[int | None, Query(ge=0)] = None,
    n_params_max: Annotated[int | None, Query(ge=0)] = None,
    n_tokens_min: Annotated[int | None, Query(ge=0)] = None,
    n_tokens_max: Annotated[int | None, Query(ge=0)] = None,
    idempotency_key: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
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
        limit=limit,
        offset=offset,
    )
    return TrialsPublic(data=[TrialPublic.model_validate(r) for r in rows], count=count)


@router.get("/{trial_id}", response_model=TrialPublic, dependencies=[ReadAuth])
def get_trial(trial_id: int, session: SessionDep) -> TrialPublic:
    return TrialPublic.model_validate(crud.get_trial(session=session, trial_id=trial_id))


@router.patch("/{trial_id}", response_model=TrialPublic, dependencies=[WriteAuth])
def update_trial(trial_id: int, trial_in: TrialUpdate, session: SessionDep) -> TrialPublic:
    """Update status and results. Allowed: queued -> anything, running -> running/finished;
    a finished trial (completed/failed/pruned) answers 409 to any other status."""
    return TrialPublic.model_validate(
        crud.update_trial(session=session, trial_id=trial_id, trial_in=trial_in)
    )


@router.post("/{trial_id}/heartbeat", response_model=TrialPublic, dependencies=[WriteAuth])
def heartbeat(trial_id: int, session: SessionDep) -> TrialPublic:
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
        "null value keeps the stored one. " + NONFINITE_NOTE
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inline_schema(PointsCreate)}},
        }
    },
)
async def post_points(trial_id: int, request: Request, session: SessionDep) -> PointsStored:
    # The body is parsed and validated in one pass from bytes (pydantic's JSON parser),
    # which is about twice as fast as json.loads followed by validation.
    try:
        points_in = PointsCreate.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    count = await run_in_threadpool(
        points.upsert_points, session=session, trial_id=trial_id, points=points_in.points
    )
    return PointsStored(trial_id=trial_id, count=count)


@router.get(
    "/{trial_id}/points",
    response_model=PointsPublic,
    dependencies=[ReadAuth],
    description="Points with step_min <= step <= step_max, by step. " + NONFINITE_NOTE,
)
def get_points(
    trial_id: int,
    session: SessionDep,
    step_min: Annotated[int | None, Query(ge=0)] = None,
    step_max: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 100_000,
    offset: Annotated[int, Query(ge=0)] = 0,
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
