"""Fuzz the API from its OpenAPI document with Schemathesis, for a given time.

A real ``hyperlaw serve`` (no worker) on a fresh PostgreSQL database with the Step Law sweep
imported and its recommender fitted (light fits), so that recommendations answer; or, with
``--url`` and ``--token``, a service already running. Each round runs every phase
Schemathesis has (examples, coverage, fuzzing, stateful) over every operation, with a write
token so that writes are exercised; rounds repeat with the next seed until ``--seconds``
have passed or ``--rounds`` are done.

Checks: ``not_a_server_error`` (a 503 is allowed where the operation documents it:
``/v1/recommendations`` without a fit), ``status_code_conformance``,
``content_type_conformance``, ``response_schema_conformance`` and
``response_headers_conformance``.

    python benchmarks/fuzz.py [--seconds 300] [--max-examples 100] [--seed 0] [--rounds N]

Every distinct finding is printed on a line of its own (``finding check=... operation=...
status=... request=... response=...``); the last line is machine-readable:
``fuzz operations=<int> requests=<int> server_errors=<int> schema_violations=<int>
seconds=<float>`` (server errors and schema violations count failing requests). The exit
status is 1 when there was any finding.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.live_service import served  # noqa: E402
from tests.databases import DEFAULT_ADMIN_URL, seed_steplaw  # noqa: E402

log = logging.getLogger("benchmarks.fuzz")

SERVER_ERROR_CHECKS = ("not_a_server_error",)
CONFORMANCE_CHECKS = (
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
)


@dataclass
class FuzzSummary:
    operations: set[str] = field(default_factory=set)
    requests: int = 0
    server_errors: int = 0
    schema_violations: int = 0
    findings: dict[tuple, str] = field(default_factory=dict)  # distinct ones, described
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"fuzz operations={len(self.operations)} requests={self.requests} "
            f"server_errors={self.server_errors} schema_violations={self.schema_violations} "
            f"seconds={self.seconds:.1f}"
        )


def _config(token: str, *, seed: int, max_examples: int, max_time: int | None):
    import schemathesis

    checks: dict[str, Any] = {"enabled": False}
    checks.update({name: {"enabled": True} for name in (*SERVER_ERROR_CHECKS, *CONFORMANCE_CHECKS)})
    # 503 is the documented answer of /v1/recommendations without a fit; where an operation
    # does not document it, status_code_conformance reports it
    checks["not_a_server_error"]["expected-statuses"] = ["2xx", "3xx", "4xx", 503]
    settings: dict[str, Any] = {"seed": seed}
    if max_time is not None:  # fuzzing and stateful then repeat until the time is up
        settings["max-time"] = max_time
    return schemathesis.Config.from_dict(
        {
            **settings,
            "headers": {"Authorization": f"Bearer {token}"},
            "continue-on-failure": True,  # every operation's findings, not the first only
            "generation": {
                "max-examples": max_examples,
                "deterministic": True,
                "database": "none",  # no .hypothesis/ directory left behind
            },
            "phases": {"stateful": {"max-steps": 10}},
            "checks": checks,
        }
    )


def _shorten(data: bytes | str | None, limit: int = 160) -> str:
    if data is None:
        return "-"
    text = data.decode("utf-8", "backslashreplace") if isinstance(data, bytes) else data
    return repr(text if len(text) <= limit else text[:limit] + "...")


def fuzz_round(
    url: str,
    token: str,
    *,
    seed: int,
    max_examples: int,
    max_time: int | None,
    summary: FuzzSummary,
) -> None:
    """One engine run over every operation and phase, adding to ``summary``: each phase once
    with ``max_time`` None, else fuzzing and stateful again and again for ``max_time`` s."""
    import schemathesis
    from schemathesis.engine import events, from_schema

    config = _config(token, seed=seed, max_examples=max_examples, max_time=max_time)
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)
    began = time.monotonic()
    for event in from_schema(schema).execute():
        if isinstance(event, events.FatalError):
            raise RuntimeError(f"schemathesis stopped: {event.exception!r}")
        if isinstance(event, events.NonFatalError):
            log.warning("schemathesis: %s: %s", event.label, event.value)
        if isinstance(event, events.PhaseFinished):
            log.info(
                "phase %s: %s after %.1f s (%d requests so far)",
                event.phase.name.value,
                event.status.value,
                time.monotonic() - began,
                summary.requests,
            )
        if not isinstance(event, events.ScenarioFinished):
            continue
        recorder = event.recorder
        summary.requests += len(recorder.interactions)
        summary.operations.update(node.value.operation.label for node in recorder.cases.values())
        for case_id, nodes in recorder.checks.items():
            failed = {n.name: n for n in nodes if n.failure_info is not None}
            if not failed:
                continue
            interaction = recorder.interactions.get(case_id)
            response = interaction.response if interaction else None
            status = response.status_code if response is not None else None
            summary.server_errors += any(name in SERVER_ERROR_CHECKS for name in failed)
            summary.schema_violations += any(name in CONFORMANCE_CHECKS for name in failed)
            for name, node in failed.items():
                failure = node.failure_info.failure  # type: ignore[union-attr]
                first = failure.message.strip().splitlines()[0] if failure.message else ""
                where = getattr(failure, "instance_path", None)  # of a schema violation
                if where is not None:
                    first = f"at /{'/'.join(map(str, where))}: {first}"
                key = (name, failure.operation, status, failure.title, first)
                if key in summary.findings:
                    continue
                request = interaction.request if interaction else None
                summary.findings[key] = (
                    f"finding check={name} operation={failure.operation!r} status={status} "
                    f"phase={event.phase.value} what={failure.title!r}: {first[:200]!r} "
                    f"request={request.method if request else '-'} "
                    f"{_shorten(request.uri if request else None)} "
                    f"body={_shorten(request.body if request else None)} "
                    f"response={_shorten(response.content if response is not None else None)}"
                )


@contextmanager
def _target(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    if args.url:
        if not args.token:
            raise SystemExit("--url needs --token (a write token)")
        yield args.url.rstrip("/"), args.token
        return
    with served(
        args.database_url,
        prefix="hyperlaw_fuzz",
        prepare=None if args.no_seed else lambda u: seed_steplaw(u, light=True),
    ) as service:
        yield service.url, service.token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="time budget (default 300)")
    parser.add_argument("--rounds", type=int, default=None, help="at most this many rounds")
    parser.add_argument("--max-examples", type=int, default=100, help="per operation and phase")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first round")
    parser.add_argument("--url", help="fuzz a running service instead of starting one")
    parser.add_argument("--token", help="its write token (with --url)")
    parser.add_argument("--no-seed", action="store_true", help="no Step Law data in the database")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("HYPERLAW_TEST_DATABASE_URL", DEFAULT_ADMIN_URL),
        help="the PostgreSQL server to create the fuzz database on",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    summary = FuzzSummary()
    with _target(args) as (url, token):
        start = time.monotonic()
        seed = args.seed
        while args.rounds is None or seed - args.seed < args.rounds:
            left = args.seconds - (time.monotonic() - start)
            if left < 1:
                break
            fuzz_round(
                url,
                token,
                seed=seed,
                max_examples=args.max_examples,
                max_time=max(1, int(left)),
                summary=summary,
            )
            summary.seconds = time.monotonic() - start
            log.info("after round seed=%d: %s", seed, summary.line())
            seed += 1
        summary.seconds = time.monotonic() - start
    for finding in summary.findings.values():
        sys.stdout.write(finding + "\n")
    sys.stdout.write(summary.line() + "\n")
    return 1 if summary.findings else 0


if __name__ == "__main__":
    sys.exit(main())
