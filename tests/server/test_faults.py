"""Faults during ingest: the service killed, its PostgreSQL restarted.

- ``kill -9`` of ``hyperlaw serve`` while client processes post points, and a new one on the
  same port a few seconds later: with the client's default retry budget every call succeeds
  and every acknowledged point is stored exactly once.
- A restart of PostgreSQL (a throwaway cluster of this test's own, never the shared one)
  while clients post: meanwhile the service answers 503 with ``Retry-After`` and a body that
  does not repeat the driver's message, and it recovers by itself, without a restart.

A fitting worker killed mid-fit is covered by
``tests/server/worker/test_loop.py::test_killed_worker_leaves_nothing_locked`` (SIGKILL while
it holds the fit's advisory lock: the lock vanishes and the next refit fits).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from client import HyperlawClient
from server.core.db import open_database, upgrade
from server.models import Point
from tests.conftest import LiveServer, free_port, make_token, start_live_server

BATCH = 200  # points per request


def point(trial_id: int, step: int) -> dict:
    return {"step": step, "train_loss": 3.0 + 5.0 / math.sqrt(step + 1) + trial_id * 1e-3}


def _ingest_until(client: HyperlawClient, trial_id: int, stop, acked: dict, errors: list) -> None:
    """Post consecutive batches to ``trial_id`` until ``stop`` is set; ``acked[trial_id]`` is
    the number of points the service acknowledged (steps 0 .. acked - 1)."""
    acked[trial_id] = 0
    try:
        while not stop.is_set():
            first = acked[trial_id]
            client.post_points(trial_id, [point(trial_id, s) for s in range(first, first + BATCH)])
            acked[trial_id] = first + BATCH
    except Exception as exc:  # noqa: BLE001 -- reported to the test, which fails on it
        errors.append(f"trial {trial_id}: {type(exc).__name__}: {exc}")


def ingest_process(url: str, token: str, trial_ids: list[int], ready, stop, results) -> None:
    """One client process: a thread per trial, sharing one client with the default budget."""
    acked: dict[int, int] = {}
    errors: list[str] = []
    with HyperlawClient(url, token) as client:
        threads = [
            threading.Thread(target=_ingest_until, args=(client, t, stop, acked, errors))
            for t in trial_ids
        ]
        ready.wait()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results.put((acked, errors, client.retries))


def _make_trials(client: HyperlawClient, n: int, name: str) -> list[int]:
    exp = client.ensure_experiment(name)
    fields = dict(n_params=1, n_tokens=1, seq_len=1, learning_rate=1e-3, batch_size_tokens=1)
    return [
        client.create_trial(experiment_id=exp["id"], idempotency_key=f"t{i}", **fields)["id"]
        for i in range(n)
    ]


def _stored(database_url: str, trial_ids: list[int]) -> dict[int, tuple[int, int, int, int]]:
    """Per trial: rows, distinct steps, lowest and highest step."""
    out = {}
    with open_database(database_url) as database, database.engine.connect() as conn:
        for trial_id in trial_ids:
            n, distinct, low, high = conn.execute(
                select(
                    func.count(),
                    func.count(func.distinct(Point.step)),
                    func.min(Point.step),
                    func.max(Point.step),
                ).where(Point.trial_id == trial_id)
            ).one()
            out[trial_id] = (n, distinct, low, high)
    return out


def _expected(acked: dict[int, int]) -> dict[int, tuple[int, int, int, int]]:
    return {t: (n, n, 0, n - 1) for t, n in acked.items()}


@pytest.mark.timeout(120)
def test_kill_9_of_the_service_loses_and_duplicates_nothing(fresh_pg, tmp_path):
    port = free_port()
    token = make_token(fresh_pg)
    server = start_live_server(fresh_pg, log_dir=tmp_path, port=port, token=token)
    with HyperlawClient(server.url, token) as client:
        trial_ids = _make_trials(client, 6, "faults-kill")
    ctx = mp.get_context("spawn")
    ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=ingest_process, args=(server.url, token, trial_ids[i::3], ready, stop, results)
        )
        for i in range(3)  # 3 processes x 2 threads
    ]
    for p in procs:
        p.start()
    try:
        ready.set()
        deadline = time.monotonic() + 60  # spawned processes take a while to import
        while sum(n for n, *_ in _stored(fresh_pg, trial_ids).values()) == 0:
            assert time.monotonic() < deadline, "no point arrived within 60 s"
            time.sleep(0.2)
        time.sleep(1.0)
        server.process.send_signal(signal.SIGKILL)  # mid-request: nothing shuts down cleanly
        server.process.wait(timeout=10)
        before = sum(n for n, *_ in _stored(fresh_pg, trial_ids).values())
        time.sleep(3.0)  # down for 3 s plus its start-up
        server = start_live_server(fresh_pg, log_dir=tmp_path, port=port, token=token)
        time.sleep(2.0)
        stop.set()
        outcomes = [results.get(timeout=90) for _ in procs]
        for p in procs:
            p.join(timeout=30)
    finally:
        stop.set()
        server.stop()
        for p in procs:
            if p.is_alive():
                p.kill()
    acked = {t: n for a, _, _ in outcomes for t, n in a.items()}
    errors = [e for _, errs, _ in outcomes for e in errs]
    assert errors == []
    assert all(retries > 0 for *_, retries in outcomes), outcomes  # each process lived it
    assert 0 < before < sum(acked.values())  # points went in before the kill and after it
    assert _stored(fresh_pg, trial_ids) == _expected(acked)


# --- a PostgreSQL of our own, to restart ----------------------------------------------------


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout
        candidate = Path(bindir.strip()) / name
        if candidate.exists():
            return str(candidate)
    pytest.skip(f"no PostgreSQL server binaries ({name}) to start a throwaway cluster with")


@dataclass
class ThrowawayPostgres:
    """A PostgreSQL cluster in a temporary directory on a free port, for this test alone.
    Run as the ``postgres`` user when the tests run as root (initdb refuses root)."""

    root: Path
    port: int

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        user = "postgres" if os.geteuid() == 0 else None
        return subprocess.run(
            argv, user=user, capture_output=True, text=True, timeout=60, check=check
        )

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        self._run(
            _pg_bin("initdb"),
            "-D",
            str(self.root / "data"),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            _pg_bin("pg_ctl"),
            "-D",
            str(self.root / "data"),
            "-l",
            str(self.root / "log"),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(
            _pg_bin("pg_ctl"), "-D", str(self.root / "data"), "-m", mode, "-w", "stop", check=False
        )


@pytest.fixture
def own_postgres() -> Iterator[ThrowawayPostgres]:
    root = Path(tempfile.mkdtemp(prefix="hyperlaw-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    pg = ThrowawayPostgres(root, free_port())
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def _probe(
    server: LiveServer, trial_id: int, stop: threading.Event, seen: list, errors: list
) -> None:
    """Raw requests without retries, every 50 ms: (time, status, Retry-After, body)."""
    headers = {"Authorization": f"Bearer {server.token}"}
    step = 10**6
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as http:
        while not stop.is_set():
            step += 1
            for method, path, body in (
                ("POST", f"/v1/trials/{trial_id}/points", {"points": [point(trial_id, step)]}),
                ("GET", f"/v1/trials/{trial_id}", None),
            ):
                try:
                    r = http.request(method, path, json=body)
                except httpx.TransportError as exc:  # the service itself must stay up
                    errors.append(f"probe: {type(exc).__name__}: {exc}")
                    return
                seen.append((time.monotonic(), r.status_code, r.headers.get("Retry-After"), r.text))
            time.sleep(0.05)


@pytest.mark.timeout(120)
def test_a_postgres_restart_answers_503_and_recovers_by_itself(own_postgres, tmp_path):
    upgrade(own_postgres.url)
    server = start_live_server(own_postgres.url, log_dir=tmp_path)
    stop = threading.Event()
    acked: dict[int, int] = {}
    errors: list[str] = []
    seen: list[tuple[float, int, str | None, str]] = []
    try:
        with HyperlawClient(server.url, server.token) as client:
            trial_ids = _make_trials(client, 3, "faults-postgres")
            workers = [
                threading.Thread(target=_ingest_until, args=(client, t, stop, acked, errors))
                for t in trial_ids[:2]
            ]
            workers.append(
                threading.Thread(target=_probe, args=(server, trial_ids[2], stop, seen, errors))
            )
            for w in workers:
                w.start()
            time.sleep(1.5)
            own_postgres.stop("immediate")  # as a crash: in-flight transactions are cut
            down_at = time.monotonic()
            time.sleep(2.5)
            own_postgres.start()
            up_at = time.monotonic()
            time.sleep(3.0)
            stop.set()
            for w in workers:
                w.join(timeout=90)
            still_up = server.process.poll() is None
    finally:
        stop.set()
        server.stop()
    assert errors == []
    statuses = [s for _, s, _, _ in seen]
    assert 503 in statuses, statuses
    failures = [(s, retry, body) for _, s, retry, body in seen if s >= 500]
    assert {s for s, _, _ in failures} == {503}, failures
    for _, retry_after, body in failures:
        assert retry_after is not None and float(retry_after) > 0
        for leak in ("psycopg", "OperationalError", "sqlalchemy", str(own_postgres.port)):
            assert leak not in body, body
    assert all(s < 400 for t, s, _, _ in seen if t < down_at - 0.5), statuses
    recovered = [s for t, s, _, _ in seen if t > up_at + 1.5]
    assert recovered and all(s < 400 for s in recovered), recovered
    assert still_up  # the same process throughout: it was never restarted
    assert _stored(own_postgres.url, trial_ids[:2]) == _expected(acked)
