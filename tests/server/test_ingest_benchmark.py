"""The ingest benchmark runs end to end (tiny sizes) and ends with its machine-readable line."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_ingest_benchmark_smoke():
    out = subprocess.run(
        [sys.executable, "benchmarks/ingest.py", "--points", "1500", "--repeats", "1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    m = re.fullmatch(
        r"ingest points_per_s=([\d.]+) optuna_points_per_s=([\d.]+) ratio=([\d.]+)", last
    )
    assert m, last
    ours, theirs, ratio = map(float, m.groups())
    assert ours > 0 and theirs > 0 and abs(ratio - ours / theirs) < 0.01 * ratio
