"""The service's commands where the database is not usable yet: one line naming the fix and
exit status 2, never a traceback. (The commands at work: test_pipeline.py,
test_migrations.py, test_quickstart.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

COMMANDS = {
    "recommend": ["recommend", "--n-params", "1e9", "--n-tokens", "1e11"],
    "fit": ["fit"],
    "import": ["import", "steplaw"],
}


def hyperlaw(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYPERLAW_DATABASE_URL": url}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "hyperlaw", "--log-level", "WARNING", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unmigrated_database_is_one_line_and_exit_2(make_database, backend, command):
    url = make_database(backend)  # created, never migrated
    done = hyperlaw(url, *COMMANDS[command])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "ERROR" in lines[0] and "run `hyperlaw db upgrade`" in lines[0]
    assert "none (empty database)" in lines[0]
    assert done.stdout == ""
