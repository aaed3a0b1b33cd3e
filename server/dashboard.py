"""What the web dashboard (``server/static``) and ``hyperlaw plot`` draw, as JSON: built
here from the trial store and the stored fits, served by ``server.api.routes.dashboard``.

- :func:`overview`: families, experiments with their trials' status counts and the progress
  of their running trials (steps reported against steps planned), and the fit history
  (kind, scope, status, reason, seconds, watermark; without the fits' large params);
- :func:`groups`: a family's (N, D) groups with their run counts and best completed run;
- :func:`group`: one group's runs (η, B, final loss, status), its best run, the ``bell``
  fit's η* per batch size and bell curve, and the ``cbs`` fit's steps to target with the
  fitted S(B) and CBS;
- :func:`laws`: η*, B* and the CBS against D for a few model sizes, with their 90 %
  intervals, from the recommender that serves ``/v1/recommendations``; the groups' own
  optima (best run, bell B_opt, measured CBS) beside them; and the published Step Law formula
  (:func:`fitting.near_optimal.published_step_law`) on the same grid.

A family's runs are those of its experiments (``experiments.family``); losses are compared
only within one. Like ``server.crud``, the functions take a keyword-only ``session`` and
leave commit and rollback to the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fitting.near_optimal import published_step_law
from fitting.results import ParameterError
from server import crud
from server.core.errors import HyperlawError, NotFoundError
from server.families import family_names
from server.models import Experiment, Fit, Point, Trial, TrialStatus
from server.worker.fits import BELL_KIND, CBS_KIND
from server.worker.scopes import family_scope

FITS_SHOWN = 200  # the newest fits the overview lists
LAW_SIZES = 4  # model sizes drawn on the laws' plots (spread over the family's N in log)
LAW_GRID = 25  # budgets per law line
Recommend = Callable[[float, float], dict[str, Any]]


def require_family(*, session: Session, family: str) -> None:
    """``NotFoundError`` naming the known families when ``family`` holds no experiment."""
    known = family_names(session=session)
    if family not in known:
        raise NotFoundError(
            f"family {family!r} has no experiment; known families: {', '.join(known) or 'none'}"
        )


def _status_counts(session: Session, *group_by: Any) -> dict[Any, dict[str, int]]:
    rows = session.execute(
        select(*group_by, Trial.status, func.count())
        .join(Experiment, Experiment.id == Trial.experiment_id)
        .group_by(*group_by, Trial.status)
    )
    out: dict[Any, dict[str, int]] = {}
    for *key, status, count in rows:
        counts = out.setdefault(key[0] if len(key) == 1 else tuple(key), {})
        counts[status] = int(count)
    return out


def _running_progress(session: Session) -> dict[int, list[dict[str, Any]]]:
    """Per experiment, each running trial's last reported step against its planned steps
    (budget / batch size)."""
    last = (
        select(Point.trial_id, func.max(Point.step).label("step"))
        .join(Trial, Trial.id == Point.trial_id)
        .where(Trial.status == TrialStatus.RUNNING.value)
        .group_by(Point.trial_id)
        .subquery()
    )
    rows = session.execute(
        select(Trial.id, Trial.experiment_id, Trial.n_tokens, Trial.batch_size_tokens, last.c.step)
        .outerjoin(last, last.c.trial_id == Trial.id)
        .where(Trial.status == TrialStatus.RUNNING.value)
        .order_by(Trial.id)
    )
    out: dict[int, list[dict[str, Any]]] = {}
    for trial_id, experiment_id, n_tokens, batch, step in rows:
        planned = max(1, int(n_tokens) // max(1, int(batch)))
        out.setdefault(experiment_id, []).append(
            {
                "trial_id": trial_id,
                "step": step,
                "steps_planned": planned,
                "fraction": None if step is None else min(1.0, (step + 1) / planned),
            }
        )
    return out


def overview(*, session: Session, default_family: str) -> dict[str, Any]:
    """The dashboard's first page (module docstring)."""
    by_family = _status_counts(session, Experiment.family)
    by_experiment = _status_counts(session, Trial.experiment_id)
    running = _running_progress(session)
    experiments = []
    for exp in session.scalars(select(Experiment).order_by(Experiment.id)):
        counts = by_experiment.get(exp.id, {})
        experiments.append(
            {
                "id": exp.id,
                "name": exp.name,
                "family": exp.family,
                "created_at": exp.created_at.isoformat(),
                "n_trials": sum(counts.values()),
                "status_counts": counts,
                "running": running.get(exp.id, []),
            }
        )
    families = [
        {
            "name": name,
            "n_experiments": sum(e["family"] == name for e in experiments),
            "n_trials": sum(by_family.get(name, {}).values()),
            "status_counts": by_family.get(name, {}),
        }
        for name in family_names(session=session)
    ]
    columns = (Fit.id, Fit.kind, Fit.scope, Fit.status, Fit.message, Fit.n_trials)
    fit_rows = session.execute(
        crud.fits_query(None, None, None)
        .with_only_columns(*columns, Fit.quality, Fit.data_watermark, Fit.created_at)
        .limit(FITS_SHOWN)
    )
    fits = [
        {
            "id": fit_id,
            "kind": kind,
            "scope": scope,
            "status": status,
            "message": message,
            "n_trials": n_trials,
            "seconds": (quality or {}).get("seconds"),
            "data_watermark": watermark,
            "created_at": created_at.isoformat(),
        }
        for fit_id, kind, scope, status, message, n_trials, quality, watermark, created_at in (
            fit_rows
        )
    ]
    return {
        "default_family": default_family,
        "families": families,
        "experiments": experiments,
        "fits": fits,
        "n_fits": session.scalar(select(func.count()).select_from(Fit)) or 0,
    }


def _family_trials(session: Session, family: str, *where: Any) -> list[Trial]:
    stmt = (
        select(Trial)
        .join(Experiment, Experiment.id == Trial.experiment_id)
        .where(Experiment.family == family, *where)
        .order_by(Trial.id)
    )
    return list(session.scalars(stmt))


def _run(t: Trial) -> dict[str, Any]:
    return {
        "trial_id": t.id,
        "experiment_id": t.experiment_id,
        "learning_rate": t.learning_rate,
        "batch_size_tokens": t.batch_size_tokens,
        "final_loss": _number(t.final_loss),
        "status": t.status,
        "stop_reason": t.stop_reason,
        "tokens_done": t.tokens_done,
    }


def _number(value: Any) -> float | None:
    """A finite float, else None (JSON null: a diverged run's loss is drawn as missing)."""
    if value is None:
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _best(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    done = [r for r in runs if r["status"] == "completed" and r["final_loss"] is not None]
    return min(done, key=lambda r: r["final_loss"]) if done else None


def groups(*, session: Session, family: str) -> dict[str, Any]:
    """The family's (N, D) groups, by N then D (module docstring)."""
    require_family(session=session, family=family)
    cells: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for t in _family_trials(session, family):
        cells.setdefault((t.n_params, t.n_tokens), []).append(_run(t))
    out = []
    for (n_params, n_tokens), runs in sorted(cells.items()):
        counts: dict[str, int] = {}
        for r in runs:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        out.append(
            {
                "n_params": n_params,
                "n_tokens": n_tokens,
                "n_runs": len(runs),
                "status_counts": counts,
                "best": _best(runs),
            }
        )
    return {"family": family, "groups": out}


def _fit_group(session: Session, kind: str, family: str, n_params: float, n_tokens: float):
    """The newest ok fit of ``kind`` for the family and its entry for the (N, D) group."""
    fit = crud.latest_ok_fit(session=session, kind=kind, scope=family_scope(family))
    return fit, _group_entry(fit, {"n_params": n_params, "n_tokens": n_tokens})


def _same(a: Any, b: float) -> bool:
    try:
        return math.isclose(float(a), b, rel_tol=1e-9)
    except (TypeError, ValueError):
        return False


def group(
    *,
    session: Session,
    family: str,
    n_params: int,
    n_tokens: int,
    recommend: Recommend,
) -> dict[str, Any]:
    """One (N, D) group of the family (module docstring); ``recommend(N, D)`` gives the
    served recommendation (its error's text is returned in its place)."""
    require_family(session=session, family=family)
    trials = _family_trials(session, family, Trial.n_params == n_params, Trial.n_tokens == n_tokens)
    if not trials:
        raise NotFoundError(
            f"family {family!r} has no run at n_params={n_params}, n_tokens={n_tokens}"
        )
    runs = [_run(t) for t in trials]
    recommendation, error = None, None
    try:
        recommendation = recommend(float(n_params), float(n_tokens))
    except (ParameterError, HyperlawError) as exc:  # no fit yet (503) is shown, not raised
        error = _reason(exc)
    bell_fit, bell = _fit_group(session, BELL_KIND, family, n_params, n_tokens)
    cbs_fit, cbs = _fit_group(session, CBS_KIND, family, n_params, n_tokens)
    return {
        "family": family,
        "n_params": n_params,
        "n_tokens": n_tokens,
        "runs": runs,
        "best": _best(runs),
        "recommendation": recommendation,
        "recommendation_error": error,
        "bell": bell,
        "bell_fit_id": None if bell_fit is None else bell_fit.id,
        "cbs": cbs,
        "cbs_fit_id": None if cbs_fit is None else cbs_fit.id,
    }


def _reason(exc: Exception) -> str:
    return exc.message if isinstance(exc, HyperlawError) else str(exc)


def _sizes_to_draw(sizes: list[int]) -> list[int]:
    """At most :data:`LAW_SIZES` of the family's model sizes, spread evenly in log N."""
    sizes = sorted(set(sizes))
    if len(sizes) <= LAW_SIZES:
        return sizes
    picks = np.linspace(0, len(sizes) - 1, LAW_SIZES).round().astype(int)
    return [sizes[i] for i in sorted(set(picks.tolist()))]


_LAW_KEYS = ("learning_rate", "batch_size_tokens", "critical_batch_size_tokens")


def laws(
    *, session: Session, family: str, recommend: Recommend, n_params: list[int] | None
) -> dict[str, Any]:
    """The laws against D (module docstring): per drawn model size, a grid of budgets from
    half the family's smallest to four times its largest, each with the served value of
    η*, B* and the CBS and their intervals (null where the fit cannot answer)."""
    found = groups(session=session, family=family)["groups"]
    if not found:
        return {"family": family, "lines": [], "groups": [], "step_law": [], "error": None}
    budgets = [g["n_tokens"] for g in found]
    grid = np.geomspace(min(budgets) / 2, max(budgets) * 4, LAW_GRID).tolist()
    sizes = n_params or _sizes_to_draw([g["n_params"] for g in found])
    lines, step_law, error = [], [], None
    for n in sizes:
        line: dict[str, Any] = {"n_params": n, "n_tokens": grid}
        for key in _LAW_KEYS:
            line[key], line[key + "_low"], line[key + "_high"] = [], [], []
        for d in grid:
            body = None
            try:
                body = recommend(float(n), d)
            except (ParameterError, HyperlawError) as exc:  # a point left out, not the page
                error = _reason(exc)
            for key in _LAW_KEYS:
                interval = (body or {}).get(key + "_interval") or {}
                line[key].append(_number((body or {}).get(key)))
                line[key + "_low"].append(_number(interval.get("low")))
                line[key + "_high"].append(_number(interval.get("high")))
        lines.append(line)
        eta, batch = published_step_law(float(n), np.asarray(grid))
        step_law.append(
            {
                "n_params": n,
                "n_tokens": grid,
                "learning_rate": eta.tolist(),
                "batch_size_tokens": batch.tolist(),
            }
        )
    bell_fit = crud.latest_ok_fit(session=session, kind=BELL_KIND, scope=family_scope(family))
    cbs_fit = crud.latest_ok_fit(session=session, kind=CBS_KIND, scope=family_scope(family))
    optima = []
    for g in found:
        best = g["best"] or {}
        bell = _group_entry(bell_fit, g)
        cbs = _group_entry(cbs_fit, g)
        optima.append(
            {
                "n_params": g["n_params"],
                "n_tokens": g["n_tokens"],
                "best_learning_rate": best.get("learning_rate"),
                "best_batch_size_tokens": best.get("batch_size_tokens"),
                "bell_batch_size_opt": _number(
                    ((bell or {}).get("batch_size_opt") or {}).get("x_opt")
                ),
                "measured_cbs": _number(((cbs or {}).get("fit") or {}).get("critical_batch_size")),
            }
        )
    return {
        "family": family,
        "lines": lines,
        "groups": optima,
        "step_law": step_law,
        "error": error,
    }


def _group_entry(fit: Fit | None, g: dict[str, Any]) -> dict[str, Any] | None:
    for entry in ((fit.params or {}).get("groups") or []) if fit is not None else []:
        if _same(entry.get("n_params"), g["n_params"]) and _same(
            entry.get("n_tokens"), g["n_tokens"]
        ):
            return entry
    return None
