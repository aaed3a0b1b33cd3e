"""Smoke test of ``benchmarks/query.py``: it runs end to end (with wrk where installed, else
its Python load generator) and ends with its result line."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

LAST_LINE = re.compile(r"^query rps=(\S+) bare_rps=(\S+) ratio=(\S+) p99_ms=(\S+)$")


@pytest.mark.parametrize("load", [[], ["--python-load"]], ids=["wrk-if-installed", "python"])
def test_query_benchmark_prints_its_result_line(load):
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/query.py",
            *load,
            "--seconds",
            "1",
            "--warmup",
            "0",
            "--rounds",
            "1",
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
    rps, bare_rps, ratio, p99 = map(float, match.groups())
    assert rps > 50 and bare_rps > 50 and p99 > 0
    assert abs(ratio - rps / bare_rps) < 0.01 * ratio
