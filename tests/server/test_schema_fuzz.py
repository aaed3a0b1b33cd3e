"""Schemathesis against a real ``hyperlaw serve`` on PostgreSQL (the Step Law sweep imported
and fitted, so that recommendations answer), from the service's own OpenAPI document: every
operation, every phase once (examples, coverage, fuzzing, stateful), a small fixed budget
and seed, with a write token so that writes go through.

No answer may be a server error (a 503 only where the operation documents it) and every
answer must match the document: its status, content type, headers and body schema. The
checks and the counting are ``benchmarks/fuzz.py``'s, which runs the same for longer.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import func, select

from benchmarks.fuzz import FuzzSummary, fuzz_round
from server.core.db import open_database, upgrade
from server.models import Experiment
from tests.conftest import LiveServer, start_live_server
from tests.databases import seed_steplaw

# per operation and phase; every operation is still exercised in every phase (checked below),
# and benchmarks/fuzz.py runs the same with 100 and for longer
MAX_EXAMPLES = 12
SEED = 0


@pytest.fixture(scope="module")
def fuzzed(make_database, tmp_path_factory) -> Iterator[LiveServer]:
    url = make_database("postgresql")
    upgrade(url)
    seed_steplaw(url, light=True)
    server = start_live_server(url, log_dir=tmp_path_factory.mktemp("fuzz"))
    yield server
    server.stop()


@pytest.mark.timeout(300)
def test_fuzzed_requests_get_no_server_error_and_match_the_schema(fuzzed):
    document = httpx.get(f"{fuzzed.url}/openapi.json", timeout=10).json()
    operations = {
        f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item
    }
    summary = FuzzSummary()
    fuzz_round(
        fuzzed.url,
        fuzzed.token,
        seed=SEED,
        max_examples=MAX_EXAMPLES,
        max_time=None,
        summary=summary,
    )
    assert summary.operations == operations  # every operation was exercised
    findings = "\n".join(summary.findings.values())
    assert (summary.server_errors, summary.schema_violations) == (0, 0), findings
    with open_database(fuzzed.database_url) as database, database.session() as session:
        experiments = session.scalar(select(func.count()).select_from(Experiment))
    assert experiments > 1  # the write token let generated experiments in
