"""Every /v1 route against a live server, on PostgreSQL and on SQLite."""

from __future__ import annotations

import math
import uuid

import pytest
from sqlalchemy import insert, select

from client import HyperlawAPIError
from server.models import Fit, Point


def test_docs_and_openapi_are_served(api):
    assert api.http.get("/docs").status_code == 200
    spec = api.http.get("/openapi.json").json()
    for path in [
        "/v1/experiments",
        "/v1/experiments/{experiment_id}",
        "/v1/families",
        "/v1/trials",
        "/v1/trials/{trial_id}",
        "/v1/trials/{trial_id}/heartbeat",
        "/v1/trials/{trial_id}/points",
        "/v1/fits",
        "/v1/fits/latest",
        "/v1/fits/{fit_id}",
    ]:
        assert path in spec["paths"], path
    assert "patch" in spec["paths"]["/v1/experiments/{experiment_id}"]
    body = spec["paths"]["/v1/trials/{trial_id}/points"]["post"]["requestBody"]
    assert "points" in body["content"]["application/json"]["schema"]["properties"]
    assert '"NaN"' in spec["info"]["description"]
    # why a run stopped: documented, with its values, on what goes in and what comes out
    schemas = spec["components"]["schemas"]
    assert schemas["StopReason"]["enum"] == ["budget", "target", "diverged", "failed"]
    for name in ("TrialCreate", "TrialUpdate", "TrialPublic"):
        field = schemas[name]["properties"]["stop_reason"]
        assert "trained its n_tokens" in field["description"], name
        assert {"$ref": "#/components/schemas/StopReason"} in field["anyOf"], name


def test_experiments_create_get_list(api):
    name = f"exp-{uuid.uuid4().hex[:8]}"
    r = api.http.post("/v1/experiments", json={"name": name, "description": "d"}, headers=api.auth)
    assert r.status_code == 201, r.text
    created = r.json()
    # creating the same name again returns the stored experiment, 200
    again = api.http.post("/v1/experiments", json={"name": name}, headers=api.auth)
    assert again.status_code == 200 and again.json()["id"] == created["id"]
    assert api.http.get(f"/v1/experiments/{created['id']}").json()["description"] == "d"
    listed = api.http.get("/v1/experiments", params={"name": name}).json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == created["id"]
    page = api.http.get("/v1/experiments", params={"limit": 1, "offset": 0}).json()
    assert len(page["data"]) == 1 and page["count"] >= 1
    missing = api.http.get("/v1/experiments/987654321")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "experiment 987654321 not found"}


def test_trial_create_is_idempotent_per_experiment(api):
    exp = api.experiment()
    first = api.trial(exp["id"], idempotency_key="run-1")
    r = api.http.post(
        "/v1/trials",
        headers=api.auth,
        json=dict(
            experiment_id=exp["id"],
            n_params=1,
            n_tokens=1,
            seq_len=1,
            learning_rate=0.5,
            batch_size_tokens=1,
            idempotency_key="run-1",
        ),
    )
    assert r.status_code == 200 and r.json()["id"] == first["id"]
    assert r.json()["learning_rate"] == first["learning_rate"]  # the stored trial, unchanged
    other_exp = api.experiment()
    elsewhere = api.trial(other_exp["id"], idempotency_key="run-1")
    assert elsewhere["id"] != first["id"]
    assert api.client.list_trials(experiment_id=exp["id"])["count"] == 1


def test_trial_fields_round_trip(api):
    t = api.trial(
        model_shape={"n_layer": 4, "n_head": 4, "d_model": 256},
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_eps=1e-8,
        weight_decay=0.1,
        grad_clip=1.0,
        schedule="constant_ewa",
        warmup_fraction=0.01,
        zero_stage=2,
        world_size=4,
        seed=7,
        config={"code_version": "abc", "data_fingerprint": "sha256:00"},
    )
    got = api.client.get_trial(t["id"])
    assert got["batch_size_sequences"] == 64.0
    assert got["model_shape"]["d_model"] == 256 and got["zero_stage"] == 2
    assert got["status"] == "queued" and got["source"] == "trained"
    assert got["stop_reason"] is None and got["tokens_done"] is None  # not known yet
    assert got["config"]["code_version"] == "abc"
    assert got["created_at"].endswith("Z") or "+00:00" in got["created_at"]


def test_trial_list_filters_and_pagination(api):
    exp = api.experiment()
    for n_params, n_tokens in [(10**6, 10**8), (10**7, 10**9), (10**8, 10**10)]:
        api.trial(exp["id"], n_params=n_params, n_tokens=n_tokens)
    running = api.trial(exp["id"], n_params=10**7, n_tokens=10**9)
    api.client.heartbeat(running["id"])

    def ids(**params):
        return [t["id"] for t in api.client.list_trials(experiment_id=exp["id"], **params)["data"]]

    assert len(ids()) == 4
    assert len(ids(n_params_min=10**7)) == 3
    assert len(ids(n_params_min=10**7, n_params_max=10**7)) == 2
    assert len(ids(n_tokens_max=10**9)) == 3
    assert ids(status="running") == [running["id"]]
    assert len(ids(status=["running", "queued"])) == 4
    page = api.client.list_trials(experiment_id=exp["id"], limit=2, offset=1)
    assert page["count"] == 4 and [t["id"] for t in page["data"]] == ids()[1:3]


def test_trial_status_transitions(api):
    t = api.trial()
    assert api.client.update_trial(t["id"], status="running")["status"] == "running"
    with pytest.raises(HyperlawAPIError) as back:
        api.client.update_trial(t["id"], status="queued")
    assert back.value.status_code == 409
    done = api.client.update_trial(
        t["id"],
        status="completed",
        final_loss=3.2,
        steps_done=100,
        tokens_done=3_276_800,
        diverged=False,
        stop_reason="target",
        config={"k": 1},
    )
    assert done["status"] == "completed" and done["completed_at"] is not None
    assert done["stop_reason"] == "target" and done["tokens_done"] == 3_276_800
    assert api.client.get_trial(t["id"])["stop_reason"] == "target"
    assert done["final_loss"] == 3.2 and done["config"] == {"k": 1}
    # re-sending the final status (a retried PATCH) is fine; reopening is not
    assert api.client.update_trial(t["id"], status="completed")["status"] == "completed"
    for status in ("running", "queued", "failed"):
        with pytest.raises(HyperlawAPIError) as err:
            api.client.update_trial(t["id"], status=status)
        assert err.value.status_code == 409
        assert "cannot be reopened" in err.value.detail
    with pytest.raises(HyperlawAPIError) as err:
        api.client.update_trial(987654321, status="running")
    assert err.value.status_code == 404 and err.value.detail == "trial 987654321 not found"


def test_heartbeat(api):
    t = api.trial()
    assert t["heartbeat_at"] is None
    beat = api.client.heartbeat(t["id"])
    assert beat["status"] == "running" and beat["heartbeat_at"] is not None
    later = api.client.heartbeat(t["id"])
    assert later["heartbeat_at"] >= beat["heartbeat_at"]
    api.client.update_trial(t["id"], status="pruned", status_reason="early stop")
    with pytest.raises(HyperlawAPIError) as err:
        api.client.heartbeat(t["id"])
    assert err.value.status_code == 409 and "pruned" in err.value.detail
    assert api.http.post("/v1/trials/987654321/heartbeat", headers=api.auth).status_code == 404


def test_points_ingest_read_ranges_and_idempotence(api):
    t = api.trial()
    points = [
        {
            "step": s,
            "tokens": s * 32768,
            "train_loss": 10.0 / (s + 1),
            "lr": 1e-3,
            "grad_norm": 1.0,
            "b_simple": 1e4,
            "tokens_per_s": 5e4,
            "wall_time_s": s * 0.1,
        }
        for s in range(0, 1000, 10)
    ]
    r = api.http.post(f"/v1/trials/{t['id']}/points", json={"points": points}, headers=api.auth)
    assert r.status_code == 200 and r.json() == {"trial_id": t["id"], "count": 100}
    r2 = api.http.post(f"/v1/trials/{t['id']}/points", json={"points": points}, headers=api.auth)
    assert r2.status_code == 200
    got = api.client.get_points(t["id"])
    assert got["count"] == 100 and [p["step"] for p in got["data"]] == list(range(0, 1000, 10))
    assert got["data"][5] == {
        **points[5],
        "eval_loss": None,
        "ewa_eval_loss": None,
        "extras": None,  # sent none
    }
    ranged = api.client.get_points(t["id"], step_min=100, step_max=200)
    assert [p["step"] for p in ranged["data"]] == list(range(100, 201, 10))
    page = api.http.get(f"/v1/trials/{t['id']}/points", params={"limit": 5, "offset": 10}).json()
    assert page["count"] == 100 and [p["step"] for p in page["data"]] == list(range(100, 150, 10))
    # a later batch may add eval losses to existing steps without erasing train losses
    api.client.post_points(t["id"], [{"step": 10, "eval_loss": 4.5, "ewa_eval_loss": 4.6}])
    p10 = api.client.get_points(t["id"], step_min=10, step_max=10)["data"][0]
    assert p10["train_loss"] == points[1]["train_loss"] and p10["eval_loss"] == 4.5
    # rows of one step in one batch merge in order: a later value wins, a missing one keeps
    api.client.post_points(
        t["id"],
        [
            {"step": 20, "train_loss": 1.0},
            {"step": 20, "train_loss": 2.0},
            {"step": 20, "eval_loss": 2.5},
        ],
    )
    p20 = api.client.get_points(t["id"], step_min=20, step_max=20)["data"][0]
    assert (p20["train_loss"], p20["eval_loss"]) == (2.0, 2.5)
    with api.engine.connect() as conn:
        n = len(conn.execute(select(Point.step).where(Point.trial_id == t["id"])).all())
    assert n == 100
    assert api.http.get("/v1/trials/987654321/points").status_code == 404


def test_nonfinite_values_round_trip_on_the_wire(api):
    t = api.trial()
    points = [
        {"step": 1, "train_loss": math.nan, "eval_loss": math.inf, "grad_norm": -math.inf},
        {"step": 2, "train_loss": 1.5},
    ]
    api.client.post_points(t["id"], points)
    raw = api.http.get(f"/v1/trials/{t['id']}/points").json()["data"][0]
    assert raw["train_loss"] == "NaN" and raw["eval_loss"] == "Infinity"
    assert raw["grad_norm"] == "-Infinity"
    back = api.client.get_points(t["id"])["data"][0]
    assert math.isnan(back["train_loss"]) and back["eval_loss"] == math.inf
    assert back["grad_norm"] == -math.inf
    # bare NaN tokens (Python's json default) are accepted as well
    body = '{"points": [{"step": 3, "train_loss": NaN, "eval_loss": -Infinity}]}'
    r = api.http.post(
        f"/v1/trials/{t['id']}/points",
        content=body,
        headers={**api.auth, "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    done = api.client.update_trial(
        t["id"], status="completed", final_loss=math.nan, final_eval_loss=math.inf, diverged=True
    )
    assert math.isnan(done["final_loss"]) and done["final_eval_loss"] == math.inf


def _add_fits(api, kind: str) -> list[int]:
    ids = []
    with api.engine.begin() as conn:
        for i, status in enumerate(["ok", "failed", "ok"]):
            res = conn.execute(
                insert(Fit)
                .values(
                    kind=kind,
                    scope="family:step-law",
                    status=status,
                    message=None if status == "ok" else "x",
                    params={"alpha": 0.5 + i, "nan": math.inf},
                    intervals={"alpha": [0.1, 0.9]},
                    quality={"r2": 0.9},
                    trial_ids=[1, 2],
                    n_trials=2,
                    data_watermark=f"w{i}",
                )
                .returning(Fit.id)
            )
            ids.append(res.scalar_one())
    return ids


def test_fits_history_latest_and_by_id(api):
    kind = f"kind-{uuid.uuid4().hex[:6]}"
    ids = _add_fits(api, kind)
    history = api.client.list_fits(kind=kind)
    assert history["count"] == 3 and [f["id"] for f in history["data"]] == ids[::-1]
    assert api.client.list_fits(kind=kind, status="failed")["data"][0]["id"] == ids[1]
    latest = api.client.latest_fit(kind)
    assert latest["id"] == ids[2] and latest["params"]["alpha"] == 2.5
    assert latest["params"]["nan"] == math.inf
    assert api.client.latest_fit(kind, status="failed")["id"] == ids[1]
    assert api.client.get_fit(ids[0])["data_watermark"] == "w0"
    missing = api.http.get("/v1/fits/latest", params={"kind": "no-such-kind"})
    assert (
        missing.status_code == 404
        and missing.json()["detail"] == "no fit found with kind=no-such-kind"
    )
    assert api.http.get("/v1/fits/987654321").json() == {"detail": "fit 987654321 not found"}
    bad = api.http.get("/v1/fits", params={"status": "great"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "status"
