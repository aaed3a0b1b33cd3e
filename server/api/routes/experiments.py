"""``/v1/experiments``: named groups of trials."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from server import crud
from server.api.deps import ReadAuth, SessionDep, WriteAuth
from server.schemas import ExperimentCreate, ExperimentPublic, ExperimentsPublic

router = APIRouter(prefix="/experiments", tags=["experiments"])


@router.post(
    "",
    response_model=ExperimentPublic,
    status_code=201,
    dependencies=[WriteAuth],
    responses={200: {"description": "an experiment with this name exists; it is returned"}},
)
def create_experiment(
    experiment_in: ExperimentCreate, session: SessionDep, response: Response
) -> ExperimentPublic:
    """Create an experiment, or return the existing one with the same name (200)."""
    experiment, created = crud.create_experiment(session=session, experiment_in=experiment_in)
    if not created:
        response.status_code = 200
    return ExperimentPublic.model_validate(experiment)


@router.get("", response_model=ExperimentsPublic, dependencies=[ReadAuth])
def list_experiments(
    session: SessionDep,
    name: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> ExperimentsPublic:
    rows, count = crud.list_experiments(session=session, name=name, limit=limit, offset=offset)
    return ExperimentsPublic(data=[ExperimentPublic.model_validate(r) for r in rows], count=count)


@router.get("/{experiment_id}", response_model=ExperimentPublic, dependencies=[ReadAuth])
def get_experiment(experiment_id: int, session: SessionDep) -> ExperimentPublic:
    return ExperimentPublic.model_validate(
        crud.get_experiment(session=session, experiment_id=experiment_id)
    )
