"""``hyperlaw export EXPERIMENT [--format csv|parquet] [-o FILE]``: an experiment's trials and
loss-curve points as one CSV or Parquet file; ``server.cli`` registers it with its own.

The experiment is named by id or by name. With ``--url`` (else ``HYPERLAW_URL`` when set) the
command downloads ``GET /v1/experiments/{id}/export`` from that service (a token, where reads
need one, from ``HYPERLAW_TOKEN``); otherwise it reads the database of
``HYPERLAW_DATABASE_URL`` and writes the same rows with the same functions
(``server.export``). Without ``-o`` the file goes to stdout (Parquet only where stdout is not
a terminal). Exit codes as in ``server.cli``: 0 done, 1 the service could not be reached, 2
an unknown experiment or an unusable database.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

from server.cli_data import ASK_SERVER_HELP, ask_server, service_url, store

if TYPE_CHECKING:
    from client import HyperlawClient

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` to the ``hyperlaw`` parser."""
    exp = subparsers.add_parser(
        "export", help="an experiment's trials and loss curves as one CSV or Parquet file"
    )
    exp.add_argument("experiment", help="experiment id or name")
    exp.add_argument("--format", choices=["csv", "parquet"], default="csv", help="default: csv")
    exp.add_argument("-o", "--output", help="the file to write (default: stdout)")
    exp.add_argument("--url", help=ASK_SERVER_HELP)
    exp.set_defaults(func=cmd_export)


@contextmanager
def _sink(output: str | None) -> Iterator[IO[bytes]]:
    if output is None:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with open(output, "wb") as file:
        yield file


def _from_database(experiment: str, fmt: str, sink_path: str | None) -> int:
    from sqlalchemy import select

    from server import export
    from server.models import Experiment

    # a reader: plain deferred transactions on SQLite, never the write lock for long
    with store(sqlite_immediate=False) as database:
        with database.session() as session:
            if experiment.isdigit():
                found = session.get(Experiment, int(experiment))
                experiment_id = None if found is None else found.id
            else:
                named = select(Experiment.id).where(Experiment.name == experiment)
                experiment_id = session.scalar(named)
        if experiment_id is None:
            log.error("experiment %r not found", experiment)
            return 2
        rows = export.export_rows(database, experiment_id)
        with _sink(sink_path) as sink:
            if fmt == "parquet" and sink_path is None:  # pyarrow writes files, not pipes
                with tempfile.TemporaryFile() as file:
                    export.write_parquet(rows, file)
                    file.seek(0)
                    shutil.copyfileobj(file, sink)
            elif fmt == "parquet":
                export.write_parquet(rows, sink)
            else:
                for text in export.csv_chunks(rows):
                    sink.write(text.encode("utf-8"))
    return 0


def _from_service(url: str, experiment: str, fmt: str, sink_path: str | None) -> int:
    import httpx

    def find(client: HyperlawClient) -> dict[str, Any] | None:
        if experiment.isdigit():
            return client.get_experiment(int(experiment))
        found = client.list_experiments(name=experiment)["data"]
        return found[0] if found else None

    answer = ask_server(url, find)
    if isinstance(answer, int):
        return answer
    if answer is None:
        log.error("experiment %r not found", experiment)
        return 2
    experiment_id = answer["id"]
    token = os.environ.get("HYPERLAW_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    path = f"{url.rstrip('/')}/v1/experiments/{experiment_id}/export"
    try:
        with httpx.stream(
            "GET", path, params={"format": fmt}, headers=headers, timeout=60
        ) as response:
            if response.status_code >= 400:
                response.read()
                log.error("HTTP %d: %s", response.status_code, response.text)
                return 2
            with _sink(sink_path) as sink:
                for block in response.iter_bytes():
                    sink.write(block)
    except httpx.TransportError as exc:
        log.error("GET %s failed: %s: %s", path, type(exc).__name__, exc)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.output is None and args.format == "parquet" and sys.stdout.isatty():
        log.error("Parquet is binary: name a file with -o FILE (or redirect stdout)")
        return 2
    url = service_url(args.url)
    if url:
        code = _from_service(url, args.experiment, args.format, args.output)
    else:
        code = _from_database(args.experiment, args.format, args.output)
    if code == 0 and args.output is not None:
        log.info("wrote %s", args.output)
    return code
