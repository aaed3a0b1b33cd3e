"""Response bodies of ``/v1/families`` and ``hyperlaw families``: what each family holds and
the state of its fit (``server.families`` computes them). They follow ``server.schemas``'s
naming and its ``OutModel``.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field

from server.models import Parametrization
from server.schemas import OutModel


class FitKeyPublic(OutModel):
    """The completed trials of a family under one fit key: parametrization and schedule."""

    fit_key: str = Field(description="<family>[/mup][/<schedule>] (server.worker.scopes)")
    parametrization: Parametrization
    schedule: str | None
    n_trials: int = Field(description="completed trials")
    n_groups: int = Field(description="(N, D) groups of those trials")


class FamilyFitPublic(OutModel):
    """The newest recommender fit of the family's scope, whatever its status."""

    id: int
    status: Literal["ok", "insufficient_data", "failed"]
    message: str | None = Field(description="why, when the status is not ok")
    created_at: dt.datetime


class FamilyPublic(OutModel):
    """One family: its experiments and completed trials, and the state of its fit."""

    name: str
    scope: str = Field(description="the fits' scope: family:<name>")
    n_experiments: int
    n_trials: int = Field(description="completed trials")
    n_groups: int = Field(description="(N, D) groups of the completed trials")
    n_params: list[int] | None = Field(
        description="[min, max] non-embedding parameters of the completed trials; null without any"
    )
    n_tokens: list[int] | None = Field(description="[min, max] token budgets D, likewise")
    main_fit_key: str | None = Field(
        description="the fit key the family's fits serve: the one with the most (N, D) groups"
    )
    fit_keys: list[FitKeyPublic]
    fit: FamilyFitPublic | None = Field(
        description="the newest recommender fit of the family; null before the first"
    )


class FamiliesPublic(OutModel):
    data: list[FamilyPublic]
    count: int
