"""``POST /v1/imports/runs`` on a real ``hyperlaw serve`` over PostgreSQL, and ``hyperlaw
import runs --url`` that sends a file there: 201 with the counts, the same keys as an import
from the command line (a second import of the same file, either way, adds nothing), a 422
naming every bad line's column and rule with nothing stored, 415 for a body not sent as
text/csv, 401 without a token."""

from __future__ import annotations

import subprocess

import httpx
from sqlalchemy import func, select

from server.models import Trial
from tests.conftest import REPO_ROOT
from tests.databases import hyperlaw_command, run_hyperlaw

HEADER = "n_params,n_tokens,seq_len,learning_rate,batch_size_tokens,final_loss"
GOOD = HEADER + "\n1e8,2e9,2048,0.001,524288,3.1\n1e8,2e9,2048,0.05,524288,nan\n"
BAD = (
    HEADER + "\n1e8,2e9,2048,0.001,524288,3.1\n"
    "1e8,2e9,2048,-1,524288,3.0\n"  # line 3
    "1e8,2e9,20.5,0.001,524288,\n"  # line 4: two rules
    "1e8,2e9\n"  # line 5: a short row
)


def _count(database) -> int:
    with database.session() as session:
        return session.scalar(select(func.count()).select_from(Trial))


def test_import_runs_over_the_api(fresh_pg, live_server_factory, database_for, tmp_path):
    server = live_server_factory(database_url=fresh_pg)
    database = database_for(fresh_pg)
    url = f"{server.url}/v1/imports/runs"
    auth = {"Authorization": f"Bearer {server.token}", "Content-Type": "text/csv"}
    params = {"experiment": "api-import", "family": "team-a"}
    unauthorized = httpx.post(
        url, params=params, content=GOOD, headers={"Content-Type": "text/csv"}
    )
    assert unauthorized.status_code == 401
    as_json = httpx.post(
        url, params=params, json={"csv": GOOD}, headers=auth | {"Content-Type": "application/json"}
    )
    assert as_json.status_code == 415 and "text/csv" in as_json.json()["detail"]
    bad_family = httpx.post(url, params={**params, "family": "team a"}, content=GOOD, headers=auth)
    assert bad_family.status_code == 422
    assert bad_family.json()["detail"][0]["field"] == "family"

    refused = httpx.post(url, params=params, content=BAD, headers=auth)
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert [(e["field"], e["rule"]) for e in detail] == [
        ("line 3: learning_rate", "gt"),
        ("line 4: seq_len", "integer"),
        ("line 4: final_loss", "empty"),
        ("line 5", "fields"),
    ]
    assert detail[0]["message"] == "line 3: learning_rate must be > 0, got -1"
    assert _count(database) == 0  # nothing stored

    done = httpx.post(url, params=params, content=GOOD, headers=auth)
    assert done.status_code == 201, done.text
    body = done.json()
    assert (body["experiment"], body["family"], body["created"], body["existing"]) == (
        "api-import",
        "team-a",
        2,
        0,
    )
    again = httpx.post(url, params=params, content=GOOD, headers=auth)
    assert again.status_code == 201 and (again.json()["created"], again.json()["existing"]) == (
        0,
        2,
    )
    elsewhere = httpx.post(url, params={"experiment": "api-import"}, content=GOOD, headers=auth)
    assert elsewhere.status_code == 409  # the experiment is in team-a, not default

    # the command line, on the database, keys the same file's rows the same way
    path = tmp_path / "api-import.csv"
    path.write_text(GOOD)
    local = run_hyperlaw(fresh_pg, "import", "runs", str(path), "--family", "team-a")
    assert local.returncode == 0, local.stderr
    assert "0 trials imported, 2 already there" in local.stdout
    assert _count(database) == 2


def _hyperlaw(database_url: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    argv, run_env = hyperlaw_command(database_url, *args, env=env)
    argv[argv.index("WARNING")] = "INFO"
    return subprocess.run(
        argv, cwd=REPO_ROOT, env=run_env, capture_output=True, text=True, timeout=120
    )


def test_hyperlaw_import_runs_sends_the_file_with_url(
    fresh_pg, live_server_factory, database_for, tmp_path
):
    server = live_server_factory(database_url=fresh_pg)
    database = database_for(fresh_pg)
    good, bad = tmp_path / "sent.csv", tmp_path / "bad.csv"
    good.write_text(GOOD)
    bad.write_text(BAD)
    # a database the command cannot reach: it must not be the store the command writes
    nowhere = "postgresql://nobody@127.0.0.1:1/nothing"
    env = {"HYPERLAW_TOKEN": server.token}
    sent = _hyperlaw(nowhere, "import", "runs", str(good), "--url", server.url, env=env)
    assert sent.returncode == 0, sent.stderr
    assert (
        "experiment sent (" in sent.stdout and "2 trials imported, 0 already there" in sent.stdout
    )
    assert f"{server.url} (--url)" in sent.stderr  # the store it uses, logged
    from_env = _hyperlaw(
        nowhere, "import", "runs", str(good), env={**env, "HYPERLAW_URL": server.url}
    )
    assert from_env.returncode == 0, from_env.stderr
    assert "0 trials imported, 2 already there" in from_env.stdout
    assert "(HYPERLAW_URL)" in from_env.stderr
    refused = _hyperlaw(nowhere, "import", "runs", str(bad), "--url", server.url, env=env)
    assert refused.returncode == 2
    assert "HTTP 422, nothing imported" in refused.stderr
    assert "line 3: learning_rate must be > 0, got -1" in refused.stderr
    assert "line 5: 2 fields, header has 6" in refused.stderr
    no_token = _hyperlaw(
        nowhere, "import", "runs", str(good), "--url", server.url, env={"HYPERLAW_TOKEN": ""}
    )
    assert no_token.returncode == 2 and "401" in no_token.stderr
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Trial)) == 2
