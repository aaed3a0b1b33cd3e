"""Eight processes ingest overlapping points for the same trials at once, through a server
that is not up yet when they start and that is restarted while they post: the clients'
retries must lose nothing and duplicate nothing."""

from __future__ import annotations

import math
import multiprocessing as mp
import random
import time
import uuid

import pytest
from sqlalchemy import func, select

from server.core.db import open_database
from server.models import Experiment, Point, Trial
from tests.conftest import free_port, make_token, start_live_server

N_PROCESSES = 8
N_STEPS = 2_000


def expected_point(trial_id: int, step: int) -> dict:
    """Every writer sends the same values for a (trial, step), so any winner is right."""
    loss = 3.0 + 5.0 / math.sqrt(step + 1) + (trial_id % 7) * 0.01
    return {
        "step": step,
        "tokens": step * 4096,
        "train_loss": loss,
        "eval_loss": math.nan if step % 97 == 0 else loss + 0.05,
        "lr": 1e-3,
        "grad_norm": 1.0 / (step + 1),
    }


def ingest(url: str, token: str, trial_ids: list[int], seed: int, ready, failures, retries) -> None:
    from client import HyperlawClient

    rng = random.Random(seed)
    client = HyperlawClient(url, token, timeout=10, max_retries=15, backoff_s=0.05)
    try:
        work = []
        for trial_id in trial_ids:
            steps = list(range(N_STEPS))
            rng.shuffle(steps)
            steps += rng.sample(range(N_STEPS), 100)  # some steps twice
            pos = 0
            while pos < len(steps):
                size = rng.randint(20, 400)
                work.append((trial_id, steps[pos : pos + size]))
                pos += size
        rng.shuffle(work)
        ready.wait()
        for trial_id, chunk in work:
            client.post_points(trial_id, [expected_point(trial_id, s) for s in chunk])
        retries.put(client.retries)
    except Exception as exc:  # noqa: BLE001 -- any error is reported to the parent, which fails
        failures.put(f"process {seed}: {type(exc).__name__}: {exc}")
    finally:
        client.close()


def _make_trials(url: str, n: int) -> list[int]:
    with open_database(url) as database, database.session() as session:
        exp = Experiment(name=f"concurrency-{uuid.uuid4().hex[:8]}")
        session.add(exp)
        session.flush()
        trials = [
            Trial(
                experiment_id=exp.id,
                n_params=1,
                n_tokens=1,
                seq_len=1,
                learning_rate=1e-3,
                batch_size_tokens=1,
            )
            for _ in range(n)
        ]
        session.add_all(trials)
        session.flush()
        return [t.id for t in trials]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_concurrent_ingest_with_retries_loses_and_duplicates_nothing(request, tmp_path, backend):
    db_url = request.getfixturevalue("pg_url" if backend == "postgresql" else "sqlite_url")
    trial_ids = _make_trials(db_url, 2)
    token = make_token(db_url)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ctx = mp.get_context("spawn")
    ready, failures, retries = ctx.Event(), ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=ingest, args=(url, token, trial_ids, seed, ready, failures, retries))
        for seed in range(N_PROCESSES)
    ]
    for p in procs:
        p.start()
    ready.set()  # the clients start posting while nothing listens on the port yet
    time.sleep(0.3)
    server = start_live_server(db_url, log_dir=tmp_path, port=port, token=token)
    try:
        time.sleep(1.0)
        server.stop()  # drop in-flight requests; the clients retry into the new server
        server = start_live_server(db_url, log_dir=tmp_path, port=port, token=token)
        for p in procs:
            p.join(timeout=180)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        errors = []
        while not failures.empty():
            errors.append(failures.get())
        assert errors == []
        retried = [retries.get(timeout=5) for _ in procs]
        assert all(n > 0 for n in retried), retried  # every client had to retry
    finally:
        server.stop()
        for p in procs:
            if p.is_alive():
                p.terminate()

    with open_database(db_url) as database, database.engine.connect() as conn:
        for trial_id in trial_ids:
            n, distinct = conn.execute(
                select(func.count(), func.count(func.distinct(Point.step))).where(
                    Point.trial_id == trial_id
                )
            ).one()
            assert (n, distinct) == (N_STEPS, N_STEPS)
            rows = conn.execute(
                select(Point).where(Point.trial_id == trial_id).order_by(Point.step)
            ).all()
            for row in rows:
                want = expected_point(trial_id, row.step)
                assert row.train_loss == want["train_loss"]
                assert row.tokens == want["tokens"]
                assert (
                    math.isnan(row.eval_loss)
                    if row.step % 97 == 0
                    else row.eval_loss == want["eval_loss"]
                )
