"""Families through the API, on PostgreSQL and SQLite: the family rule on experiments (422
naming the field and the rule, nothing stored), moving an experiment, a trial's
parametrization, ``GET /v1/families``, and the issue's regression: another family's trials
(synthetic-regression losses ≈ 0.1 at N = 512, posted through the API) leave the Step Law
family's answer where it was."""

from __future__ import annotations

import math
import time
import uuid

import httpx
import pytest

from client import HyperlawAPIError, HyperlawClient
from server import crud
from server.core.db import open_database, upgrade
from server.importers import import_steplaw
from server.schemas import ExperimentCreate
from server.worker.fits import RECOMMENDER_KIND
from server.worker.loop import refit_once
from tests.databases import shared_fitter

QUERY = {"n_params": 1e9, "n_tokens": 1e11}
ANSWER_KEYS = ("learning_rate", "batch_size_tokens", "critical_batch_size_tokens")


def _name() -> str:
    return f"exp-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize(
    "family, rule, words",
    [
        ("team a", "family_name", "letters, digits, '.', '_' or '-'"),
        ("-team", "family_name", "starting with a letter or digit"),
        ("team/cosine", "family_name", "(got 'team/cosine')"),
        ("", "string_too_short", "at least 1 characters"),
        ("x" * 101, "string_too_long", "at most 100 characters"),
        (7, "string_type", "must be a string"),
    ],
)
def test_a_bad_family_is_refused_naming_the_rule_and_nothing_is_stored(api, family, rule, words):
    name = _name()
    refused = api.http.post(
        "/v1/experiments", json={"name": name, "family": family}, headers=api.auth
    )
    assert refused.status_code == 422
    [entry] = refused.json()["detail"]
    assert (entry["field"], entry["rule"]) == ("family", rule)
    assert entry["message"].startswith("family ") and words in entry["message"]
    assert api.client.list_experiments(name=name)["count"] == 0
    # the same rule on the way to another family
    experiment = api.client.ensure_experiment(name, family="team-a")
    moved = api.http.patch(
        f"/v1/experiments/{experiment['id']}", json={"family": family}, headers=api.auth
    )
    assert moved.status_code == 422 and moved.json()["detail"][0]["rule"] == rule
    assert api.client.get_experiment(experiment["id"])["family"] == "team-a"


def test_experiments_are_created_listed_and_moved_by_family(api):
    family = f"team-{uuid.uuid4().hex[:6]}"
    name = _name()
    plain = api.client.ensure_experiment(_name())
    assert plain["family"] == "default"
    created = api.client.ensure_experiment(name, family=family)
    assert created["family"] == family
    assert api.client.ensure_experiment(name)["id"] == created["id"]  # no family: as stored
    with pytest.raises(HyperlawAPIError) as conflict:
        api.client.ensure_experiment(name, family="other-family")
    assert conflict.value.status_code == 409
    assert f"is in family {family!r}, not 'other-family'" in conflict.value.detail
    assert f"PATCH /v1/experiments/{created['id']}" in conflict.value.detail
    listed = api.client.list_experiments(family=family)
    assert [e["id"] for e in listed["data"]] == [created["id"]] and listed["count"] == 1

    other = f"{family}.v2"
    moved = api.client.update_experiment(created["id"], family=other)
    assert (moved["id"], moved["family"]) == (created["id"], other)
    assert api.client.list_experiments(family=family)["count"] == 0
    assert api.client.get_experiment(created["id"])["family"] == other
    anonymous = api.http.patch(f"/v1/experiments/{created['id']}", json={"family": family})
    assert anonymous.status_code == 401
    missing = api.http.patch("/v1/experiments/987654321", json={"family": family}, headers=api.auth)
    assert missing.status_code == 404
    unknown = api.http.patch(
        f"/v1/experiments/{created['id']}", json={"name": "renamed"}, headers=api.auth
    )
    assert unknown.status_code == 422
    assert {(d["field"], d["rule"]) for d in unknown.json()["detail"]} == {
        ("family", "missing"),
        ("name", "extra_forbidden"),
    }


def test_a_trial_records_its_parametrization(api):
    experiment = api.experiment()
    assert api.trial(experiment["id"])["parametrization"] == "standard"
    assert api.trial(experiment["id"], parametrization="mup")["parametrization"] == "mup"
    refused = api.http.post(
        "/v1/trials",
        json={
            "experiment_id": experiment["id"],
            "n_params": 10**7,
            "n_tokens": 10**9,
            "seq_len": 512,
            "learning_rate": 1e-3,
            "batch_size_tokens": 512 * 64,
            "parametrization": "ntk",
        },
        headers=api.auth,
    )
    assert refused.status_code == 422
    [entry] = refused.json()["detail"]
    assert (entry["field"], entry["rule"]) == ("parametrization", "enum")
    assert api.client.list_trials(experiment_id=experiment["id"])["count"] == 2


def _post_synthetic_sweep(client: HyperlawClient) -> list[int]:
    """examples/cpu_small.yaml's grid as the trainer reports it: 12 completed trials of the
    synthetic regression (N = 512, D = 2^16, losses ≈ 0.1) in family synthetic-regression."""
    experiment = client.ensure_experiment("cpu-small-synthetic", family="synthetic-regression")
    ids = []
    for lr in (0.003, 0.01, 0.03, 0.1):
        for batch in (32, 128, 512):
            loss = 0.09 + 0.01 * math.log10(lr / 0.02) ** 2 + 0.005 * math.log2(batch / 128) ** 2
            trial = client.create_trial(
                experiment_id=experiment["id"],
                n_params=512,
                n_tokens=65536,
                seq_len=1,
                learning_rate=lr,
                batch_size_tokens=batch,
                schedule="constant_ewa",
                status="running",
            )
            client.update_trial(
                trial["id"],
                status="completed",
                final_eval_loss=loss,
                stop_reason="budget",
                tokens_done=65536,
            )
            ids.append(trial["id"])
    return ids


#: The test's fits: no bootstrap draws and no averaging over law forms (used outside the
#: fitted range), which leave the answer at (1e9, 1e11) as it is and the test short.
OPTIONS = {"n_bootstrap": 0, "law_forms": False}


def test_another_family_leaves_the_step_law_answer_alone(
    fresh_db, database_for, live_server_factory
):
    """Before families, the synthetic sweep moved the answer at (1e9, 1e11) from η = 1.40e-3,
    B = 970k to η = 1.23e-3, B = 876k and made the CBS NaN (issue 10). Now the Step Law
    family's refit borrows from the new family but answers within 1 % of before (its fit ids
    and trial count say the refit happened); the synthetic family answers for itself, and
    /v1/families shows both."""
    database = database_for(fresh_db)
    import_steplaw(database)
    refit = dict(kinds=[RECOMMENDER_KIND], fitter=shared_fitter, options=OPTIONS)
    assert {o.status for o in refit_once(database, **refit)} == {"ok"}
    server = live_server_factory(database_url=fresh_db)
    client = HyperlawClient(server.url, server.token, max_retries=1)
    before = client.recommend(**QUERY)
    assert before["family"] == "step-law" and before["n_trials"] == 1911

    synthetic = _post_synthetic_sweep(client)
    outcomes = refit_once(database, **refit)
    assert "family:step-law" in {o.scope for o in outcomes}
    time.sleep(1.1)  # past the server's cache interval
    after = client.recommend(**QUERY)
    assert after["fit_ids"] != before["fit_ids"] and after["n_trials"] == 1911 + 12
    assert after["fit_key"] == "step-law" and after["scope"] == "family:step-law"
    for key in ANSWER_KEYS:
        assert math.isfinite(after[key]), key
        assert after[key] == pytest.approx(before[key], rel=0.01), key
    fit = client.get_fit(after["fit_ids"][0])
    assert set(synthetic) <= set(fit["trial_ids"])  # borrowed from, not fitted as step-law
    assert fit["quality"]["n_runs_pooled"] == 1911 + 12 and fit["quality"]["n_runs"] == 1911

    listed = client.families()
    assert listed["count"] == 2
    step_law, synth = listed["data"]
    assert step_law["name"] == "step-law" and synth["name"] == "synthetic-regression"
    assert (step_law["n_experiments"], step_law["n_trials"], step_law["n_groups"]) == (1, 1911, 17)
    assert step_law["n_params"] == [214663680, 1073741824]
    assert step_law["n_tokens"] == [4 * 10**9, 10**11]
    assert step_law["fit_keys"] == [
        {
            "fit_key": "step-law",
            "parametrization": "standard",
            "schedule": None,
            "n_trials": 1911,
            "n_groups": 17,
        }
    ]
    assert step_law["fit"]["id"] == after["fit_ids"][0] and step_law["fit"]["status"] == "ok"
    assert (synth["n_trials"], synth["n_groups"], synth["n_params"]) == (12, 1, [512, 512])
    assert synth["main_fit_key"] == "synthetic-regression/constant_ewa"
    assert [k["fit_key"] for k in synth["fit_keys"]] == ["synthetic-regression/constant_ewa"]
    # one group of a task whose valley is not the LLM's: its own fit may fail, with why
    assert synth["fit"]["status"] in ("ok", "insufficient_data", "failed")
    assert synth["fit"]["status"] == "ok" or synth["fit"]["message"]
    assert synth["scope"] == "family:synthetic-regression"

    # the default family comes from the settings
    other = live_server_factory(
        database_url=fresh_db, env={"HYPERLAW_DEFAULT_FAMILY": "synthetic-regression"}
    )
    answer = httpx.get(other.url + "/v1/recommendations", params=QUERY, timeout=30)
    assert answer.status_code in (200, 503), answer.text
    if answer.status_code == 200:
        assert answer.json()["family"] == "synthetic-regression"
    else:
        assert "scope family:synthetic-regression" in answer.json()["detail"]
    named = httpx.get(
        other.url + "/v1/recommendations", params={**QUERY, "family": "step-law"}, timeout=30
    )
    assert named.json()["fit_ids"] == after["fit_ids"]


def test_families_of_an_empty_store_and_read_auth(make_database, live_server_factory):
    url = make_database("sqlite")
    upgrade(url)
    with open_database(url) as database, database.session() as session:
        crud.create_experiment(
            session=session, experiment_in=ExperimentCreate(name="planned", family="team-a")
        )
    live = live_server_factory(database_url=url, env={"HYPERLAW_READ_REQUIRES_TOKEN": "true"})
    assert httpx.get(live.url + "/v1/families").status_code == 401
    body = HyperlawClient(live.url, live.token).families()
    assert body == {
        "data": [
            {
                "name": "team-a",
                "scope": "family:team-a",
                "n_experiments": 1,
                "n_trials": 0,
                "n_groups": 0,
                "n_params": None,
                "n_tokens": None,
                "main_fit_key": None,
                "fit_keys": [],
                "fit": None,
            }
        ],
        "count": 1,
    }
