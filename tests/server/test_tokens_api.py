"""``/v1/tokens`` (admin scope): list, create and revoke API tokens over the API, each
token's ``owner``, and each trial's ``created_by`` (the name of the token that created it);
``hyperlaw token create --owner``. Who may call the routes at all (401/403 for every other
token, whatever the settings) is walked in ``tests/server/test_security.py``."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from server import crud
from server.core.db import open_database
from server.models import ApiToken, Trial
from server.schemas import TrialCreate
from tests.conftest import make_token
from tests.databases import run_hyperlaw

LISTED = {"id", "name", "prefix", "scope", "owner", "created_at", "revoked_at", "last_used_at"}


def _name() -> str:
    return f"team-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def admin(api) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(api.server.database_url, 'admin')}"}


def test_an_admin_creates_lists_and_revokes_tokens(api, admin):
    name = _name()
    created = api.http.post(
        "/v1/tokens", json={"name": name, "scope": "write", "owner": "Ada (team A)"}, headers=admin
    )
    assert created.status_code == 201, created.text
    body = created.json()
    secret = body.pop("secret")
    assert secret.startswith("hl_") and body["prefix"] == secret[:10]
    assert body.keys() == LISTED and body["owner"] == "Ada (team A)" and body["scope"] == "write"
    assert body["revoked_at"] is None
    # the secret works, with its scope, and the trial it creates records the token
    auth = {"Authorization": f"Bearer {secret}"}
    experiment = api.http.post("/v1/experiments", json={"name": name}, headers=auth).json()
    trial_body = {
        "experiment_id": experiment["id"],
        "n_params": 10**7,
        "n_tokens": 10**9,
        "seq_len": 512,
        "learning_rate": 1e-3,
        "batch_size_tokens": 32_768,
    }
    trial = api.http.post("/v1/trials", json=trial_body, headers=auth).json()
    assert trial["created_by"] == name
    assert api.http.get("/v1/tokens", headers=auth).status_code == 403  # write is not admin
    # listed, never with a secret or a hash
    listing = api.http.get("/v1/tokens", params={"limit": 1000}, headers=admin)
    assert listing.status_code == 200
    (listed,) = [t for t in listing.json()["data"] if t["name"] == name]
    assert listed.keys() == LISTED and listed["owner"] == "Ada (team A)"
    assert secret not in listing.text and crud.hash_token(secret) not in listing.text
    # revoked: the record, and the token fails from the next request on
    revoked = api.http.delete(f"/v1/tokens/{name}", headers=admin)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["name"] == name and revoked.json()["revoked_at"] is not None
    again = api.http.post("/v1/experiments", json={"name": _name()}, headers=auth)
    assert again.status_code == 401
    # revoking again changes nothing; the trial still names its creator
    second = api.http.delete(f"/v1/tokens/{name}", headers=admin).json()
    assert second["revoked_at"] == revoked.json()["revoked_at"]
    assert api.http.get(f"/v1/trials/{trial['id']}").json()["created_by"] == name
    listed_trials = api.http.get("/v1/trials", params={"experiment_id": experiment["id"]})
    assert [t["created_by"] for t in listed_trials.json()["data"]] == [name]


def test_a_taken_name_is_409_an_unknown_one_404(api, admin):
    name = _name()
    assert api.http.post(
        "/v1/tokens", json={"name": name, "scope": "read"}, headers=admin
    ).is_success
    taken = api.http.post("/v1/tokens", json={"name": name, "scope": "admin"}, headers=admin)
    assert taken.status_code == 409 and name in taken.json()["detail"]
    assert api.http.delete(f"/v1/tokens/{name}", headers=admin).is_success
    revoked_name = api.http.post("/v1/tokens", json={"name": name, "scope": "read"}, headers=admin)
    assert revoked_name.status_code == 409  # a revoked token keeps its name
    missing = api.http.delete("/v1/tokens/nobody-at-all", headers=admin)
    assert (
        missing.status_code == 404 and missing.json()["detail"] == "token 'nobody-at-all' not found"
    )


def test_a_name_with_spaces_and_slashes_is_revoked_by_its_encoded_path(api, admin):
    name = f"team a/{uuid.uuid4().hex[:8]} (ci)"
    made = api.http.post("/v1/tokens", json={"name": name, "scope": "read"}, headers=admin)
    assert made.status_code == 201, made.text
    path = "/v1/tokens/" + name.replace(" ", "%20").replace("/", "%2F")
    revoked = api.http.delete(path, headers=admin)
    assert revoked.status_code == 200 and revoked.json()["name"] == name


@pytest.mark.parametrize(
    "body, field, rule",
    [
        ({"name": "", "scope": "read"}, "name", "string_too_short"),
        ({"name": "  ", "scope": "read"}, "name", "blank"),
        ({"name": "a\x00", "scope": "read"}, "name", "no_nul"),
        ({"name": "x", "scope": "root"}, "scope", "enum"),
        ({"name": "x"}, "scope", "missing"),
        ({"name": "x", "scope": "read", "owner": "o\x00"}, "owner", "no_nul"),
        ({"name": "x", "scope": "read", "owner": "o" * 201}, "owner", "string_too_long"),
        ({"name": "x", "scope": "read", "secret": "hl_mine"}, "secret", "extra_forbidden"),
    ],
)
def test_bad_token_bodies_are_422_naming_the_field(api, admin, body, field, rule):
    before = api.http.get("/v1/tokens", headers=admin).json()["count"]
    response = api.http.post("/v1/tokens", json=body, headers=admin)
    assert response.status_code == 422, response.text
    assert (field, rule) in {(e["field"], e["rule"]) for e in response.json()["detail"]}
    assert api.http.get("/v1/tokens", headers=admin).json()["count"] == before


def test_the_list_pages_and_counts(api, admin):
    for _ in range(3):
        api.http.post("/v1/tokens", json={"name": _name(), "scope": "read"}, headers=admin)
    everything = api.http.get("/v1/tokens", params={"limit": 1000}, headers=admin).json()
    page = api.http.get("/v1/tokens", params={"limit": 2, "offset": 1}, headers=admin).json()
    assert page["count"] == everything["count"] >= 4
    assert page["data"] == everything["data"][1:3]


def test_trials_made_without_a_token_have_no_creator(api):
    experiment = api.experiment()
    body = TrialCreate(
        experiment_id=experiment["id"],
        n_params=10**7,
        n_tokens=10**9,
        seq_len=512,
        learning_rate=1e-3,
        batch_size_tokens=32_768,
    )
    with api.database.session() as session:  # as hyperlaw import does
        trial, _ = crud.create_trial(session=session, trial_in=body)
        trial_id = trial.id
    assert api.client.get_trial(trial_id)["created_by"] is None
    made = api.trial(experiment_id=experiment["id"])  # the fixture's write token
    with api.database.session() as session:
        token = session.get(ApiToken, session.get(Trial, made["id"]).created_by_token_id)
        assert token is not None and made["created_by"] == token.name


def test_the_cli_records_and_lists_an_owner(fresh_pg):
    created = run_hyperlaw(
        fresh_pg, "token", "create", "--name", "ci", "--scope", "write", "--owner", "infra team"
    )
    assert created.returncode == 0, created.stderr
    listed = run_hyperlaw(fresh_pg, "token", "list").stdout
    assert "ci\twrite\t" in listed and "\towner infra team" in listed
    replaced = run_hyperlaw(
        fresh_pg, "token", "create", "--name", "ci", "--scope", "read", "--replace"
    )
    assert replaced.returncode == 0, replaced.stderr
    with open_database(fresh_pg) as database, database.session() as session:
        owners = dict(session.execute(select(ApiToken.name, ApiToken.owner)).all())
    assert owners["ci"] == "infra team"  # the new token keeps the old one's owner
    bad = run_hyperlaw(
        fresh_pg, "token", "create", "--name", "x", "--scope", "read", "--owner", " "
    )
    assert bad.returncode == 2 and "owner must not be blank" in bad.stderr
