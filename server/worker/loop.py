"""Refit passes and the long-running fitting worker.

A pass (:func:`refit_once`) fits every (kind, scope) whose data watermark has no fit yet
(:mod:`server.worker.scopes`): the recommender of every stale scope first (family scopes
first), then the estimators' fits (:mod:`server.worker.fits`), so slow estimators never delay a
servable recommender. Every fit is stored as a row with its status (ok, or
insufficient_data / failed with the reason), params, intervals, quality (with the seconds it
took), the ids of the trials it used and the watermark it was fitted at; a fit that raises is
stored as ``failed`` with the error and the others go on.

Locks. On PostgreSQL the fit of a (kind, scope) runs inside a transaction holding
``pg_try_advisory_xact_lock(k)``, k = a 64-bit hash of (kind, scope); a worker that cannot
take it skips that fit (another worker is doing it) and, after taking it, checks again that
no fit for the watermark was stored meanwhile. The lock belongs to the transaction, so a
killed worker's lock vanishes with its connection. On SQLite (one machine, usually one
worker) the fit runs outside any transaction and the UNIQUE (kind, scope, data_watermark)
constraint alone settles races.

Waking up. On PostgreSQL the worker LISTENs on ``hyperlaw_trials`` (``server.crud`` sends a
NOTIFY when a trial completes or is imported) from before its first pass, and also re-checks
every ``LISTEN_FALLBACK_POLLS`` poll periods; on SQLite it polls every ``worker_poll_s``. A
burst of notifications (an import of thousands of trials) is absorbed by waiting
``DEBOUNCE_S`` of quiet before fitting.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import select
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select as sql_select
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.core.config import Settings
from server.core.db import Database, is_sqlite
from server.crud import TRIALS_CHANNEL
from server.models import Fit
from server.worker.fits import (
    ESTIMATORS,
    FIT_KINDS,
    RECOMMENDER_KIND,
    Estimator,
    Fitter,
    default_fitter,
    fit_recommender_kind,
)
from server.worker.records import FitRecord, checked_json
from server.worker.scopes import (
    FAMILY_SCOPE_PREFIX,
    Curves,
    ScopeData,
    load_curves,
    load_scope,
    scope_experiment_id,
    scope_watermarks,
)

log = logging.getLogger(__name__)

DEBOUNCE_S = 0.5
LISTEN_FALLBACK_POLLS = 15


def advisory_key(kind: str, scope: str) -> int:
    """A signed 64-bit key for ``pg_try_advisory_xact_lock``: blake2b-8 of 'kind|scope'."""
    digest = hashlib.blake2b(f"hyperlaw-fit|{kind}|{scope}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


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


Compute = Callable[[ScopeData, Curves | None], FitRecord]


def _build_fit(kind: str, data: ScopeData, curves: Curves | None, compute: Compute) -> Fit:
    """Run one fit and describe it as a Fit row (not yet added to a session). Any error,
    in the fit or in making its result storable, gives a ``failed`` row with the error.
    Every row's quality says the fit key it served, how many of the scope's trials were
    left out under other keys, and which were excluded (``server.worker.scopes``)."""
    scope = data.scope
    base: dict[str, Any] = dict(
        kind=kind, scope=scope, experiment_id=scope_experiment_id(scope), data_watermark=data.mark
    )
    keys = {"fit_key": data.main_key, "n_runs_other_settings": data.n_other_settings}
    keys.update(data.exclusion_quality())
    started = time.perf_counter()
    try:
        record = compute(data, curves)
        params = checked_json("params", record.params)
        intervals = checked_json("intervals", record.intervals)
        quality = checked_json("quality", record.quality)
        trial_ids = [int(i) for i in record.trial_ids]
    except Exception as exc:  # a failed refit is data: stored with its reason
        log.exception("%s fit of %s failed", kind, scope)
        trial_ids = [t.id for t in data.trials]
        return Fit(
            status="failed",
            message=f"fit raised {type(exc).__name__}: {exc}",
            params=None,
            intervals=None,
            quality={**keys, "seconds": round(time.perf_counter() - started, 3)},
            trial_ids=trial_ids,
            n_trials=len(trial_ids),
            **base,
        )
    quality = {**(quality or {}), **keys, "seconds": round(time.perf_counter() - started, 3)}
    return Fit(
        status=record.status,
        message=record.message or None,
        params=params,
        intervals=intervals,
        quality=quality,
        trial_ids=trial_ids,
        n_trials=len(trial_ids),
        **base,
    )


def _compute_for(
    kind: str, fitter: Fitter, options: dict[str, Any], estimators: Mapping[str, Estimator]
) -> tuple[Compute, bool]:
    """The function that fits ``kind`` and whether it needs the scope's loss curves. A family
    scope's recommender borrows from every family (``server.worker.fits``); the rest fit
    the scope's main-key trials."""
    if kind == RECOMMENDER_KIND:

        def recommender(data: ScopeData, _curves: Curves | None) -> FitRecord:
            if not data.pooled or data.main_key is None:  # an experiment: its own runs
                return fit_recommender_kind(data.trials, fitter, options)
            return fit_recommender_kind(
                data.trials,
                fitter,
                options,
                family=data.main_key,
                pooled=data.pooled,
                fit_keys=data.fit_keys,
            )

        return recommender, False
    if kind not in estimators:
        kinds = ", ".join((RECOMMENDER_KIND, *estimators))
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
    estimator = estimators[kind]
    return (lambda data, curves: estimator.fit(data.trials, curves)), estimator.needs_curves


def _fit_exists(session: Session, kind: str, scope: str, mark: str) -> bool:
    stmt = sql_select(Fit.id).where(
        Fit.kind == kind, Fit.scope == scope, Fit.data_watermark == mark
    )
    return session.scalar(stmt) is not None


def _stored(fit: Fit) -> FitOutcome:
    log.info(
        "stored %s fit %d of %s: %s on %d trials in %.2f s%s",
        fit.kind,
        fit.id,
        fit.scope,
        fit.status,
        fit.n_trials,
        (fit.quality or {}).get("seconds", 0.0),
        f" ({fit.message})" if fit.message else "",
    )
    return FitOutcome(fit.scope, "fitted", fit.id, fit.status, fit.message, kind=fit.kind)


def refit_scope(
    database: Database,
    scope: str,
    *,
    kind: str = RECOMMENDER_KIND,
    fitter: Fitter = default_fitter,
    options: dict[str, Any] | None = None,
    estimators: Mapping[str, Estimator] = ESTIMATORS,
) -> FitOutcome:
    """Fit ``kind`` for ``scope`` unless a fit for its current watermark exists (locks:
    module docstring). ``fitter``/``options`` fit the recommender; ``estimators`` maps the
    other kinds to their :class:`~server.worker.fits.Estimator`. Raises ``ValueError`` for
    an unknown kind or scope."""
    compute, needs_curves = _compute_for(kind, fitter, dict(options or {}), estimators)
    if database.is_sqlite:
        with database.session() as session:
            data = load_scope(session, scope)
            if _fit_exists(session, kind, scope, data.mark):
                return FitOutcome(scope, "up_to_date", kind=kind)
            curves = load_curves(session, scope, data.trials) if needs_curves else None
        fit = _build_fit(kind, data, curves, compute)
        try:
            with database.session() as session:
                session.add(fit)
                session.flush()
        except IntegrityError:
            return FitOutcome(scope, "raced", kind=kind)
        return _stored(fit)
    try:
        with database.session() as session:
            got = session.scalar(
                text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": advisory_key(kind, scope)}
            )
            if not got:
                return FitOutcome(scope, "locked", kind=kind)
            data = load_scope(session, scope)
            if _fit_exists(session, kind, scope, data.mark):
                return FitOutcome(scope, "up_to_date", kind=kind)
            curves = load_curves(session, scope, data.trials) if needs_curves else None
            fit = _build_fit(kind, data, curves, compute)
            session.add(fit)
            session.flush()
    except IntegrityError:  # only without the lock's protection, e.g. an older worker
        return FitOutcome(scope, "raced", kind=kind)
    return _stored(fit)


def stale_fits(database: Database, kinds: Iterable[str] = FIT_KINDS) -> list[tuple[str, str]]:
    """(kind, scope) pairs whose current watermark has no fit yet, in the order of a pass:
    by kind as given (the recommender first), family scopes first within a kind."""
    kinds = list(kinds)
    with database.session() as session:
        marks = scope_watermarks(session)
        if not marks:
            return []
        stored = sql_select(Fit.kind, Fit.scope, Fit.data_watermark).where(
            Fit.kind.in_(kinds), Fit.data_watermark.in_(set(marks.values()))
        )
        have = {(kind, scope, mark) for kind, scope, mark in session.execute(stored)}
    scopes = sorted(marks, key=lambda s: (not s.startswith(FAMILY_SCOPE_PREFIX), s))
    return [(k, s) for k in kinds for s in scopes if (k, s, marks[s]) not in have]


def stale_scopes(database: Database, kind: str = RECOMMENDER_KIND) -> list[str]:
    """Scopes whose current watermark has no fit of ``kind`` yet (family scopes first)."""
    return [scope for _kind, scope in stale_fits(database, [kind])]


def refit_once(
    database: Database,
    *,
    fitter: Fitter = default_fitter,
    options: dict[str, Any] | None = None,
    kinds: Iterable[str] | None = None,
    scopes: Iterable[str] | None = None,
    estimators: Mapping[str, Estimator] = ESTIMATORS,
    should_stop: Callable[[], bool] | None = None,
) -> list[FitOutcome]:
    """One pass: fit every (kind, scope) whose data changed since its last fit, the
    recommender of every scope before any estimator. ``kinds`` (default: the recommender
    and every kind of ``estimators``) and ``scopes`` (default: all) limit the pass;
    ``should_stop`` is asked before each fit and ends the pass early when it returns True."""
    kinds = [RECOMMENDER_KIND, *estimators] if kinds is None else list(kinds)
    order = sorted(kinds, key=lambda k: k != RECOMMENDER_KIND)  # stable: the rest as given
    only = None if scopes is None else set(scopes)
    outcomes = []
    for kind, scope in stale_fits(database, order):
        if only is not None and scope not in only:
            continue
        if should_stop is not None and should_stop():
            break
        outcomes.append(
            refit_scope(
                database, scope, kind=kind, fitter=fitter, options=options, estimators=estimators
            )
        )
    return outcomes


# --- the long-running worker ---------------------------------------------------------------


class FittingWorker:
    """Refits on new data until ``stop()``; run it with ``run()`` (blocking) or in a thread.
    It opens its own database from ``database_url`` and disposes it when ``run()`` ends.

    Thread-safety: ``stop()`` may be called from any thread; everything else runs on the
    worker's own thread.
    """

    def __init__(
        self,
        database_url: str,
        *,
        poll_s: float = 2.0,
        fitter: Fitter = default_fitter,
        options: dict[str, Any] | None = None,
        estimators: Mapping[str, Estimator] = ESTIMATORS,
    ):
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s!r}")
        self.poll_s = float(poll_s)
        self.fitter = fitter
        self.options = dict(options or {})
        self.estimators = dict(estimators)
        self._stop = threading.Event()
        # a small pool: one session at a time, plus the pre-ping's spare
        pool = {} if is_sqlite(database_url) else {"pool_size": 2, "max_overflow": 2}
        self._database = Database.from_url(database_url, **pool)
        self._listen_conn: Any = None  # a psycopg2 connection, imported only on PostgreSQL

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run_once(self) -> list[FitOutcome]:
        return refit_once(
            self._database,
            fitter=self.fitter,
            options=self.options,
            estimators=self.estimators,
            should_stop=self._stop.is_set,
        )

    def run(self) -> None:
        sqlite = self._database.is_sqlite
        log.info("fitting worker started (%s)", "polling" if sqlite else f"LISTEN {TRIALS_CHANNEL}")
        try:
            if not sqlite:
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
            self._database.dispose()
            log.info("fitting worker stopped")

    # waiting ---------------------------------------------------------------------------

    def _wait_for_news(self) -> None:
        conn = None if self._database.is_sqlite else self._listen()
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
        except Exception:  # a dropped connection: LISTEN again on the next wait
            log.warning("LISTEN connection lost; reconnecting", exc_info=True)
            self._close_listen()

    def _listen(self) -> Any:
        """The LISTEN connection (opened on first use), or None when it cannot be opened."""
        if self._listen_conn is not None:
            return self._listen_conn
        import psycopg2

        url = self._database.engine.url.set(drivername="postgresql")
        try:
            conn = psycopg2.connect(url.render_as_string(hide_password=False))
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"LISTEN {TRIALS_CHANNEL}")
        except Exception:  # any failure to LISTEN falls back to polling
            log.warning("cannot LISTEN on %s; polling instead", TRIALS_CHANNEL, exc_info=True)
            return None
        self._listen_conn = conn
        return conn

    def _close_listen(self) -> None:
        if self._listen_conn is not None:
            try:
                self._listen_conn.close()
            except Exception:  # closing a broken connection may fail too
                log.debug("closing the LISTEN connection failed", exc_info=True)
            self._listen_conn = None


def worker_fits(n_bootstrap: int | None = None, law_forms: bool = True) -> dict[str, Any]:
    """``options`` and ``estimators`` for a worker whose fits draw ``n_bootstrap`` bootstrap
    samples (None: each fit's own default) and whose recommender averages law forms or not
    (``HYPERLAW_WORKER_N_BOOTSTRAP``, ``HYPERLAW_WORKER_LAW_FORMS``)."""
    options: dict[str, Any] = {} if law_forms else {"law_forms": False}
    if n_bootstrap is None:
        return {"options": options, "estimators": dict(ESTIMATORS)}

    def drawn(fit: Callable[..., FitRecord]) -> Callable[..., FitRecord]:
        return functools.partial(fit, n_bootstrap=n_bootstrap)  # every kind takes n_bootstrap

    estimators = {k: Estimator(k, drawn(e.fit), e.needs_curves) for k, e in ESTIMATORS.items()}
    return {"options": {**options, "n_bootstrap": n_bootstrap}, "estimators": estimators}


def worker_from_settings(settings: Settings) -> FittingWorker:
    """The worker of ``hyperlaw worker`` and ``hyperlaw serve``, as ``settings`` say."""
    fits = worker_fits(settings.worker_n_bootstrap, settings.worker_law_forms)
    return FittingWorker(settings.database_url, poll_s=settings.worker_poll_s, **fits)


def start_worker_thread(settings: Settings) -> Callable[[], None]:
    """Start a ``FittingWorker`` on a daemon thread; returns the function that stops it."""
    worker = worker_from_settings(settings)
    thread = threading.Thread(target=worker.run, name="hyperlaw-fitting-worker", daemon=True)
    thread.start()

    def stop() -> None:
        worker.stop()
        thread.join(timeout=30)
        if thread.is_alive():
            log.warning("fitting worker still busy at shutdown (a fit is running)")

    return stop
