"""Soak: clients ingesting points and clients asking for recommendations at once, for a while.

A real ``hyperlaw serve`` (no worker) on a fresh PostgreSQL database with the Step Law sweep
imported and its recommender fitted (light fits). ``--ingest-clients`` clients each post
batches of consecutive steps to a trial of their own, ``--query-clients`` clients each ask
``GET /v1/recommendations`` for random (N, D); every client is a ``client.HyperlawClient``
with its default retry budget, in a thread, spread over ``--processes`` processes per role
(so the load is real parallel work, not one event loop). With ``--kill-api-every S`` the
service is killed (SIGKILL) every S seconds and started again on the same port after
``--down-s`` seconds (default 2).

Afterwards every acknowledged point is looked up in the database: ``lost`` counts
acknowledged points that are not there, ``duplicated`` rows beyond one per (trial, step).
``errors_5xx`` counts answers of 500 and above, whether the client retried them or not;
``failed_calls`` counts calls that raised (none may).

    python benchmarks/load.py [--seconds 60] [--ingest-clients 32] [--query-clients 32]
                              [--batch 1000] [--processes 4] [--kill-api-every S [--down-s 2]]

Throughput is per wall-clock second of the soak; latencies are per call, retries included.
The last line is machine-readable: ``load points_per_s=<float> queries_per_s=<float>
p99_ingest_ms=<float> p99_query_ms=<float> lost=<int> duplicated=<int> errors_5xx=<int>``.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import os
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.live_service import Service, served  # noqa: E402
from client import HyperlawClient  # noqa: E402
from tests.databases import DEFAULT_ADMIN_URL, seed_steplaw  # noqa: E402

log = logging.getLogger("benchmarks.load")


def point(trial_id: int, step: int) -> dict:
    """A loss-curve row, the same whoever sends it."""
    loss = 2.0 + 8.0 / math.sqrt(step + 1) + trial_id * 1e-4
    return {"step": step, "tokens": step * 524_288, "train_loss": loss, "lr": 3e-4}


def _ingest(client: HyperlawClient, trial_id: int, batch: int, until: float, out: dict) -> None:
    acked, latencies, failures = 0, [], []
    while time.time() < until:
        points = [point(trial_id, s) for s in range(acked, acked + batch)]
        began = time.perf_counter()
        try:
            client.post_points(trial_id, points)
        except Exception as exc:  # noqa: BLE001 -- counted and reported: none may happen
            failures.append(f"ingest trial {trial_id}: {type(exc).__name__}: {exc}")
            break
        latencies.append(time.perf_counter() - began)
        acked += batch
    out[trial_id] = (acked, latencies, failures)


def _query(client: HyperlawClient, seed: int, until: float, out: dict) -> None:
    rng = random.Random(seed)
    latencies, failures = [], []
    while time.time() < until:
        n_params = 10 ** rng.uniform(8, 9.5)
        n_tokens = n_params * 20 * 10 ** rng.uniform(-0.5, 1)
        began = time.perf_counter()
        try:
            client.recommend(n_params=round(n_params), n_tokens=round(n_tokens))
        except Exception as exc:  # noqa: BLE001 -- counted and reported: none may happen
            failures.append(f"query {seed}: {type(exc).__name__}: {exc}")
            break
        latencies.append(time.perf_counter() - began)
    out[seed] = (0, latencies, failures)


def client_process(
    role: str,
    url: str,
    token: str,
    keys: list[int],
    batch: int,
    start: float,
    until: float,
    results,
) -> None:
    """One process of ``role`` ("ingest": ``keys`` are trial ids; "query": seeds), a thread
    and a client per key, all starting at ``start`` (wall clock)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out: dict[int, tuple] = {}
    clients = [HyperlawClient(url, token, timeout=30) for _ in keys]
    threads = [
        threading.Thread(
            target=_ingest if role == "ingest" else _query,
            args=(c, k, batch, until, out) if role == "ingest" else (c, k, until, out),
        )
        for c, k in zip(clients, keys, strict=True)
    ]
    time.sleep(max(0.0, start - time.time()))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    causes: Counter[str] = Counter()
    for c in clients:
        causes.update(c.retry_causes)
        c.close()
    results.put((role, out, dict(causes)))


def _percentile_ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _check_stored(database_url: str, acked: dict[int, int]) -> tuple[int, int, int]:
    """(lost, duplicated, unacknowledged rows) over the ingest trials."""
    from sqlalchemy import func, select

    from server.core.db import open_database
    from server.models import Point

    lost = duplicated = extra = 0
    with open_database(database_url) as database, database.engine.connect() as conn:
        for trial_id, n in acked.items():
            rows, distinct, kept = conn.execute(
                select(
                    func.count(),
                    func.count(func.distinct(Point.step)),
                    func.count(func.distinct(Point.step)).filter(Point.step < n),
                ).where(Point.trial_id == trial_id)
            ).one()
            lost += n - kept
            duplicated += rows - distinct
            extra += distinct - kept
    return lost, duplicated, extra


def _chaos(
    service: Service, every_s: float, down_s: float, until: float, restarts: list[float]
) -> None:
    """Kill -9 the service every ``every_s`` seconds, leave it down ``down_s`` seconds, then
    start it again on its port; ``restarts`` gets each outage's length."""
    while time.time() + every_s < until:
        time.sleep(every_s)
        began = time.monotonic()
        service.kill()
        time.sleep(down_s)
        service.start()
        restarts.append(time.monotonic() - began)
        log.info("killed the service; it answered again after %.1f s", restarts[-1])


def run(args: argparse.Namespace) -> int:
    def prepare(url: str) -> None:  # a fit for the queries to answer from
        seed_steplaw(url, light=True)

    with served(args.database_url, prefix="hyperlaw_load", prepare=prepare) as service:
        with HyperlawClient(service.url, service.token) as setup:
            exp = setup.ensure_experiment("load")
            trial_ids = [
                setup.create_trial(
                    experiment_id=exp["id"],
                    n_params=10**8,
                    n_tokens=2 * 10**9,
                    seq_len=2048,
                    learning_rate=3e-4,
                    batch_size_tokens=2048 * 256,
                    idempotency_key=f"load-{i}",
                )["id"]
                for i in range(args.ingest_clients)
            ]
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        start = time.time() + 5.0 + 0.2 * args.processes  # every process imported by then
        until = start + args.seconds
        procs = []
        for role, keys in (("ingest", trial_ids), ("query", list(range(args.query_clients)))):
            for i in range(args.processes):
                share = keys[i :: args.processes]
                if share:
                    procs.append(
                        ctx.Process(
                            target=client_process,
                            args=(
                                role,
                                service.url,
                                service.token,
                                share,
                                args.batch,
                                start,
                                until,
                                results,
                            ),
                        )
                    )
        try:
            for p in procs:
                p.start()
            restarts: list[float] = []
            if args.kill_api_every:
                time.sleep(max(0.0, start - time.time()))
                _chaos(service, args.kill_api_every, args.down_s, until, restarts)
            outcomes = [results.get(timeout=args.seconds + 300) for _ in procs]
            for p in procs:
                p.join(timeout=60)
        finally:  # on any failure here, no client process outlives the run
            for p in procs:
                if p.is_alive():
                    p.kill()
        acked: dict[int, int] = {}
        ingest_lat: list[float] = []
        query_lat: list[float] = []
        failures: list[str] = []
        causes: Counter[str] = Counter()
        for role, out, proc_causes in outcomes:
            causes.update(proc_causes)
            for key, (n, latencies, errs) in out.items():
                failures.extend(errs)
                if role == "ingest":
                    acked[key] = n
                    ingest_lat.extend(latencies)
                else:
                    query_lat.extend(latencies)
        lost, duplicated, extra = _check_stored(service.database_url, acked)
    answered_5xx = sum(n for cause, n in causes.items() if cause.startswith("HTTP 5"))
    raised_5xx = sum("HyperlawAPIError: HTTP 5" in f for f in failures)
    points_per_s = sum(acked.values()) / args.seconds
    queries_per_s = len(query_lat) / args.seconds
    for failure in failures[:20]:
        log.error("%s", failure)
    log.info(
        "%d ingest + %d query clients in %d+%d processes for %.0f s; %d points in %d calls, "
        "%d queries; retried: %s; outages: %s; failed calls: %d; stored beyond "
        "acknowledged: %d",
        args.ingest_clients,
        args.query_clients,
        args.processes,
        args.processes,
        args.seconds,
        sum(acked.values()),
        len(ingest_lat),
        len(query_lat),
        dict(causes) or "none",
        ", ".join(f"{r:.1f} s" for r in restarts) or "none",
        len(failures),
        extra,
    )
    log.info(
        "p50 ingest %.1f ms, p50 query %.1f ms",
        _percentile_ms(ingest_lat, 0.5),
        _percentile_ms(query_lat, 0.5),
    )
    sys.stdout.write(
        f"load points_per_s={points_per_s:.1f} queries_per_s={queries_per_s:.1f} "
        f"p99_ingest_ms={_percentile_ms(ingest_lat, 0.99):.1f} "
        f"p99_query_ms={_percentile_ms(query_lat, 0.99):.1f} lost={lost} "
        f"duplicated={duplicated} errors_5xx={answered_5xx + raised_5xx}\n"
    )
    return 0 if not (failures or lost or duplicated or answered_5xx or raised_5xx) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--ingest-clients", type=int, default=32)
    parser.add_argument("--query-clients", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1000, help="points per ingest call")
    parser.add_argument("--processes", type=int, default=4, help="client processes per role")
    parser.add_argument(
        "--kill-api-every",
        type=float,
        default=None,
        metavar="S",
        help="kill -9 the service every S seconds and restart it",
    )
    parser.add_argument(
        "--down-s", type=float, default=2.0, help="with --kill-api-every: seconds it stays down"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("HYPERLAW_TEST_DATABASE_URL", DEFAULT_ADMIN_URL),
        help="the PostgreSQL server to create the load database on",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
