"""Families: which experiments' losses are comparable (same data, tokenizer and model
family), as the API and the command line see them.

- :func:`list_families`: ``GET /v1/families`` and ``hyperlaw families``: per family, its
  experiments, completed trials, (N, D) groups and ranges, fit keys (parametrization and
  schedule, ``server.worker.scopes``) with their group counts, the main one, and the newest
  recommender fit of its scope;
- :func:`move_experiment`: ``PATCH /v1/experiments/{id}`` with ``{"family": ...}``; the
  fitting worker refits every family scope (their watermarks hash which experiment is in
  which family);
- :func:`family_names`: the families that exist, i.e. that hold at least one experiment.

Like ``server.crud``, every function takes a keyword-only ``session`` and leaves commit and
rollback to ``server.core.db.session_scope``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server import crud
from server.models import Experiment, Fit, Trial, TrialStatus
from server.worker.fits import RECOMMENDER_KIND
from server.worker.scopes import family_scope, fit_key, main_fit_key


def family_names(*, session: Session) -> list[str]:
    """Every family that holds an experiment, sorted."""
    return list(session.scalars(select(Experiment.family).distinct().order_by(Experiment.family)))


def move_experiment(*, session: Session, experiment_id: int, family: str) -> Experiment:
    """Put the experiment, with all its trials, in ``family`` (created by naming it);
    ``NotFoundError`` when the experiment does not exist."""
    experiment = crud.get_experiment(session=session, experiment_id=experiment_id)
    experiment.family = family
    session.flush()
    return experiment


def _latest_fit(session: Session, family: str) -> dict[str, Any] | None:
    """id, status, message and created_at of the newest recommender fit of the family."""
    stmt = crud.fits_query(RECOMMENDER_KIND, family_scope(family), None)
    row = session.execute(
        stmt.with_only_columns(Fit.id, Fit.status, Fit.message, Fit.created_at).limit(1)
    ).first()
    return None if row is None else dict(row._mapping)


def list_families(*, session: Session) -> list[dict[str, Any]]:
    """One summary per family (module docstring), sorted by name; the keys are those of
    ``server.family_schemas.FamilyPublic``. Two grouped queries and one per family for its fit."""
    per_family = select(Experiment.family, func.count()).group_by(Experiment.family)
    n_experiments: dict[str, int] = {f: n for f, n in session.execute(per_family)}
    # one row per (family, parametrization, schedule, N, D) group of completed trials
    groups = session.execute(
        select(
            Experiment.family,
            Trial.parametrization,
            Trial.schedule,
            Trial.n_params,
            Trial.n_tokens,
            func.count(),
        )
        .join(Experiment, Experiment.id == Trial.experiment_id)
        .where(Trial.status == TrialStatus.COMPLETED.value)
        .group_by(
            Experiment.family,
            Trial.parametrization,
            Trial.schedule,
            Trial.n_params,
            Trial.n_tokens,
        )
    )
    keys: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in n_experiments}
    cells: dict[str, list[tuple[str, int, int, int]]] = {name: [] for name in n_experiments}
    for family, parametrization, schedule, n_params, n_tokens, count in groups:
        key = fit_key(family, parametrization, schedule)
        entry = keys[family].setdefault(
            key,
            {
                "fit_key": key,
                "parametrization": parametrization,
                "schedule": schedule,
                "n_trials": 0,
                "n_groups": 0,
            },
        )
        entry["n_trials"] += count
        entry["n_groups"] += 1
        cells[family].append((key, n_params, n_tokens, count))
    out = []
    for name in sorted(n_experiments):
        rows = cells[name]
        sizes = [n for _k, n, _d, _c in rows]
        budgets = [d for _k, _n, d, _c in rows]
        main = main_fit_key((k, n, d) for k, n, d, c in rows for _ in range(c))
        out.append(
            {
                "name": name,
                "scope": family_scope(name),
                "n_experiments": n_experiments[name],
                "n_trials": sum(c for *_rest, c in rows),
                "n_groups": len({(n, d) for _k, n, d, _c in rows}),
                "n_params": [min(sizes), max(sizes)] if rows else None,
                "n_tokens": [min(budgets), max(budgets)] if rows else None,
                "main_fit_key": main,
                "fit_keys": sorted(keys[name].values(), key=lambda e: e["fit_key"]),
                "fit": _latest_fit(session, name),
            }
        )
    return out
