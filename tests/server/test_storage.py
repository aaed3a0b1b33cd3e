"""Storage details: non-finite floats stored as what they are on both databases,
NOTIFY on completed and imported trials (PostgreSQL), idempotent creation under a race."""

from __future__ import annotations

import math
import select as select_module
import threading
import time
import uuid

import psycopg2
from sqlalchemy import text

from server import crud, points
from server.core.db import Database, session_scope
from server.models import Fit, Trial
from server.point_schemas import PointIn
from server.schemas import ExperimentCreate, TrialCreate, TrialUpdate


def _session(url):
    database = Database.from_url(url)
    return database.engine, database.sessions


def _trial_in(experiment_id: int, **fields) -> TrialCreate:
    return TrialCreate(
        experiment_id=experiment_id,
        n_params=10**6,
        n_tokens=10**8,
        seq_len=128,
        learning_rate=1e-3,
        batch_size_tokens=4096,
        **fields,
    )


def test_nonfinite_floats_are_stored_faithfully(db_url):
    engine, factory = _session(db_url)
    try:
        with session_scope(factory) as s:
            exp, _ = crud.create_experiment(
                session=s, experiment_in=ExperimentCreate(name=f"nonfinite-{uuid.uuid4().hex[:6]}")
            )
            trial, _ = crud.create_trial(
                session=s,
                trial_in=_trial_in(exp.id, final_loss=math.nan, final_eval_loss=-math.inf),
            )
            points.upsert_points(
                session=s,
                trial_id=trial.id,
                points=[
                    PointIn(
                        step=1,
                        train_loss=math.nan,
                        eval_loss=math.inf,
                        lr=-math.inf,
                        grad_norm=None,
                        b_simple=2.5,
                    )
                ],
            )
            s.add(
                Fit(
                    kind="k",
                    scope=f"s-{trial.id}",
                    status="failed",
                    n_trials=0,
                    data_watermark="w",
                    params={"x": math.nan, "y": [math.inf, 1.0]},
                )
            )
        with session_scope(factory) as s:
            got = s.get(Trial, trial.id)
            assert math.isnan(got.final_loss) and got.final_eval_loss == -math.inf
            rows, count = points.get_points(session=s, trial_id=trial.id)
            p = rows[0]
            assert count == 1 and math.isnan(p["train_loss"]) and p["eval_loss"] == math.inf
            assert p["lr"] == -math.inf and p["grad_norm"] is None and p["b_simple"] == 2.5
            fit = crud.latest_fit(session=s, scope=f"s-{trial.id}")
            assert math.isnan(fit.params["x"]) and fit.params["y"] == [math.inf, 1.0]
        with engine.connect() as conn:  # not NULL underneath: NaN is a value, not missing
            n_null = conn.execute(
                text("SELECT count(*) FROM points WHERE trial_id = :t AND train_loss IS NULL"),
                {"t": trial.id},
            ).scalar()
            assert n_null == 0
            if engine.dialect.name == "postgresql":
                assert (
                    conn.execute(
                        text(
                            "SELECT train_loss = 'NaN'::float8 AND eval_loss = 'Infinity'::float8 "
                            "FROM points WHERE trial_id = :t"
                        ),
                        {"t": trial.id},
                    ).scalar()
                    is True
                )
    finally:
        engine.dispose()


def test_concurrent_creation_with_one_idempotency_key_makes_one_trial(db_url):
    engine, factory = _session(db_url)
    try:
        with session_scope(factory) as s:
            exp, _ = crud.create_experiment(
                session=s, experiment_in=ExperimentCreate(name=f"race-{uuid.uuid4().hex[:6]}")
            )
        results, errors = [], []

        def create() -> None:
            try:
                with session_scope(factory) as s:
                    trial, created = crud.create_trial(
                        session=s, trial_in=_trial_in(exp.id, idempotency_key="same")
                    )
                    results.append((trial.id, created))
            except BaseException as exc:  # noqa: BLE001 -- whatever it is, asserted below
                errors.append(exc)

        threads = [threading.Thread(target=create) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len({trial_id for trial_id, _ in results}) == 1
        assert sum(created for _, created in results) == 1
    finally:
        engine.dispose()


def test_completed_and_imported_trials_notify(pg_url):
    listener = psycopg2.connect(pg_url.replace("postgresql+psycopg2://", "postgresql://"))
    listener.autocommit = True
    listener.cursor().execute("LISTEN hyperlaw_trials")
    engine, factory = _session(pg_url)
    try:
        with session_scope(factory) as s:
            exp, _ = crud.create_experiment(
                session=s, experiment_in=ExperimentCreate(name=f"notify-{uuid.uuid4().hex[:6]}")
            )
            trained, _ = crud.create_trial(session=s, trial_in=_trial_in(exp.id))
            imported, _ = crud.create_trial(
                session=s,
                trial_in=_trial_in(exp.id, source="imported", status="completed", final_loss=3.0),
            )
        with session_scope(factory) as s:
            crud.update_trial(
                session=s, trial_id=trained.id, trial_in=TrialUpdate(status="running")
            )
        with session_scope(factory) as s:
            crud.update_trial(
                session=s,
                trial_id=trained.id,
                trial_in=TrialUpdate(status="completed", final_loss=2.9),
            )
        payloads: list[str] = []
        deadline = time.monotonic() + 5
        while len(payloads) < 2 and time.monotonic() < deadline:
            select_module.select([listener], [], [], 0.2)
            listener.poll()
            while listener.notifies:
                payloads.append(listener.notifies.pop(0).payload)
        assert payloads == [str(imported.id), str(trained.id)]
    finally:
        engine.dispose()
        listener.close()
