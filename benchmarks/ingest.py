"""Ingest benchmark: loss-curve points per second into PostgreSQL.

Side by side in one run, on the same PostgreSQL server and the same number of points:

- hyperlaw: a real ``hyperlaw serve`` (uvicorn, own process) on loopback; the client posts
  batches of 10,000 points to ``POST /v1/trials/{id}/points`` (one transaction each);
- Optuna: ``RDBStorage`` with ``trial.report(value, step)``, one call per point.

Each side gets its own freshly created database, dropped at the end. Timed: wall clock from
the first point sent to the last one acknowledged, after a warm-up that is not counted;
hyperlaw reports the median of ``--repeats`` rounds (every round is also logged), Optuna's
single pass takes minutes already.

    python benchmarks/ingest.py [--points 50000] [--database-url postgresql://...]

The last line is machine-readable:
``ingest points_per_s=<float> optuna_points_per_s=<float> ratio=<float>``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from client import HyperlawClient  # noqa: E402
from tests.databases import (  # noqa: E402
    DEFAULT_ADMIN_URL,
    hyperlaw_command,
)
from tests.databases import create_postgres_database as create_database  # noqa: E402
from tests.databases import drop_postgres_database as drop_database  # noqa: E402

log = logging.getLogger("benchmarks.ingest")
POINTS_PER_TRIAL = 10_000


def curve(step: int, rng: random.Random) -> dict:
    """A plausible loss-curve row (every field filled, as the trainer sends them)."""
    loss = 2.0 + 8.0 / math.sqrt(step + 1) + rng.gauss(0, 0.01)
    return {
        "step": step,
        "tokens": step * 524_288,
        "train_loss": loss,
        "eval_loss": loss + 0.02,
        "ewa_eval_loss": loss + 0.01,
        "lr": 3e-4,
        "grad_norm": 0.5 + rng.random(),
        "b_simple": 1e5 * (1 + rng.random()),
        "tokens_per_s": 2.5e5,
        "wall_time_s": step * 0.7,
    }


def start_server(database_url: str, log_dir: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ("serve", "--no-worker", "--host", "127.0.0.1", "--port", str(port))
    argv, env = hyperlaw_command(database_url, *args)
    log_file = open(log_dir / "server.log", "wb")
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((log_dir / "server.log").read_text())
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("server did not start within 60 s")


def bench_hyperlaw(admin_url: str, n_points: int, repeats: int = 3) -> float:
    """Median points/s over ``repeats`` rounds of ``n_points`` into fresh trials."""
    from server import crud
    from server.core.db import open_database, upgrade
    from server.models import TokenScope

    url = create_database(admin_url, "hyperlaw_bench")
    proc = None
    try:
        upgrade(url)
        with open_database(url) as database, database.session() as session:
            _row, token = crud.create_token(session=session, name="bench", scope=TokenScope.WRITE)
        with tempfile.TemporaryDirectory() as tmp:
            proc, base_url = start_server(url, Path(tmp))
            client = HyperlawClient(base_url, token, timeout=60)
            exp = client.ensure_experiment("ingest-benchmark")
            n_trials = math.ceil(n_points / POINTS_PER_TRIAL)
            rng = random.Random(0)

            def new_trial(i: int) -> int:
                return client.create_trial(
                    experiment_id=exp["id"],
                    n_params=10**8,
                    n_tokens=10**10,
                    seq_len=2048,
                    learning_rate=3e-4 * (1 + i),
                    batch_size_tokens=2048 * 256,
                )["id"]

            client.post_points(new_trial(0), [curve(s, rng) for s in range(POINTS_PER_TRIAL)])
            rates = []
            for _round in range(repeats):  # fresh trials each round: inserts, not updates
                batches = []
                for i in range(n_trials):
                    size = min(POINTS_PER_TRIAL, n_points - i * POINTS_PER_TRIAL)
                    batches.append((new_trial(i), [curve(s, rng) for s in range(size)]))
                start = time.perf_counter()
                with ThreadPoolExecutor(2) as pool:  # two batches in flight, like post_points
                    list(pool.map(lambda b: client.post_points(*b), batches))
                rates.append(n_points / (time.perf_counter() - start))
                stored = sum(client.get_points(t)["count"] for t, _ in batches)
                if stored != n_points:
                    raise RuntimeError(f"stored {stored} points, sent {n_points}")
            log.info("hyperlaw rounds: %s points/s", ", ".join(f"{r:.0f}" for r in rates))
            client.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=15)
        drop_database(admin_url, url)
    return statistics.median(rates)


def bench_optuna(admin_url: str, n_points: int) -> float:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = create_database(admin_url, "optuna_bench")
    try:
        storage = optuna.storages.RDBStorage(url)
        study = optuna.create_study(study_name="ingest-benchmark", storage=storage)
        warm = study.ask()
        for step in range(100):
            warm.report(1.0, step)
        rng = random.Random(0)
        values = [curve(s, rng)["train_loss"] for s in range(n_points)]
        start = time.perf_counter()
        trial = None
        for i, value in enumerate(values):
            step = i % POINTS_PER_TRIAL
            if step == 0:
                trial = study.ask()
            trial.report(value, step)
        elapsed = time.perf_counter() - start
        storage.remove_session()
        storage.engine.dispose()
    finally:
        drop_database(admin_url, url)
    return n_points / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--points", type=int, default=30_000, help="points per side (and per hyperlaw round)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="hyperlaw rounds (median)")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("HYPERLAW_TEST_DATABASE_URL", DEFAULT_ADMIN_URL),
        help="a PostgreSQL database on the server to use (bench databases are created there)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    admin = args.database_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    ours = bench_hyperlaw(admin, args.points, args.repeats)
    log.info("hyperlaw POST /v1/trials/{id}/points, 10,000/request: %.0f points/s", ours)
    theirs = bench_optuna(admin, args.points)
    log.info("optuna RDBStorage trial.report, one per point:        %.0f points/s", theirs)
    sys.stdout.write(
        f"ingest points_per_s={ours:.1f} optuna_points_per_s={theirs:.1f} "
        f"ratio={ours / theirs:.2f}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
