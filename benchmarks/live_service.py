"""A real ``hyperlaw serve`` on a fresh PostgreSQL database, for the load and fuzz scripts.

    with served(admin_url, prefix="hyperlaw_load") as service:
        service.url, service.token, service.database_url
        service.kill()      # kill -9, as a crash
        service.start()     # again, on the same port

The database is created on the server of ``admin_url``, migrated, given a write token, and
dropped at the end with the server stopped. Importable from the tests (``benchmarks`` is a
namespace package).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.databases import (  # noqa: E402
    create_postgres_database,
    drop_postgres_database,
    hyperlaw_command,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    database_url: str
    token: str
    log_dir: Path
    port: int = field(default_factory=_free_port)
    env: Mapping[str, str] | None = None
    worker: bool = False
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> float:
        """Start ``hyperlaw serve`` on ``port``; returns the seconds until it answered."""
        args = ["serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if not self.worker:
            args.append("--no-worker")
        argv, env = hyperlaw_command(self.database_url, *args, env=self.env)
        self.starts += 1
        log_path = self.log_dir / f"server-{self.starts}.log"
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                argv, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        began = time.monotonic()
        while time.monotonic() - began < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"hyperlaw serve exited:\n{log_path.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return time.monotonic() - began
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"hyperlaw serve did not answer within {timeout_s} s")

    def kill(self) -> None:
        """``kill -9``: in-flight requests are cut, nothing is shut down cleanly."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def served(
    admin_url: str,
    *,
    prefix: str,
    worker: bool = False,
    env: Mapping[str, str] | None = None,
    prepare: Callable[[str], object] | None = None,
) -> Iterator[Service]:
    """A started service on a new database named ``<prefix>_<random>`` of ``admin_url``'s
    server (``postgresql://`` URLs get the installed driver named); ``prepare(url)`` runs on
    the migrated database before the service starts (e.g. to import data)."""
    from server import crud
    from server.core.db import open_database, upgrade
    from server.models import TokenScope

    if admin_url.startswith("postgresql://"):
        admin_url = admin_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    database_url = create_postgres_database(admin_url, prefix)
    service = None
    try:
        upgrade(database_url)
        if prepare is not None:
            prepare(database_url)
        with open_database(database_url) as database, database.session() as session:
            _row, token = crud.create_token(session=session, name=prefix, scope=TokenScope.WRITE)
        with tempfile.TemporaryDirectory(prefix=f"{prefix}-") as tmp:
            service = Service(database_url, token, Path(tmp), env=env, worker=worker)
            service.start()
            try:
                yield service
            finally:
                service.stop()
    finally:
        drop_postgres_database(admin_url, database_url)
