"""The fitting worker: refits the recommender and the estimators whenever new trial results
land.

Scopes. Every completed trial belongs to two scopes: ``global`` (all completed trials) and
``experiment:<id>`` (its experiment). One fit of each kind is kept per scope and data state.

Kinds (``fits.kind``):

- ``recommender`` (:mod:`fitting.recommender`): the fitted state that serves
  ``/v1/recommendations``; params is ``Recommender.to_dict()``, intervals those of its answer
  at the centre of the fitted (N, D) range.
- ``near_optimal`` (Step Law regression, :mod:`fitting.near_optimal`), ``bell`` (η*(B) bell
  curve and its power laws, :mod:`fitting.bell`) and ``cbs`` (Zhang et al.'s steps-to-target
  critical batch size and its power laws, :mod:`fitting.cbs`; steps to target come from
  imported records or from the loss curves of trained trials): see
  :mod:`server.worker_estimators` for what each stores and for the target-loss rule.

Every fit row holds its status (ok, or insufficient_data / failed with the estimator's
reason), params, intervals, quality (with the seconds it took), the ids of the trials it
used and the data watermark it was fitted at. A pass stores the recommender fits of every
stale scope first (global first), then the estimators' fits, so slow estimators never delay
a servable recommender; an estimator that raises is stored as ``failed`` with the error and
the others go on.

Data watermark. For a scope, ``w = "v<state version>:n=<count>:id=<max id>:t=<max
updated_at>"`` over its completed trials. A (kind, scope) needs a refit exactly when no fit
row of (kind, scope, w) exists; the table's UNIQUE (kind, scope, data_watermark) means a fit
of a kind for a given state of the data is stored at most once, whatever its status (so a
refit that failed is not retried until the data changes). Loss curves do not enter the
watermark: the trainer sends a trial's points before it marks the trial completed.

Locks. On PostgreSQL the fit of a (kind, scope) runs inside a transaction holding
``pg_try_advisory_xact_lock(k)``, k = a 64-bit hash of (kind, scope); a worker that cannot
take it skips that fit (another worker is doing it) and, after taking it, checks again that
no fit for the watermark was stored meanwhile. The lock belongs to the transaction, so a
killed worker's lock vanishes with its connection. On SQLite (one machine, usually one
worker) the fit runs outside any transaction and the UNIQUE constraint alone settles races.

Serving. A fit whose status is not ok is stored with its reason and never replaces the last
ok fit: readers always ask for the newest fit of the kind *with status ok*
(``latest_ok_fit``).

Waking up. On PostgreSQL the worker LISTENs on ``hyperlaw_trials`` (``server.crud`` sends a
NOTIFY when a trial completes or is imported) from before its first pass, and also re-checks
every ``LISTEN_FALLBACK_POLLS`` poll periods; on SQLite it polls every ``worker_poll_s``. A
burst of notifications (an import of thousands of trials) is absorbed by waiting
``DEBOUNCE_S`` of quiet before fitting.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import select
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, or_, select as sql_select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.core.config import Settings
from server.core.db import is_sqlite, make_engine, make_session_factory, session_scope
from server.crud import TRIALS_CHANNEL
from server.models import Fit, Point, Trial, TrialSource, TrialStatus
from server.worker_estimators import (
    ESTIMATORS,
    Curve,
    Curves,
    Estimator,
    FitRecord,
    build_curves,
    checked_json,
)

log = logging.getLogger(__name__)

RECOMMENDER_KIND = "recommender"
#: Every kind the worker fits, in the order of a pass (the recommender first).
FIT_KINDS = (RECOMMENDER_KIND, *ESTIMATORS)
GLOBAL_SCOPE = "global"
DEBOUNCE_S = 0.5
LISTEN_FALLBACK_POLLS = 15


def experiment_scope(experiment_id: int) -> str:
    return f"experiment:{experiment_id}"


def scope_experiment_id(scope: str) -> int | None:
    """``experiment:<id>`` -> id; ``global`` -> None."""
    if scope == GLOBAL_SCOPE:
        return None
    prefix, _, ident = scope.partition(":")
    if prefix != "experiment" or not ident.isdigit():
        raise ValueError(f"scope must be 'global' or 'experiment:<id>', got {scope!r}")
    return int(ident)


def advisory_key(kind: str, scope: str) -> int:
    """A signed 64-bit key for ``pg_try_advisory_xact_lock``: blake2b-8 of 'kind|scope'."""
    digest = hashlib.blake2b(f"hyperlaw-fit|{kind}|{scope}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _state_version() -> int:
    from fitting.recommender import STATE_VERSION

    return STATE_VERSION


def watermark(count: int, max_id: int | None, max_updated: dt.datetime | None) -> str:
    """``v<state version>:n=<count>:id=<max id>:t=<max updated_at, ISO UTC>``."""
    stamp = "-" if max_updated is None else max_updated.astimezone(dt.timezone.utc).isoformat()
    return f"v{_state_version()}:n={count}:id={max_id or 0}:t={stamp}"


# --- reading the trial store ---------------------------------------------------------------

def scope_watermarks(session: Session) -> dict[str, str]:
    """The current watermark of every scope that has completed trials (one query)."""
    rows = session.execute(
        sql_select(Trial.experiment_id, func.count(), func.max(Trial.id),
                   func.max(Trial.updated_at))
        .where(Trial.status == TrialStatus.COMPLETED.value)
        .group_by(Trial.experiment_id)
    ).all()
    out: dict[str, str] = {}
    total, top_id, top_t = 0, None, None
    for experiment_id, count, max_id, max_t in rows:
        out[experiment_scope(experiment_id)] = watermark(count, max_id, max_t)
        total += count
        top_id = max_id if top_id is None else max(top_id, max_id)
        top_t = max_t if top_t is None else max(top_t, max_t)
    if rows:
        out[GLOBAL_SCOPE] = watermark(total, top_id, top_t)
    return out


def trial_loss(trial: Trial) -> float | None:
    """The loss a run is ranked by: ``final_eval_loss`` if recorded, else ``final_loss``;
    ``inf`` when the run diverged; None when a completed run recorded neither."""
    if trial.diverged:
        return math.inf
    for value in (trial.final_eval_loss, trial.final_loss):
        if value is not None:
            return float(value)
    return None


def load_scope(session: Session, scope: str) -> tuple[list[Trial], str]:
    """The completed trials of ``scope`` and the watermark computed from exactly those rows."""
    stmt = sql_select(Trial).where(Trial.status == TrialStatus.COMPLETED.value)
    experiment_id = scope_experiment_id(scope)
    if experiment_id is not None:
        stmt = stmt.where(Trial.experiment_id == experiment_id)
    trials = list(session.scalars(stmt.order_by(Trial.id)))
    mark = watermark(
        len(trials),
        max((t.id for t in trials), default=None),
        max((t.updated_at for t in trials), default=None),
    )
    return trials, mark


def trials_to_runs(trials: Iterable[Trial]):
    """Trials -> ``fitting.data.Runs`` (trials without any loss are left out).

    ``steps_to_target`` and ``target_loss`` are taken from a trial's ``config`` when an
    import stored them there.
    """
    from fitting.data import Runs

    records = []
    for t in trials:
        loss = trial_loss(t)
        if loss is None:
            continue
        rec: dict[str, Any] = {
            "n_params": t.n_params, "n_tokens": t.n_tokens, "seq_len": t.seq_len,
            "learning_rate": t.learning_rate, "batch_size_tokens": t.batch_size_tokens,
            "loss": loss, "trial_id": t.id,
        }
        config = t.config or {}
        if config.get("steps_to_target") is not None and config.get("target_loss") is not None:
            rec["steps_to_target"] = config["steps_to_target"]
            rec["target_loss"] = config["target_loss"]
        records.append(rec)
    return Runs.from_records(records)


def load_curves(session: Session, scope: str, trials: Iterable[Trial]) -> dict[int, Curve]:
    """The evaluated loss curves of the scope's completed trained trials (one query, only
    the columns a curve needs; none when the scope has no trained trial)."""
    schedules = {t.id: t.schedule for t in trials if t.source == TrialSource.TRAINED.value}
    if not schedules:
        return {}
    stmt = (
        sql_select(Point.trial_id, Point.step, Point.eval_loss, Point.ewa_eval_loss)
        .join(Trial, Trial.id == Point.trial_id)
        .where(Trial.status == TrialStatus.COMPLETED.value,
               Trial.source == TrialSource.TRAINED.value,
               or_(Point.eval_loss.is_not(None), Point.ewa_eval_loss.is_not(None)))
        .order_by(Point.trial_id, Point.step)
    )
    experiment_id = scope_experiment_id(scope)
    if experiment_id is not None:
        stmt = stmt.where(Trial.experiment_id == experiment_id)
    rows = (r for r in session.execute(stmt) if r.trial_id in schedules)
    return build_curves(rows, schedules)


def latest_ok_fit(session: Session, scope: str = GLOBAL_SCOPE,
                  kind: str = RECOMMENDER_KIND) -> Fit | None:
    """The newest fit with status ok for (kind, scope): the one that serves."""
    return session.scalars(
        sql_select(Fit).where(Fit.kind == kind, Fit.scope == scope, Fit.status == "ok")
        .order_by(Fit.id.desc()).limit(1)
    ).first()


def latest_ok_fit_id(session: Session, scope: str = GLOBAL_SCOPE,
                     kind: str = RECOMMENDER_KIND) -> int | None:
    return session.scalar(
        sql_select(func.max(Fit.id)).where(Fit.kind == kind, Fit.scope == scope,
                                           Fit.status == "ok")
    )


# --- fitting -------------------------------------------------------------------------------

Fitter = Callable[..., Any]


def default_fitter(runs, **options):
    from fitting.recommender import fit_recommender

    return fit_recommender(runs, **options)


@dataclass(frozen=True)
class FitOutcome:
    """What ``refit_scope`` did for (``kind``, ``scope``): ``action`` is fitted / up_to_date /
    locked / raced."""

    scope: str
    action: str
    fit_id: int | None = None
    status: str | None = None
    message: str | None = None
    kind: str = RECOMMENDER_KIND


def _reference_point(fitted_range: dict) -> tuple[float, float] | None:
    """Geometric centre of the fitted (N, D) range, where the stored intervals are shown."""
    try:
        (n_lo, n_hi), (d_lo, d_hi) = fitted_range["n_params"], fitted_range["n_tokens"]
    except (KeyError, ValueError, TypeError):
        return None
    return math.sqrt(n_lo * n_hi), math.sqrt(d_lo * d_hi)


def _recommender_record(trials: list[Trial], fitter: Fitter,
                        options: dict[str, Any]) -> FitRecord:
    """Fit the recommender; it is stored with every trial of the scope."""
    from fitting.results import FitStatus

    runs = trials_to_runs(trials)
    rec = fitter(runs, **options)
    state = rec.to_dict()
    intervals = None
    if rec.status is FitStatus.OK:
        ref = _reference_point(rec.fitted_range)
        if ref is not None:
            answer = rec.recommend(*ref).as_dict()
            intervals = {"at": {"n_params": ref[0], "n_tokens": ref[1]}}
            intervals.update({k: v for k, v in answer.items() if k.endswith("_interval")})
    quality = dict(state.get("quality") or {})
    quality.update(n_runs=rec.n_runs, n_groups=state.get("n_groups"))
    return FitRecord(status=rec.status.value, message=rec.reason or None, params=state,
                     intervals=intervals, quality=quality, trial_ids=[t.id for t in trials])


Compute = Callable[[list[Trial], Curves | None], FitRecord]


def _build_fit(kind: str, scope: str, mark: str, trials: list[Trial],
               curves: Curves | None, compute: Compute) -> Fit:
    """Run one fit and describe it as a Fit row (not yet added to a session). Any error,
    in the fit or in making its result storable, gives a ``failed`` row with the error."""
    base = dict(kind=kind, scope=scope, experiment_id=scope_experiment_id(scope),
                data_watermark=mark)
    started = time.perf_counter()
    try:
        record = compute(trials, curves)
        params = checked_json("params", record.params)
        intervals = checked_json("intervals", record.intervals)
        quality = checked_json("quality", record.quality)
        trial_ids = [int(i) for i in record.trial_ids]
    except Exception as exc:  # a failed refit is data: stored with its reason
        log.exception("%s fit of %s failed", kind, scope)
        trial_ids = [t.id for t in trials]
        return Fit(status="failed", message=f"fit raised {type(exc).__name__}: {exc}",
                   params=None, intervals=None,
                   quality={"seconds": round(time.perf_counter() - started, 3)},
                   trial_ids=trial_ids, n_trials=len(trial_ids), **base)
    quality = {**(quality or {}), "seconds": round(time.perf_counter() - started, 3)}
    return Fit(status=record.status, message=record.message or None, params=params,
               intervals=intervals, quality=quality, trial_ids=trial_ids,
               n_trials=len(trial_ids), **base)


def _compute_for(kind: str, fitter: Fitter, options: dict[str, Any],
                 estimators: Mapping[str, Estimator]) -> tuple[Compute, bool]:
    """The function that fits ``kind`` and whether it needs the scope's loss curves."""
    if kind == RECOMMENDER_KIND:
        return (lambda trials, _curves: _recommender_record(trials, fitter, options)), False
    if kind not in estimators:
        raise ValueError(f"kind must be one of {', '.join((RECOMMENDER_KIND, *estimators))}, "
                         f"got {kind!r}")
    estimator = estimators[kind]
    return estimator.fit, estimator.needs_curves


def refit_scope(engine: Engine, scope: str, *, kind: str = RECOMMENDER_KIND,
                fitter: Fitter = default_fitter, options: dict[str, Any] | None = None,
                estimators: Mapping[str, Estimator] = ESTIMATORS) -> FitOutcome:
    """Fit ``kind`` for ``scope`` unless a fit for its current watermark exists (module
    docstring). ``fitter``/``options`` fit the recommender; ``estimators`` maps the other
    kinds to their :class:`~server.worker_estimators.Estimator`."""
    compute, needs_curves = _compute_for(kind, fitter, dict(options or {}), estimators)
    factory = make_session_factory(engine)
    if is_sqlite(str(engine.url)):
        with session_scope(factory) as session:
            trials, mark = load_scope(session, scope)
            if _fit_exists(session, kind, scope, mark):
                return FitOutcome(scope, "up_to_date", kind=kind)
            curves = load_curves(session, scope, trials) if needs_curves else None
        fit = _build_fit(kind, scope, mark, trials, curves, compute)
        try:
            with session_scope(factory) as session:
                session.add(fit)
                session.flush()
        except IntegrityError:
            return FitOutcome(scope, "raced", kind=kind)
        return _stored(fit)
    try:
        with session_scope(factory) as session:
            got = session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"),
                                 {"k": advisory_key(kind, scope)})
            if not got:
                return FitOutcome(scope, "locked", kind=kind)
            trials, mark = load_scope(session, scope)
            if _fit_exists(session, kind, scope, mark):
                return FitOutcome(scope, "up_to_date", kind=kind)
            curves = load_curves(session, scope, trials) if needs_curves else None
            fit = _build_fit(kind, scope, mark, trials, curves, compute)
            session.add(fit)
            session.flush()
    except IntegrityError:  # only without the lock's protection, e.g. an older worker
        return FitOutcome(scope, "raced", kind=kind)
    return _stored(fit)


def _fit_exists(session: Session, kind: str, scope: str, mark: str) -> bool:
    return session.scalar(
        sql_select(Fit.id).where(Fit.kind == kind, Fit.scope == scope,
                                 Fit.data_watermark == mark)
    ) is not None


def _stored(fit: Fit) -> FitOutcome:
    log.info("stored %s fit %d of %s: %s on %d trials in %.2f s%s", fit.kind, fit.id,
             fit.scope, fit.status, fit.n_trials, (fit.quality or {}).get("seconds", 0.0),
             f" ({fit.message})" if fit.message else "")
    return FitOutcome(fit.scope, "fitted", fit.id, fit.status, fit.message, kind=fit.kind)


def stale_fits(engine: Engine, kinds: Iterable[str] = FIT_KINDS) -> list[tuple[str, str]]:
    """(kind, scope) pairs whose current watermark has no fit yet, in the order of a pass:
    by kind as given (the recommender first), global first within a kind."""
    kinds = list(kinds)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        marks = scope_watermarks(session)
        if not marks:
            return []
        have = set(session.execute(
            sql_select(Fit.kind, Fit.scope, Fit.data_watermark)
            .where(Fit.kind.in_(kinds), Fit.data_watermark.in_(set(marks.values())))
        ).all())
    scopes = sorted(marks, key=lambda s: (s != GLOBAL_SCOPE, s))
    return [(k, s) for k in kinds for s in scopes if (k, s, marks[s]) not in have]


def stale_scopes(engine: Engine, kind: str = RECOMMENDER_KIND) -> list[str]:
    """Scopes whose current watermark has no fit of ``kind`` yet (global first)."""
    return [scope for _kind, scope in stale_fits(engine, [kind])]


def refit_once(engine: Engine, *, fitter: Fitter = default_fitter,
               options: dict[str, Any] | None = None, kinds: Iterable[str] | None = None,
               estimators: Mapping[str, Estimator] = ESTIMATORS,
               should_stop: Callable[[], bool] | None = None) -> list[FitOutcome]:
    """One pass: fit every (kind, scope) whose data changed since its last fit, the
    recommender of every scope before any estimator. ``kinds`` (default: the recommender
    and every kind of ``estimators``) limits the pass to those kinds; ``should_stop`` is
    asked before each fit and ends the pass early when it returns True."""
    kinds = [RECOMMENDER_KIND, *estimators] if kinds is None else list(kinds)
    order = sorted(kinds, key=lambda k: k != RECOMMENDER_KIND)  # stable: the rest as given
    outcomes = []
    for kind, scope in stale_fits(engine, order):
        if should_stop is not None and should_stop():
            break
        outcomes.append(refit_scope(engine, scope, kind=kind, fitter=fitter, options=options,
                                    estimators=estimators))
    return outcomes


# --- the loop ------------------------------------------------------------------------------

class FittingWorker:
    """Refits on new data until ``stop()``; run it with ``run()`` (blocking) or in a thread.

    Thread-safety: ``stop()`` may be called from any thread; everything else runs on the
    worker's own thread.
    """

    def __init__(self, database_url: str, *, poll_s: float = 2.0,
                 fitter: Fitter = default_fitter, options: dict[str, Any] | None = None,
                 estimators: Mapping[str, Estimator] = ESTIMATORS):
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s!r}")
        self.database_url = database_url
        self.poll_s = float(poll_s)
        self.fitter = fitter
        self.options = dict(options or {})
        self.estimators = dict(estimators)
        self._stop = threading.Event()
        self._engine = make_engine(database_url, pool_size=2, max_overflow=2) \
            if not is_sqlite(database_url) else make_engine(database_url)
        self._listen_conn = None

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run_once(self) -> list[FitOutcome]:
        return refit_once(self._engine, fitter=self.fitter, options=self.options,
                          estimators=self.estimators, should_stop=self._stop.is_set)

    def run(self) -> None:
        log.info("fitting worker started (%s)",
                 "polling" if is_sqlite(self.database_url) else f"LISTEN {TRIALS_CHANNEL}")
        try:
            if not is_sqlite(self.database_url):
                self._listen()  # before the first pass: news during it is not lost
            while not self._stop.is_set():
                try:
                    self.run_once()
                except Exception:  # keep serving; the next wake-up retries
                    log.exception("fitting pass failed; retrying in %.1f s", self.poll_s)
                    self._stop.wait(self.poll_s)
                    continue
                self._wait_for_news()
        finally:
            self._close_listen()
            self._engine.dispose()
            log.info("fitting worker stopped")

    # waiting ---------------------------------------------------------------------------

    def _wait_for_news(self) -> None:
        if is_sqlite(self.database_url):
            self._stop.wait(self.poll_s)
            return
        conn = self._listen()
        if conn is None:
            self._stop.wait(self.poll_s)
            return
        deadline = time.monotonic() + self.poll_s * LISTEN_FALLBACK_POLLS
        heard = False
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= deadline:
                    return
                # wake at least every 0.5 s so that stop() is noticed promptly
                timeout = min(0.5, deadline - now)
                ready, _, _ = select.select([conn], [], [], timeout)
                if ready:
                    conn.poll()
                    if conn.notifies:
                        conn.notifies.clear()
                        heard = True
                        deadline = time.monotonic() + DEBOUNCE_S  # wait for a quiet moment
                elif heard:
                    return
        except Exception:
            log.warning("LISTEN connection lost; reconnecting", exc_info=True)
            self._close_listen()

    def _listen(self):
        if self._listen_conn is not None:
            return self._listen_conn
        import psycopg2
        from sqlalchemy.engine import make_url

        url = make_url(self.database_url).set(drivername="postgresql")
        try:
            conn = psycopg2.connect(url.render_as_string(hide_password=False))
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"LISTEN {TRIALS_CHANNEL}")
        except Exception:
            log.warning("cannot LISTEN on %s; polling instead", TRIALS_CHANNEL, exc_info=True)
            return None
        self._listen_conn = conn
        return conn

    def _close_listen(self) -> None:
        if self._listen_conn is not None:
            try:
                self._listen_conn.close()
            except Exception:
                log.debug("closing the LISTEN connection failed", exc_info=True)
            self._listen_conn = None


def start_worker_thread(settings: Settings) -> Callable[[], None]:
    """Start a ``FittingWorker`` on a daemon thread; returns the function that stops it."""
    worker = FittingWorker(settings.database_url, poll_s=settings.worker_poll_s)
    thread = threading.Thread(target=worker.run, name="hyperlaw-fitting-worker", daemon=True)
    thread.start()

    def stop() -> None:
        worker.stop()
        thread.join(timeout=30)
        if thread.is_alive():
            log.warning("fitting worker still busy at shutdown (a fit is running)")

    return stop



def recommendation_body(answer, *, fit_id: int, fitted_at: dt.datetime | str, n_trials: int,
                        scope: str) -> dict[str, Any]:
    """The JSON body of a recommendation (API and CLI alike): the ``Recommendation``'s fields
    plus the fit it came from (``fit_ids``, ``fitted_at``, ``n_trials``, ``scope``)."""
    body = answer.as_dict()
    if isinstance(fitted_at, dt.datetime):
        fitted_at = fitted_at.isoformat()
    body.update(fit_ids=[fit_id], fitted_at=fitted_at, n_trials=n_trials, scope=scope)
    return body
