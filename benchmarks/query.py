"""Query benchmark: requests/s and latency of ``GET /v1/recommendations`` under load.

Creates a fresh PostgreSQL database (dropped at the end), imports the bundled Step Law sweep
(Li et al. 2025, arXiv:2503.04715) and fits it, starts ``hyperlaw serve`` on a free loopback
port, then drives it with a lean asyncio HTTP/1.1 keep-alive load generator in this process
(``--connections`` concurrent connections, each sending its next request when the previous
answer arrived) for ``--seconds`` after a warm-up, capped at ``--max-requests``. Latency is
per request, from writing it to reading the whole body. The load generator shares the
machine's cores with the server. Once the server is saturated, more connections add only
queueing: latency ≈ connections / throughput (Little's law), hence the modest default.

Usage: ``python benchmarks/query.py [--connections 8] [--seconds 10]``. The last line is
``query rps=<float> p50_ms=<float> p99_ms=<float>``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.databases import (  # noqa: E402
    DEFAULT_ADMIN_URL,
    create_postgres_database,
    drop_postgres_database,
    hyperlaw_command,
)

log = logging.getLogger("benchmarks.query")
QUERIES = [
    "/v1/recommendations?n_params=1e9&n_tokens=1e11",
    "/v1/recommendations?n_params=3e8&n_tokens=2e10&seq_len=4096",
    "/v1/recommendations?n_params=7e8&n_tokens=5e10&batch_size_tokens=1048576",
    "/v1/recommendations?n_params=5e8&n_tokens=1e11",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _driver_url(url: str) -> str:
    """Name psycopg2 explicitly (the installed driver) in a plain postgresql:// URL."""
    if url.startswith("postgresql://"):
        return url.replace("postgresql://", "postgresql+psycopg2://", 1)
    return url


def seed(url: str) -> None:
    from server.core.db import open_database, upgrade
    from server.importers import import_steplaw
    from server.worker.loop import refit_once

    upgrade(url)
    with open_database(url) as database:
        _exp, created, _ = import_steplaw(database)
        outcomes = refit_once(database)
    log.info(
        "seeded %d Step Law trials; fits: %s",
        created,
        ", ".join(f"{o.scope}={o.status}" for o in outcomes),
    )


def start_server(url: str, port: int, log_path: Path) -> subprocess.Popen:
    argv, env = hyperlaw_command(url, "serve", "--host", "127.0.0.1", "--port", str(port))
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"hyperlaw serve exited: {log_path.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("hyperlaw serve did not start within 60 s")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response with Content-Length; returns its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    if length:
        await reader.readexactly(length)
    return status


async def _connection(
    port: int,
    requests: list[bytes],
    stop_at: float,
    measure_from: float,
    budget: list[int],
    latencies: list[float],
    errors: list[int],
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while budget[0] > 0:
            now = time.perf_counter()
            if now >= stop_at:
                break
            writer.write(requests[i % len(requests)])
            i += 1
            status = await _read_response(reader)
            done = time.perf_counter()
            if now >= measure_from:
                budget[0] -= 1
                latencies.append(done - now)
                if status != 200:
                    errors.append(status)
    finally:
        writer.close()


async def load(
    port: int, connections: int, seconds: float, warmup: float, max_requests: int
) -> tuple[list[float], list[int], float]:
    requests = [f"GET {q} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() for q in QUERIES]
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds
    latencies: list[float] = []
    errors: list[int] = []
    budget = [max_requests]
    await asyncio.gather(
        *[
            _connection(
                port,
                requests[c % len(requests) :] + requests[: c % len(requests)],
                stop_at,
                measure_from,
                budget,
                latencies,
                errors,
            )
            for c in range(connections)
        ]
    )
    elapsed = min(time.perf_counter(), stop_at) - measure_from
    return latencies, errors, elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument(
        "--admin-url", default=os.environ.get("HYPERLAW_TEST_DATABASE_URL", DEFAULT_ADMIN_URL)
    )
    args = parser.parse_args(argv)
    args.admin_url = _driver_url(args.admin_url)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, value in (
        ("connections", args.connections),
        ("seconds", args.seconds),
        ("max-requests", args.max_requests),
    ):
        if not value > 0:
            parser.error(f"--{name} must be > 0")

    url = create_postgres_database(args.admin_url, "hyperlaw_bench")
    proc = None
    try:
        seed(url)
        port = free_port()
        proc = start_server(url, port, Path(tempfile.gettempdir()) / f"hyperlaw-bench-{port}.log")
        cpu_before = cpu_seconds(proc.pid)
        latencies, errors, elapsed = asyncio.run(
            load(port, args.connections, args.seconds, args.warmup, args.max_requests)
        )
        cpu_after = cpu_seconds(proc.pid)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        drop_postgres_database(args.admin_url, url)
    if errors:
        log.error(
            "%d of %d requests failed (status %s)", len(errors), len(latencies), sorted(set(errors))
        )
        return 1
    ms = np.asarray(latencies) * 1e3
    rps = len(ms) / elapsed
    p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    log.info(
        "%d requests over %d connections in %.1f s (after %.1f s warm-up): "
        "%.0f requests/s, p50 %.2f ms, p90 %.2f ms, p99 %.2f ms, max %.2f ms",
        len(ms),
        args.connections,
        elapsed,
        args.warmup,
        rps,
        p50,
        float(np.percentile(ms, 90)),
        p99,
        float(ms.max()),
    )
    if cpu_before is not None and cpu_after is not None:
        # includes the warm-up requests, which are not counted in len(ms)
        log.info(
            "server CPU: %.2f s over %.1f s of load (%.0f %% of one core)",
            cpu_after - cpu_before,
            elapsed + args.warmup,
            100 * (cpu_after - cpu_before) / (elapsed + args.warmup),
        )
    sys.stdout.write(f"query rps={rps:.1f} p50_ms={p50:.3f} p99_ms={p99:.3f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
