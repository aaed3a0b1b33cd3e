"""The fitting worker: refits on new data (NOTIFY on PostgreSQL, polling on SQLite), keeps
serving the last good fit when a refit fails, and never runs one fit twice (of any kind).

None of these checks reads a fit's intervals or the law forms' averaged answer, so the fits
are light (``tests.databases.light_fits``: no bootstrap draws, one surface)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest
from sqlalchemy import select, text

from client import HyperlawClient
from server import crud
from server.core.db import open_database
from server.importers import import_steplaw
from server.models import Fit
from server.worker.fits import (
    ESTIMATORS,
    FIT_KINDS,
    RECOMMENDER_KIND,
    Estimator,
    default_fitter,
)
from server.worker.loop import (
    FittingWorker,
    advisory_key,
    refit_once,
    refit_scope,
    worker_fits,
)
from server.worker.scopes import family_scope
from tests.conftest import REPO_ROOT
from tests.databases import LIGHT_FITS_ENV, add_completed_trial, light_fits, seed_steplaw

STEP_LAW = family_scope("step-law")


def fits(url: str, kind: str | None = None) -> list[Fit]:
    with open_database(url) as database, database.session() as session:
        stmt = select(Fit).order_by(Fit.id)
        if kind is not None:
            stmt = stmt.where(Fit.kind == kind)
        return list(session.scalars(stmt))


def latest_ok(url: str, scope: str = STEP_LAW) -> Fit | None:
    with open_database(url) as database, database.session() as session:
        return crud.latest_ok_fit(session=session, kind=RECOMMENDER_KIND, scope=scope)


def imported(url: str) -> None:
    """The bundled Step Law sweep, imported (not fitted)."""
    with open_database(url) as database:
        import_steplaw(database)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_failing_refit_keeps_serving_the_previous_fit(fresh_db, live_server_factory, database_for):
    seed_steplaw(fresh_db, light=True)
    good = latest_ok(fresh_db)
    server = live_server_factory(database_url=fresh_db)
    query = {"n_params": 1e9, "n_tokens": 1e11}
    before = httpx.get(server.url + "/v1/recommendations", params=query).json()
    assert before["fit_ids"] == [good.id]

    add_completed_trial(fresh_db)

    def broken(runs, **options):
        raise RuntimeError("singular matrix in the surface fit")

    only = [RECOMMENDER_KIND]
    outcomes = refit_once(database_for(fresh_db), fitter=broken, kinds=only)
    assert [(o.action, o.status) for o in outcomes] == [("fitted", "failed")] * 2
    assert all("singular matrix" in o.message for o in outcomes)
    assert refit_once(database_for(fresh_db), fitter=broken, kinds=only) == []  # not retried

    stored = httpx.get(server.url + "/v1/fits", params={"status": "failed"}).json()
    assert stored["count"] == 2
    assert all("RuntimeError: singular matrix" in f["message"] for f in stored["data"])
    time.sleep(1.1)  # past the cache's check interval: the server looks again
    after = httpx.get(server.url + "/v1/recommendations", params=query).json()
    assert after["fit_ids"] == [good.id]
    assert after["learning_rate"] == before["learning_rate"]

    # Too little data, for real: an experiment of three runs is insufficient_data, stored
    # with the reason, and its scope answers 503 with that reason.
    for lr in (1e-3, 2e-3, 4e-3):
        add_completed_trial(fresh_db, "tiny", learning_rate=lr)
    by_scope = {o.scope: o for o in refit_once(database_for(fresh_db), kinds=only, **light_fits())}
    assert by_scope[STEP_LAW].status == "ok"
    [tiny] = [o for s, o in by_scope.items() if s.startswith("experiment:")]
    assert tiny.status == "insufficient_data" and "groups" in tiny.message
    answer = httpx.get(server.url + "/v1/recommendations", params={**query, "experiment": "tiny"})
    assert answer.status_code == 503
    assert "insufficient_data" in answer.json()["detail"]
    assert "hyperlaw import steplaw" in answer.json()["detail"]


def test_two_workers_run_each_fit_once(fresh_pg, database_for):
    imported(fresh_pg)
    calls: list[str] = []
    lock = threading.Lock()

    def slow_counting_fitter(runs, **options):
        with lock:
            calls.append(RECOMMENDER_KIND)
        # widen the window in which the other worker could start the same fit (the lock is
        # taken in milliseconds; half a second leaves it wide open)
        time.sleep(0.5)
        return default_fitter(runs, **options)

    light = light_fits()

    def counting(estimator: Estimator) -> Estimator:
        def fit(trials, curves):
            with lock:
                calls.append(estimator.kind)
            time.sleep(0.25)
            return estimator.fit(trials, curves)

        return Estimator(estimator.kind, fit, estimator.needs_curves)

    assert set(light["estimators"]) == set(ESTIMATORS)
    estimators = {kind: counting(e) for kind, e in light["estimators"].items()}

    def run_both() -> list[list]:
        barrier = threading.Barrier(2)
        results: list[list] = [[], []]

        def work(i: int) -> None:
            database = database_for(fresh_pg)
            barrier.wait()
            results[i] = refit_once(
                database,
                fitter=slow_counting_fitter,
                options=light["options"],
                estimators=estimators,
            )

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        return results

    n = 2 * len(FIT_KINDS)  # every kind for family and experiment: each by exactly one worker
    results = run_both()
    assert sorted(calls) == sorted(FIT_KINDS * 2)
    actions = sorted(o.action for r in results for o in r)
    assert actions.count("fitted") == n and set(actions) <= {"fitted", "locked", "up_to_date"}
    assert len(fits(fresh_pg)) == n

    add_completed_trial(fresh_pg)
    run_both()
    assert sorted(calls) == sorted(FIT_KINDS * 4) and len(fits(fresh_pg)) == 2 * n
    with database_for(fresh_pg).engine.connect() as conn:
        held = conn.scalar(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"))
    assert held == 0


def test_killed_worker_leaves_nothing_locked(fresh_pg, database_for, tmp_path):
    imported(fresh_pg)
    script = tmp_path / "stuck_worker.py"
    script.write_text(
        textwrap.dedent(f"""
        import time
        from server.core.db import Database
        from server.worker.loop import refit_scope

        def stuck(runs, **options):
            time.sleep(600)

        refit_scope(Database.from_url({fresh_pg!r}), "family:step-law", fitter=stuck)
    """)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO_ROOT, env=env)
    database = database_for(fresh_pg)
    key = advisory_key("recommender", STEP_LAW)

    def lock_held() -> bool:
        with database.engine.connect() as conn:
            return bool(
                conn.scalar(
                    text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND ((classid::bigint << 32) | objid::bigint) = (:k)::bigint"
                    ),
                    {"k": key},
                )
            )

    try:
        wait_for(lock_held, 60, "the stuck worker to take the advisory lock")
        assert refit_scope(database, STEP_LAW).action == "locked"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    wait_for(lambda: not lock_held(), 30, "the killed worker's lock to vanish")
    outcome = refit_scope(database, STEP_LAW, **light_fits())
    assert (outcome.action, outcome.status) == ("fitted", "ok")


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_worker_thread_notices_new_trials(backend, make_database):
    """On PostgreSQL the poll period is long (fallback check after 15 x 30 s), so only the
    NOTIFY of the completed trial can wake the worker in time; SQLite polls."""
    from server.core.db import upgrade

    url = make_database(backend)
    upgrade(url)
    seed_steplaw(url, kinds=None, light=True)  # every kind: the worker's first pass does nothing
    first = latest_ok(url)
    worker = FittingWorker(url, poll_s=30.0 if backend == "postgresql" else 0.2, **light_fits())
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)  # let it finish its first (no-op) pass and start waiting
        trial_id = add_completed_trial(url)
        newer = wait_for(
            lambda: (f := latest_ok(url)) is not None and f.id != first.id and f,
            60,
            "a refit after the new trial",
        )
        assert newer.n_trials == 1912 and trial_id in newer.trial_ids
    finally:
        worker.stop()
        thread.join(timeout=60)
    assert not thread.is_alive()


def test_trial_posted_through_the_api_reaches_a_later_fit(fresh_pg, live_server_factory):
    seed_steplaw(fresh_pg, light=True)
    server = live_server_factory(database_url=fresh_pg, worker=True, env=LIGHT_FITS_ENV)
    client = HyperlawClient(server.url, server.token)
    query = {"n_params": 5e8, "n_tokens": 5e10}
    before = client.recommend(**query)
    assert before["n_trials"] == 1911

    experiment = client.ensure_experiment("steplaw")
    trial = client.create_trial(
        experiment_id=experiment["id"],
        n_params=400_000_000,
        n_tokens=30_000_000_000,
        seq_len=2048,
        learning_rate=1.5e-3,
        batch_size_tokens=2_097_152,
        status="running",
    )
    client.update_trial(
        trial["id"], status="completed", final_loss=2.61, final_eval_loss=2.63, steps_done=14305
    )

    after = wait_for(
        lambda: (r := client.recommend(**query))["n_trials"] == 1912 and r,
        60,
        "the served fit to include the new trial",
    )
    assert after["fit_ids"] != before["fit_ids"]
    fit = client.get_fit(after["fit_ids"][0])
    assert trial["id"] in fit["trial_ids"] and fit["status"] == "ok"
    assert fit["data_watermark"].startswith("v") and f"id={trial['id']}" in fit["data_watermark"]


def test_a_run_logged_with_hyperlaw_init_reaches_its_familys_next_fit(
    fresh_pg, live_server_factory, monkeypatch
):
    """The light client's three lines, as a team's own loop runs them: the run completes,
    and the next fit of its family (step-law) holds it and serves from it."""
    import hyperlaw

    seed_steplaw(fresh_pg, light=True)
    server = live_server_factory(database_url=fresh_pg, worker=True, env=LIGHT_FITS_ENV)
    client = HyperlawClient(server.url, server.token)
    query = {"n_params": 5e8, "n_tokens": 5e10, "family": "step-law"}
    before = client.recommend(**query)
    monkeypatch.delenv("RANK", raising=False)
    n_tokens, batch = 30_000_000_000, 2_097_152
    run = hyperlaw.init(
        experiment="steplaw",
        family="step-law",
        n_params=400_000_000,
        n_tokens=n_tokens,
        seq_len=2048,
        learning_rate=1.5e-3,
        batch_size_tokens=batch,
        url=server.url,
        token=server.token,
        key=f"own-loop-{fresh_pg[-8:]}",
    )
    steps = n_tokens // batch
    for step in (1, steps // 2, steps):
        run.log({"train_loss": 2.6 + 1.0 / step, "lr": 1.5e-3, "mfu": 0.4}, step=step)
    run.finish(final_loss=2.61, final_eval_loss=2.63, tokens_done=steps * batch)

    after = wait_for(
        lambda: (r := client.recommend(**query))["n_trials"] == before["n_trials"] + 1 and r,
        60,
        "the family's next fit to include the run",
    )
    (trial,) = client.list_trials(idempotency_key=run.key)["data"]
    assert trial["status"] == "completed" and trial["tokens_done"] == steps * batch
    fit = client.get_fit(after["fit_ids"][0])
    assert trial["id"] in fit["trial_ids"] and fit["status"] == "ok"
    assert [p["extras"] for p in client.get_points(trial["id"])["data"]][-1] == {"mfu": 0.4}


def test_worker_command_fits_and_stops_on_sigterm(make_database, tmp_path):
    from server.core.db import upgrade

    url = make_database("sqlite")
    upgrade(url)
    imported(url)
    env = {
        **os.environ,
        "HYPERLAW_DATABASE_URL": url,
        "HYPERLAW_WORKER_POLL_S": "0.2",
        **LIGHT_FITS_ENV,
        "PYTHONPATH": str(REPO_ROOT),
    }
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hyperlaw", "worker"],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    n = 2 * len(FIT_KINDS)
    try:
        wait_for(lambda: len(fits(url)) == n, 180, "the worker's first fits")
        add_completed_trial(url)
        wait_for(lambda: len(fits(url)) == 2 * n, 180, "the worker's refits")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log_path.read_text()
    assert "fitting worker stopped" in log_path.read_text()
    status = {(f.kind, f.status) for f in fits(url)}
    assert status == {
        (RECOMMENDER_KIND, "ok"),
        ("near_optimal", "ok"),
        ("bell", "ok"),
        ("cbs", "insufficient_data"),
    }
    # HYPERLAW_WORKER_N_BOOTSTRAP and HYPERLAW_WORKER_LAW_FORMS reached the worker's fits
    options = [f.params["options"] for f in fits(url, RECOMMENDER_KIND)]
    assert {(o["n_bootstrap"], o["law_forms"]) for o in options} == {(0, False)}


def test_worker_fits_are_the_defaults_unless_the_settings_say_otherwise():
    assert worker_fits() == {"options": {}, "estimators": ESTIMATORS}
    assert worker_fits(law_forms=False)["options"] == {"law_forms": False}
    light = worker_fits(n_bootstrap=0, law_forms=False)
    assert light["options"] == {"law_forms": False, "n_bootstrap": 0}
    assert list(light["estimators"]) == list(ESTIMATORS)
    for kind, estimator in light["estimators"].items():
        assert (estimator.kind, estimator.needs_curves) == (kind, ESTIMATORS[kind].needs_curves)
        assert estimator.fit.func is ESTIMATORS[kind].fit
        assert (estimator.fit.args, estimator.fit.keywords) == ((), {"n_bootstrap": 0})
