"""Looking after the shared store over the API, on PostgreSQL and SQLite: excluding a trial
(``PATCH`` with ``excluded`` and its reason's rules, the ``excluded`` filter) and deleting
one (admin scope only; its points go with it)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from server.models import Point, Trial
from tests.conftest import make_token

REASON = "diverged on a flaky node"


def _patch(api, trial_id: int, body: dict):
    return api.http.patch(f"/v1/trials/{trial_id}", json=body, headers=api.auth)


@pytest.mark.parametrize(
    "body, field, rule",
    [
        ({"excluded": True}, "excluded_reason", "missing"),
        ({"excluded": True, "excluded_reason": None}, "excluded_reason", "missing"),
        ({"excluded_reason": REASON}, "excluded_reason", "needs_excluded"),
        ({"excluded": False, "excluded_reason": REASON}, "excluded_reason", "needs_excluded"),
        ({"excluded": True, "excluded_reason": " \t"}, "excluded_reason", "blank"),
        ({"excluded": True, "excluded_reason": ""}, "excluded_reason", "string_too_short"),
        ({"excluded": True, "excluded_reason": "x" * 1001}, "excluded_reason", "string_too_long"),
        ({"excluded": True, "excluded_reason": "a\u0000b"}, "excluded_reason", "no_nul"),
        ({"excluded": 1, "excluded_reason": REASON}, "excluded", "bool_type"),
    ],
    ids=[
        "no-reason",
        "null-reason",
        "reason-alone",
        "reason-with-false",
        "blank",
        "empty",
        "too-long",
        "nul",
        "not-a-bool",
    ],
)
def test_exclusion_rules_answer_422_naming_the_field_and_rule(api, body, field, rule):
    trial = api.trial(status="completed", final_loss=3.0)
    response = _patch(api, trial["id"], body)
    assert response.status_code == 422, response.text
    assert [(e["field"], e["rule"]) for e in response.json()["detail"]] == [(field, rule)]
    assert api.client.get_trial(trial["id"])["excluded"] is False  # nothing changed


def test_exclude_filter_and_include_again(api):
    experiment = api.experiment()
    kept, dropped = (api.trial(experiment["id"], status="completed", final_loss=3.0) for _ in "ab")
    assert (kept["excluded"], kept["excluded_reason"]) == (False, None)
    response = _patch(api, dropped["id"], {"excluded": True, "excluded_reason": "x" * 1000})
    assert response.status_code == 200, response.text
    assert (response.json()["excluded"], len(response.json()["excluded_reason"])) == (True, 1000)
    response = _patch(api, dropped["id"], {"excluded": True, "excluded_reason": REASON})
    assert response.json()["excluded_reason"] == REASON  # the reason may be restated
    listed = {
        flag: [
            t["id"]
            for t in api.client.list_trials(experiment_id=experiment["id"], excluded=flag)["data"]
        ]
        for flag in ("true", "false")
    }
    assert listed == {"true": [dropped["id"]], "false": [kept["id"]]}
    assert _patch(api, dropped["id"], {"excluded": None}).json()["excluded"] is True  # not sent
    back = _patch(api, dropped["id"], {"excluded": False})
    assert (back.json()["excluded"], back.json()["excluded_reason"]) == (False, None)
    bad = api.http.get("/v1/trials", params={"excluded": "maybe"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "excluded"


def test_deleting_a_trial_needs_an_admin_token_and_takes_its_points(api):
    trial = api.trial(status="running")
    api.client.post_points(
        trial["id"], [{"step": s, "train_loss": 3.0, "mfu": 0.4} for s in (1, 2)]
    )
    other = api.trial(status="running")
    api.client.post_points(other["id"], [{"step": 1, "train_loss": 3.0}])
    path = f"/v1/trials/{trial['id']}"
    assert api.http.delete(path).status_code == 401
    assert api.http.delete(path, headers=api.auth).status_code == 403  # write scope
    admin = {"Authorization": f"Bearer {make_token(api.server.database_url, 'admin')}"}
    deleted = api.http.delete(path, headers=admin)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["id"] == trial["id"] and deleted.json()["created_by"] is not None
    assert api.http.get(path).status_code == 404
    again = api.http.delete(path, headers=admin)
    assert again.status_code == 404 and again.json()["detail"] == f"trial {trial['id']} not found"
    with api.engine.connect() as conn:
        count = select(func.count()).select_from(Point)
        assert conn.scalar(count.where(Point.trial_id == trial["id"])) == 0
        assert conn.scalar(count.where(Point.trial_id == other["id"])) == 1
        assert conn.scalar(select(Trial.id).where(Trial.id == other["id"])) == other["id"]
