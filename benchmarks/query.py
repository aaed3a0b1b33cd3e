"""Query benchmark: ``GET /v1/recommendations`` under load, beside the physical limit.

Creates a fresh PostgreSQL database (dropped at the end), imports the bundled Step Law sweep
(Li et al. 2025, arXiv:2503.04715) and fits it, starts ``hyperlaw serve`` on a free loopback
port and, beside it, a *bare* endpoint: a one-route FastAPI app in its own process, served
by uvicorn with the same settings (one worker, 127.0.0.1, no access log), that answers the
same requests with the very bytes hyperlaw answered them with and does nothing else. Its
requests/s is the limit of this stack on this machine; ``ratio`` = hyperlaw / bare.

The load comes from another process: wrk (``apt-get install wrk``; a Lua script rotates the
four queries below over ``--connections`` keep-alive connections and reports requests,
errors and latency percentiles). Without wrk the script says how to install it and falls
back to a Python load generator in a separate process (this file, ``--load-generator``: an
asyncio HTTP/1.1 client). Both targets get the same load, in ABBA order over ``--rounds``
pairs so that drift in the machine's other load cancels; each run follows ``--warmup``
seconds of uncounted load. Requests/s is summed over the rounds, p99 is the worst round's.
The load generator shares the machine's cores with the servers. Once a server is
saturated, more connections add only queueing (latency ≈ connections / throughput, Little's
law), hence the modest default.

Usage: ``python benchmarks/query.py [--connections 8] [--seconds 10] [--rounds 2]
[--python-load]``. The
last line is ``query rps=<float> bare_rps=<float> ratio=<float> p99_ms=<float>`` (p99 of
hyperlaw).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request, Response

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
# wrk: one Lua state per thread; done() prints one JSON line for this script to read
WRK_SCRIPT = """
local paths = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[i %% #paths + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %%d, "seconds": %%.6f, "errors": %%d, "p50_ms": %%.4f, "p99_ms": %%.4f}\\n',
    summary.requests, summary.duration / 1e6,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3))
end
"""


@dataclass
class Run:
    """One timed load run against one server."""

    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def start_process(argv: list[str], env: dict[str, str], port: int, log_path: Path):
    """Start a server process and wait until ``port`` accepts connections."""
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[2:]} exited: {log_path.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"{argv[2:]} did not start within 60 s")


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def serve_bare(port: int, bodies_path: Path) -> None:
    """The bare endpoint (module docstring): the stored body of each query string, as
    ``hyperlaw serve`` runs uvicorn (``server.cli.cmd_serve``)."""
    import uvicorn

    bodies = {k.encode(): v.encode() for k, v in json.loads(bodies_path.read_text()).items()}
    app = FastAPI()

    @app.get("/v1/recommendations")
    async def recommendations(request: Request) -> Response:
        return Response(bodies[request.scope["query_string"]], media_type="application/json")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the Python load generator (a separate process; used without wrk) ----------------------


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response with Content-Length; returns its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    if length:
        await reader.readexactly(length)
    return int(head[9:12])


async def _python_load(port: int, connections: int, seconds: float) -> Run:
    requests = [f"GET {q} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() for q in QUERIES]
    stop_at = time.perf_counter() + seconds
    latencies: list[float] = []
    errors = [0]

    async def connection(offset: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = offset
        try:
            while (sent := time.perf_counter()) < stop_at:
                writer.write(requests[i % len(requests)])
                i += 1
                if await _read_response(reader) != 200:
                    errors[0] += 1
                latencies.append(time.perf_counter() - sent)
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*[connection(c) for c in range(connections)])
    ms = sorted(x * 1e3 for x in latencies)
    return Run(
        len(ms), time.perf_counter() - start, errors[0], ms[len(ms) // 2], ms[len(ms) * 99 // 100]
    )


def load(port: int, seconds: int, args: argparse.Namespace, wrk: list[str] | None) -> Run:
    """One load run from another process: ``wrk`` (the command but its duration and URL),
    else this file's ``--load-generator``."""
    if wrk is None:
        argv = [sys.executable, __file__, "--load-generator", str(port)]
        argv += ["--connections", str(args.connections), "--seconds", str(seconds)]
    else:
        argv = [*wrk, "-d", f"{seconds}s", f"http://127.0.0.1:{port}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=True)
    return Run(**json.loads(done.stdout.strip().splitlines()[-1]))


def measure(name: str, port: int, pid: int, args: argparse.Namespace, wrk: list[str] | None) -> Run:
    if args.warmup:
        load(port, args.warmup, args, wrk)
    cpu_before = cpu_seconds(pid)
    run = load(port, args.seconds, args, wrk)
    cpu_after = cpu_seconds(pid)
    cpu = (
        ""
        if cpu_before is None or cpu_after is None
        else (f", server CPU {100 * (cpu_after - cpu_before) / run.seconds:.0f} % of one core")
    )
    log.info(
        "%-8s %6d requests in %.1f s: %6.0f requests/s, p50 %.2f ms, p99 %.2f ms%s",
        name, run.requests, run.seconds, run.requests / run.seconds, run.p50_ms, run.p99_ms, cpu,
    )  # fmt: skip
    if run.errors:
        raise RuntimeError(f"{name}: {run.errors} of {run.requests} requests failed")
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--seconds", type=int, default=10, help="per timed run (whole, as wrk)")
    parser.add_argument("--warmup", type=int, default=2, help="before each timed run (0: none)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds of one timed run per server, order alternating (ABBA)",
    )
    parser.add_argument(
        "--admin-url", default=os.environ.get("HYPERLAW_TEST_DATABASE_URL", DEFAULT_ADMIN_URL)
    )
    parser.add_argument(
        "--python-load", action="store_true", help="the Python load generator even with wrk"
    )
    parser.add_argument("--load-generator", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--bodies", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare is not None:
        serve_bare(args.serve_bare, args.bodies)
        return 0
    if args.load_generator is not None:
        run = asyncio.run(_python_load(args.load_generator, args.connections, args.seconds))
        sys.stdout.write(json.dumps(run.__dict__) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("connections", "threads", "seconds", "rounds"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.admin_url.startswith("postgresql://"):  # name the installed driver
        args.admin_url = args.admin_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    tmp = Path(tempfile.mkdtemp(prefix="hyperlaw-bench-"))
    found, wrk = None if args.python_load else shutil.which("wrk"), None
    if found is not None:
        (tmp / "load.lua").write_text(WRK_SCRIPT % ", ".join(f'"{q}"' for q in QUERIES))
        wrk = [found, "-s", str(tmp / "load.lua"), "-t", str(args.threads)]
        wrk += ["-c", str(args.connections), "--timeout", "10s"]
    elif not args.python_load:
        log.warning(
            "wrk not found: install it (Debian/Ubuntu: apt-get install wrk; macOS: brew install "
            "wrk); falling back to this script's Python load generator, a separate process"
        )

    url = create_postgres_database(args.admin_url, "hyperlaw_bench")
    procs: list[subprocess.Popen] = []
    runs: dict[str, list[Run]] = {"hyperlaw": [], "bare": []}
    try:
        seed(url)
        port = free_port()
        argv_, env = hyperlaw_command(url, "serve", "--host", "127.0.0.1", "--port", str(port))
        procs.append(start_process(argv_, env, port, tmp / "hyperlaw.log"))
        bodies = {}
        for query in QUERIES:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{query}") as answer:
                bodies[query.split("?", 1)[1]] = answer.read().decode()
        (tmp / "bodies.json").write_text(json.dumps(bodies))
        bare_port = free_port()
        argv_ = [sys.executable, __file__, "--serve-bare", str(bare_port)]
        argv_ += ["--bodies", str(tmp / "bodies.json")]
        procs.append(start_process(argv_, dict(os.environ), bare_port, tmp / "bare.log"))
        log.info(
            "load: %s, %d connections, %d s per run after %d s warm-up; bodies %s bytes",
            "wrk" if wrk else "Python load generator",
            args.connections, args.seconds, args.warmup,
            "/".join(str(len(b)) for b in bodies.values()),
        )  # fmt: skip
        targets = {"hyperlaw": (port, procs[0].pid), "bare": (bare_port, procs[1].pid)}
        for i in range(args.rounds):
            for name in ("hyperlaw", "bare") if i % 2 == 0 else ("bare", "hyperlaw"):
                runs[name].append(measure(name, *targets[name], args, wrk))
    finally:
        for proc in procs:
            stop_process(proc)
        drop_postgres_database(args.admin_url, url)
        shutil.rmtree(tmp, ignore_errors=True)
    rps, bare_rps = (
        sum(r.requests for r in runs[n]) / sum(r.seconds for r in runs[n])
        for n in ("hyperlaw", "bare")
    )
    p99 = max(r.p99_ms for r in runs["hyperlaw"])
    log.info("hyperlaw %.0f requests/s = %.0f %% of the bare endpoint's %.0f", rps,
             100 * rps / bare_rps, bare_rps)  # fmt: skip
    sys.stdout.write(
        f"query rps={rps:.1f} bare_rps={bare_rps:.1f} ratio={rps / bare_rps:.3f} p99_ms={p99:.3f}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
