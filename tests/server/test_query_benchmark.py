"""Smoke test of ``benchmarks/query.py``: it runs end to end (with wrk where installed, else
its Python load generator) and ends with its result line."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

LAST_LINE = re.compile(r"^query rps=(\S+) bare_rps=(\S+) ratio=(\S+) p99_ms=(\S+)$")


WRK = shutil.which("wrk") is not None
# Without wrk both cases would run the same Python load generator: the default then checks
# the fallback (its warning and the generator); --python-load has a case of its own only
# where it changes something, beside wrk.
LOADS = [([], "wrk-if-installed")] + ([(["--python-load"], "python")] if WRK else [])


@pytest.mark.parametrize("load", [a for a, _ in LOADS], ids=[i for _, i in LOADS])
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
    assert ("wrk not found: install it" in done.stderr) == (not WRK and not load), done.stderr
    match = LAST_LINE.match(done.stdout.strip().splitlines()[-1])
    assert match, done.stdout
    rps, bare_rps, ratio, p99 = map(float, match.groups())
    assert rps > 50 and bare_rps > 50 and p99 > 0
    assert abs(ratio - rps / bare_rps) < 0.01 * ratio
