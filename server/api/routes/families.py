"""``/v1/families``: what makes losses comparable, and the state of each family's fit."""

from __future__ import annotations

from fastapi import APIRouter

from server import families
from server.api.deps import Limit, Offset, ReadAuth, SessionDep
from server.family_schemas import FamiliesPublic, FamilyPublic

router = APIRouter(prefix="/families", tags=["families"], dependencies=[ReadAuth])


@router.get("", response_model=FamiliesPublic)
def list_families(
    session: SessionDep,
    limit: Limit = 100,
    offset: Offset = 0,
) -> FamiliesPublic:
    """Every family (an experiment's ``family``), by name: its experiments, completed
    trials, (N, D) groups and ranges, fit keys and the newest recommender fit of its
    scope ``family:<name>``."""
    rows = families.list_families(session=session)
    page = [FamilyPublic.model_validate(r) for r in rows[offset : offset + limit]]
    return FamiliesPublic(data=page, count=len(rows))
