"""The service's commands where the database is not usable yet: one line naming the fix and
exit status 2, never a traceback. (The commands at work: test_pipeline.py,
test_migrations.py, test_quickstart.py.)"""

from __future__ import annotations

import pytest

from tests.databases import run_hyperlaw

COMMANDS = {
    "recommend": ["recommend", "--n-params", "1e9", "--n-tokens", "1e11"],
    "fit": ["fit"],
    "import": ["import", "steplaw"],
    "families": ["families"],
}


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unmigrated_database_is_one_line_and_exit_2(make_database, backend, command):
    url = make_database(backend)  # created, never migrated
    done = run_hyperlaw(url, *COMMANDS[command])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "ERROR" in lines[0] and "run `hyperlaw db upgrade`" in lines[0]
    assert "none (empty database)" in lines[0]
    assert done.stdout == ""
