"""``/v1/experiments``: named groups of trials, each in a family (``server.families``)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from server import crud, families
from server.api.deps import Limit, ObjectId, Offset, ReadAuth, SessionDep, TextFilter, WriteAuth
from server.api.limits import JsonLimitsRoute
from server.schemas import (
    ExperimentCreate,
    ExperimentPublic,
    ExperimentsPublic,
    ExperimentUpdate,
)

router = APIRouter(prefix="/experiments", tags=["experiments"], route_class=JsonLimitsRoute)


@router.post(
    "",
    response_model=ExperimentPublic,
    status_code=201,
    dependencies=[WriteAuth],
    responses={
        200: {"description": "an experiment with this name exists; it is returned"},
        409: {"description": "it exists in another family than the one given"},
    },
)
def create_experiment(
    experiment_in: ExperimentCreate, session: SessionDep, response: Response
) -> ExperimentPublic:
    """Create an experiment, or return the existing one with the same name (200); a
    ``family`` given explicitly must be the existing one's (409 otherwise)."""
    experiment, created = crud.create_experiment(session=session, experiment_in=experiment_in)
    if not created:
        response.status_code = 200
    return ExperimentPublic.model_validate(experiment)


@router.get("", response_model=ExperimentsPublic, dependencies=[ReadAuth])
def list_experiments(
    session: SessionDep,
    name: TextFilter = None,
    family: TextFilter = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> ExperimentsPublic:
    rows, count = crud.list_experiments(
        session=session, name=name, family=family, limit=limit, offset=offset
    )
    return ExperimentsPublic(data=[ExperimentPublic.model_validate(r) for r in rows], count=count)


@router.get("/{experiment_id}", response_model=ExperimentPublic, dependencies=[ReadAuth])
def get_experiment(experiment_id: ObjectId, session: SessionDep) -> ExperimentPublic:
    return ExperimentPublic.model_validate(
        crud.get_experiment(session=session, experiment_id=experiment_id)
    )


@router.patch("/{experiment_id}", response_model=ExperimentPublic, dependencies=[WriteAuth])
def update_experiment(
    experiment_id: ObjectId, experiment_in: ExperimentUpdate, session: SessionDep
) -> ExperimentPublic:
    """Move the experiment, with all its trials, to another family; the fitting worker then
    refits every family."""
    return ExperimentPublic.model_validate(
        families.move_experiment(
            session=session, experiment_id=experiment_id, family=experiment_in.family
        )
    )
