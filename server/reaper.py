"""The stale-trial reaper: running trials whose heartbeat is older than the grace period are
marked failed, with the reason stored (``crud.reap_stale_trials``).

``run_reaper_once(settings)`` is what tests call; ``start_reaper(settings)`` is the
background starter ``hyperlaw serve`` hands to ``create_app``: it starts a daemon thread
that reaps every ``reaper_interval_s`` and returns the function that stops it.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import Engine

from server import crud
from server.core.config import Settings
from server.core.db import make_engine, make_session_factory, session_scope
from server.core.errors import HyperlawError

log = logging.getLogger(__name__)


def run_reaper_once(settings: Settings, *, engine: Engine | None = None) -> list[int]:
    """One reaper pass; returns the ids of the trials it failed."""
    own = engine is None
    engine = engine or make_engine(settings.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            return crud.reap_stale_trials(session=session, grace_s=settings.heartbeat_grace_s)
    finally:
        if own:
            engine.dispose()


def start_reaper(settings: Settings) -> Callable[[], None]:
    """Start the reaper thread; returns ``stop()``, which joins it."""
    stop_event = threading.Event()
    engine = make_engine(settings.database_url, **({} if settings.database_url.startswith(
        "sqlite") else {"pool_size": 1, "max_overflow": 1}))

    def loop() -> None:
        while not stop_event.is_set():
            try:
                run_reaper_once(settings, engine=engine)
            except HyperlawError as exc:  # database briefly unavailable: try next round
                log.warning("reaper pass failed: %s", exc)
            except Exception:
                log.exception("reaper pass failed")
            stop_event.wait(settings.reaper_interval_s)

    thread = threading.Thread(target=loop, name="hyperlaw-reaper", daemon=True)
    thread.start()

    def stop() -> None:
        stop_event.set()
        thread.join(timeout=10)
        engine.dispose()

    return stop
