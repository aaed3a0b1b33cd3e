"""``/v1/families``: what makes losses comparable, and the state of each family's fit."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from server import families
from server.api.deps import ReadAuth, SessionDep
from server.family_schemas import FamiliesPublic, FamilyPublic

router = APIRouter(prefix="/families", tags=["families"], dependencies=[ReadAuth])


@router.get("", response_model=FamiliesPublic)
def list_families(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> FamiliesPublic:
    """Every family (an experiment's ``family``), by name: its experiments, completed
    trials, (N, D) groups and ranges, fit keys and the newest recommender fit of its
    scope ``family:<name>``."""
    rows = families.list_families(session=session)
    page = [FamilyPublic.model_validate(r) for r in rows[offset : offset + limit]]
    return FamiliesPublic(data=page, count=len(rows))
