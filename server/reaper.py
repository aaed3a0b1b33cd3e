"""The stale-trial reaper: running trials whose heartbeat is older than the grace period are
marked failed (stop reason ``failed``), with the reason stored (:func:`reap_stale_trials`).

``run_reaper_once(settings)`` is what tests call; ``start_reaper(settings)`` is the
background starter ``hyperlaw serve`` hands to ``create_app``: it starts a daemon thread
that reaps every ``reaper_interval_s`` and returns the function that stops it.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.core.config import Settings
from server.core.db import Database, is_sqlite, open_database
from server.core.errors import HyperlawError
from server.models import StopReason, Trial, TrialStatus, utcnow

log = logging.getLogger(__name__)


def reap_stale_trials(
    *, session: Session, grace_s: float, now: dt.datetime | None = None
) -> list[int]:
    """Mark failed (stop reason ``failed``) every running trial whose last heartbeat (or,
    without one, last update) is older than ``grace_s`` seconds; the reason names the
    silence and the grace period.

    Returns the ids it failed. Safe to run from several processes at once (row locks with
    SKIP LOCKED on PostgreSQL; SQLite write transactions are serialised).
    """
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=grace_s)
    last_seen = func.coalesce(Trial.heartbeat_at, Trial.updated_at)
    stmt = select(Trial).where(Trial.status == TrialStatus.RUNNING.value, last_seen < cutoff)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    reaped = []
    for trial in session.scalars(stmt):
        seen = trial.heartbeat_at or trial.updated_at
        trial.status = TrialStatus.FAILED.value
        trial.stop_reason = StopReason.FAILED.value
        trial.status_reason = (
            f"no heartbeat for {(now - seen).total_seconds():.0f} s "
            f"(grace {grace_s:g} s; last seen {seen.isoformat()})"
        )
        trial.completed_at = now
        trial.updated_at = now
        reaped.append(trial.id)
    session.flush()
    if reaped:
        log.info("reaper failed %d stale trial(s): %s", len(reaped), reaped)
    return reaped


def run_reaper_once(settings: Settings, *, database: Database | None = None) -> list[int]:
    """One reaper pass over ``database`` (default: one opened from the settings' URL for
    this pass); returns the ids of the trials it failed."""
    if database is None:
        with open_database(settings.database_url) as own:
            return run_reaper_once(settings, database=own)
    with database.session() as session:
        return reap_stale_trials(session=session, grace_s=settings.heartbeat_grace_s)


def start_reaper(settings: Settings) -> Callable[[], None]:
    """Start the reaper thread; returns ``stop()``, which joins it."""
    stop_event = threading.Event()
    # one connection is all a pass needs (plus one spare for the pre-ping)
    pool = {} if is_sqlite(settings.database_url) else {"pool_size": 1, "max_overflow": 1}
    database = Database.from_url(settings.database_url, **pool)

    def loop() -> None:
        while not stop_event.is_set():
            try:
                run_reaper_once(settings, database=database)
            except HyperlawError as exc:  # database briefly unavailable: try next round
                log.warning("reaper pass failed: %s", exc)
            except Exception:  # anything else is a bug, logged with its traceback; go on
                log.exception("reaper pass failed")
            stop_event.wait(settings.reaper_interval_s)

    thread = threading.Thread(target=loop, name="hyperlaw-reaper", daemon=True)
    thread.start()

    def stop() -> None:
        stop_event.set()
        thread.join(timeout=10)
        database.dispose()

    return stop
