"""Smoke test of ``benchmarks/query.py``: it runs end to end and ends with its result line."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO_ROOT

LAST_LINE = re.compile(r"^query rps=(\S+) p50_ms=(\S+) p99_ms=(\S+)$")


def test_query_benchmark_prints_its_result_line():
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/query.py",
            "--seconds",
            "1",
            "--warmup",
            "0.5",
            "--connections",
            "4",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    match = LAST_LINE.match(done.stdout.strip().splitlines()[-1])
    assert match, done.stdout
    rps, p50, p99 = map(float, match.groups())
    assert rps > 50 and 0 < p50 <= p99
