"""The stale-trial reaper: as a function, as a background thread, and inside `serve`."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

from sqlalchemy import update

from client import HyperlawAPIError, HyperlawClient
from server.core.config import Settings
from server.core.db import open_database
from server.main import create_app
from server.models import Experiment, Trial, utcnow
from server.reaper import run_reaper_once, start_reaper


def _make_trials(url: str, statuses_and_ages: list[tuple[str, float | None]]) -> list[int]:
    """Trials with the given status and heartbeat age in seconds (None: never beat)."""
    now = utcnow()
    ids = []
    with open_database(url) as database, database.session() as session:
        exp = Experiment(name=f"reaper-{uuid.uuid4().hex[:8]}")
        session.add(exp)
        session.flush()
        for status, age in statuses_and_ages:
            trial = Trial(
                experiment_id=exp.id,
                n_params=1,
                n_tokens=1,
                seq_len=1,
                learning_rate=1e-3,
                batch_size_tokens=1,
                status=status,
            )
            session.add(trial)
            session.flush()
            ids.append(trial.id)
            stamp = None if age is None else now - dt.timedelta(seconds=age)
            session.execute(
                update(Trial)
                .where(Trial.id == trial.id)
                .values(heartbeat_at=stamp, updated_at=now - dt.timedelta(seconds=age or 0))
            )
    return ids


def _status(url: str, trial_id: int) -> tuple[str, str | None]:
    with open_database(url) as database, database.session() as session:
        trial = session.get(Trial, trial_id)
        return trial.status, trial.status_reason


def _stop_reason(url: str, trial_id: int) -> str | None:
    with open_database(url) as database, database.session() as session:
        return session.get(Trial, trial_id).stop_reason


def test_reaper_fails_only_stale_running_trials(db_url):
    stale, fresh, queued_old, done_old = _make_trials(
        db_url, [("running", 400.0), ("running", 10.0), ("queued", None), ("completed", 900.0)]
    )
    settings = Settings(database_url=db_url, heartbeat_grace_s=300)
    reaped = run_reaper_once(settings)
    assert stale in reaped and fresh not in reaped
    status, reason = _status(db_url, stale)
    assert status == "failed"
    assert reason.startswith("no heartbeat for 4") and "grace 300 s" in reason
    assert _stop_reason(db_url, stale) == "failed"
    assert _status(db_url, fresh) == ("running", None) and _stop_reason(db_url, fresh) is None
    assert _status(db_url, queued_old)[0] == "queued"
    assert _status(db_url, done_old)[0] == "completed"
    assert stale not in run_reaper_once(settings)  # idempotent


def test_running_trial_without_heartbeat_uses_last_update(db_url):
    (silent,) = _make_trials(db_url, [("running", None)])
    with open_database(db_url) as database, database.engine.begin() as conn:
        conn.execute(
            update(Trial)
            .where(Trial.id == silent)
            .values(updated_at=utcnow() - dt.timedelta(seconds=1000))
        )
    assert silent in run_reaper_once(Settings(database_url=db_url, heartbeat_grace_s=300))


def test_reaper_thread_and_app_lifespan(sqlite_url):
    (stale,) = _make_trials(sqlite_url, [("running", 50.0)])
    settings = Settings(database_url=sqlite_url, heartbeat_grace_s=30, reaper_interval_s=0.05)
    app = create_app(settings, background=[start_reaper])

    async def run_lifespan() -> None:
        async with app.router.lifespan_context(app):
            deadline = time.monotonic() + 10
            while _status(sqlite_url, stale)[0] != "failed" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

    asyncio.run(run_lifespan())
    assert _status(sqlite_url, stale)[0] == "failed"


def test_background_starters_start_and_stop(sqlite_url):
    events: list[str] = []

    def starter(settings: Settings):
        events.append(f"start:{settings.heartbeat_grace_s:g}")
        return lambda: events.append("stop")

    app = create_app(Settings(database_url=sqlite_url, heartbeat_grace_s=7), background=[starter])

    async def run_lifespan() -> None:
        async with app.router.lifespan_context(app):
            events.append("serving")

    asyncio.run(run_lifespan())
    assert events == ["start:7", "serving", "stop"]


def test_serve_runs_the_reaper(pg_url, live_server_factory):
    server = live_server_factory(
        database_url=pg_url,
        env={"HYPERLAW_HEARTBEAT_GRACE_S": "0.5", "HYPERLAW_REAPER_INTERVAL_S": "0.1"},
    )
    client = HyperlawClient(server.url, server.token, max_retries=0)
    exp = client.ensure_experiment(f"reaped-{uuid.uuid4().hex[:6]}")
    trial = client.create_trial(
        experiment_id=exp["id"],
        n_params=1,
        n_tokens=1,
        seq_len=1,
        learning_rate=1e-3,
        batch_size_tokens=1,
    )
    client.heartbeat(trial["id"])
    deadline = time.monotonic() + 15
    while client.get_trial(trial["id"])["status"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.1)
    got = client.get_trial(trial["id"])
    assert got["status"] == "failed" and "no heartbeat" in got["status_reason"]
    try:
        client.heartbeat(trial["id"])
        raise AssertionError("heartbeat to a reaped trial must be refused")
    except HyperlawAPIError as err:
        assert err.status_code == 409 and "no heartbeat" in err.detail
    client.close()
