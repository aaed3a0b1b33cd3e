"""``/v1/fits``: the history of every fit the worker stored (read only)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter

from server import crud
from server.api.deps import Limit, ObjectId, Offset, ReadAuth, SessionDep, TextFilter
from server.schemas import FitPublic, FitsPublic

router = APIRouter(prefix="/fits", tags=["fits"], dependencies=[ReadAuth])

FitStatusParam = Literal["ok", "insufficient_data", "failed"]


@router.get("", response_model=FitsPublic)
def list_fits(
    session: SessionDep,
    kind: TextFilter = None,
    scope: TextFilter = None,
    status: FitStatusParam | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> FitsPublic:
    """Fits, newest first."""
    rows, count = crud.list_fits(
        session=session, kind=kind, scope=scope, status=status, limit=limit, offset=offset
    )
    return FitsPublic(data=[FitPublic.model_validate(r) for r in rows], count=count)


@router.get("/latest", response_model=FitPublic, responses={404: {"description": "no fit matches"}})
def latest_fit(
    session: SessionDep,
    kind: TextFilter = None,
    scope: TextFilter = None,
    status: FitStatusParam | None = None,
) -> FitPublic:
    """The newest fit matching the filters (404 when there is none)."""
    return FitPublic.model_validate(
        crud.latest_fit(session=session, kind=kind, scope=scope, status=status)
    )


@router.get("/{fit_id}", response_model=FitPublic)
def get_fit(fit_id: ObjectId, session: SessionDep) -> FitPublic:
    return FitPublic.model_validate(crud.get_fit(session=session, fit_id=fit_id))
