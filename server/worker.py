"""The fitting worker: refits the recommender whenever new trial results land.

Scopes. Every completed trial belongs to two scopes: ``global`` (all completed trials) and
``experiment:<id>`` (its experiment). A fit of kind ``recommender`` is kept per scope.

Data watermark. For a scope, ``w = "v<state version>:n=<count>:id=<max id>:t=<max
updated_at>"`` over its completed trials. A scope needs a refit exactly when no fit row of
(kind, scope, w) exists; the table's UNIQUE (kind, scope, data_watermark) means a fit for a
given state of the data is stored at most once, whatever its status (so a refit that failed
is not retried until the data changes).

Locks. On PostgreSQL the fit of a scope runs inside a transaction holding
``pg_try_advisory_xact_lock(k)``, k = a 64-bit hash of (kind, scope); a worker that cannot
take it skips the scope (another worker is fitting it) and, after taking it, checks again
that no fit for the watermark was stored meanwhile. The lock belongs to the transaction, so
a killed worker's lock vanishes with its connection. On SQLite (one machine, usually one
worker) the fit runs outside any transaction and the UNIQUE constraint alone settles races.

Serving. A fit whose status is not ok is stored with its reason and never replaces the last
ok fit: readers always ask for the newest fit *with status ok* (``latest_ok_fit``).

Waking up. On PostgreSQL the worker LISTENs on ``hyperlaw_trials`` (``server.crud`` sends a
NOTIFY when a trial completes or is imported) and also re-checks every
``LISTEN_FALLBACK_POLLS`` poll periods; on SQLite it polls every ``worker_poll_s``. A burst of
notifications (an import of thousands of trials) is absorbed by waiting ``DEBOUNCE_S`` of
quiet before fitting.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import select
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, select as sql_select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.core.config import Settings
from server.core.db import is_sqlite, make_engine, make_session_factory, session_scope
from server.crud import TRIALS_CHANNEL
from server.models import Fit, Trial, TrialStatus

log = logging.getLogger(__name__)

RECOMMENDER_KIND = "recommender"
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
    """What ``refit_scope`` did: ``action`` is fitted / up_to_date / locked / raced."""

    scope: str
    action: str
    fit_id: int | None = None
    status: str | None = None
    message: str | None = None


def _reference_point(fitted_range: dict) -> tuple[float, float] | None:
    """Geometric centre of the fitted (N, D) range, where the stored intervals are shown."""
    try:
        (n_lo, n_hi), (d_lo, d_hi) = fitted_range["n_params"], fitted_range["n_tokens"]
    except (KeyError, ValueError, TypeError):
        return None
    return math.sqrt(n_lo * n_hi), math.sqrt(d_lo * d_hi)


def _build_fit(scope: str, mark: str, trials: list[Trial], fitter: Fitter,
               options: dict[str, Any]) -> Fit:
    """Run the fit and describe it as a Fit row (not yet added to a session)."""
    from fitting.results import FitStatus

    trial_ids = [t.id for t in trials]
    base = dict(kind=RECOMMENDER_KIND, scope=scope, experiment_id=scope_experiment_id(scope),
                trial_ids=trial_ids, n_trials=len(trials), data_watermark=mark)
    started = time.perf_counter()
    try:
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
    except Exception as exc:  # a failed refit is data: stored with its reason
        log.exception("recommender fit of %s failed", scope)
        return Fit(status=FitStatus.FAILED.value,
                   message=f"fit raised {type(exc).__name__}: {exc}", params=None,
                   intervals=None, quality={"seconds": time.perf_counter() - started}, **base)
    quality = dict(state.get("quality") or {})
    quality.update(n_runs=rec.n_runs, n_groups=state.get("n_groups"),
                   seconds=round(time.perf_counter() - started, 3))
    return Fit(status=rec.status.value, message=rec.reason or None, params=state,
               intervals=intervals, quality=quality, **base)


def refit_scope(engine: Engine, scope: str, *, fitter: Fitter = default_fitter,
                options: dict[str, Any] | None = None) -> FitOutcome:
    """Fit ``scope`` unless a fit for its current watermark exists (see module docstring)."""
    options = dict(options or {})
    factory = make_session_factory(engine)
    if is_sqlite(str(engine.url)):
        with session_scope(factory) as session:
            trials, mark = load_scope(session, scope)
            if _fit_exists(session, scope, mark):
                return FitOutcome(scope, "up_to_date")
        fit = _build_fit(scope, mark, trials, fitter, options)
        try:
            with session_scope(factory) as session:
                session.add(fit)
                session.flush()
        except IntegrityError:
            return FitOutcome(scope, "raced")
        return _stored(fit)
    try:
        with session_scope(factory) as session:
            got = session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"),
                                 {"k": advisory_key(RECOMMENDER_KIND, scope)})
            if not got:
                return FitOutcome(scope, "locked")
            trials, mark = load_scope(session, scope)
            if _fit_exists(session, scope, mark):
                return FitOutcome(scope, "up_to_date")
            fit = _build_fit(scope, mark, trials, fitter, options)
            session.add(fit)
            session.flush()
    except IntegrityError:  # only without the lock's protection, e.g. an older worker
        return FitOutcome(scope, "raced")
    return _stored(fit)


def _fit_exists(session: Session, scope: str, mark: str) -> bool:
    return session.scalar(
        sql_select(Fit.id).where(Fit.kind == RECOMMENDER_KIND, Fit.scope == scope,
                                 Fit.data_watermark == mark)
    ) is not None


def _stored(fit: Fit) -> FitOutcome:
    log.info("stored %s fit %d of %s: %s on %d trials%s", fit.kind, fit.id, fit.scope,
             fit.status, fit.n_trials, f" ({fit.message})" if fit.message else "")
    return FitOutcome(fit.scope, "fitted", fit.id, fit.status, fit.message)


def stale_scopes(engine: Engine) -> list[str]:
    """Scopes whose current watermark has no fit yet (global first)."""
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        marks = scope_watermarks(session)
        if not marks:
            return []
        have = set(session.execute(
            sql_select(Fit.scope, Fit.data_watermark)
            .where(Fit.kind == RECOMMENDER_KIND, Fit.data_watermark.in_(set(marks.values())))
        ).all())
    todo = [s for s, m in marks.items() if (s, m) not in have]
    return sorted(todo, key=lambda s: (s != GLOBAL_SCOPE, s))


def refit_once(engine: Engine, *, fitter: Fitter = default_fitter,
               options: dict[str, Any] | None = None) -> list[FitOutcome]:
    """One pass: refit every scope whose data changed since its last fit."""
    return [refit_scope(engine, scope, fitter=fitter, options=options)
            for scope in stale_scopes(engine)]


# --- the loop ------------------------------------------------------------------------------

class FittingWorker:
    """Refits on new data until ``stop()``; run it with ``run()`` (blocking) or in a thread.

    Thread-safety: ``stop()`` may be called from any thread; everything else runs on the
    worker's own thread.
    """

    def __init__(self, database_url: str, *, poll_s: float = 2.0,
                 fitter: Fitter = default_fitter, options: dict[str, Any] | None = None):
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s!r}")
        self.database_url = database_url
        self.poll_s = float(poll_s)
        self.fitter = fitter
        self.options = dict(options or {})
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
        return refit_once(self._engine, fitter=self.fitter, options=self.options)

    def run(self) -> None:
        log.info("fitting worker started (%s)",
                 "polling" if is_sqlite(self.database_url) else f"LISTEN {TRIALS_CHANNEL}")
        try:
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
