"""The CBS that /v1/recommendations serves: measured steps to target (the sweep's cbs:
protocol, stored on the trials) once a family has them in three groups, the loss surface's
as the named fallback before; runs that trained past their budget stay out of the surface;
the cbs fit shows the noise scale of each group beside its CBS."""

from __future__ import annotations

import math

import numpy as np
import pytest

from client import HyperlawClient
from server.importers import import_steplaw
from server.worker.fits import CBS_KIND, RECOMMENDER_KIND
from server.worker.loop import refit_once

OPTIONS = {"n_bootstrap": 8, "law_forms": False}  # light fits: the CBS law is what is tested
B_REF = 2**16  # tokens: the reference batch size of every group
BATCHES = [B_REF * 2**k for k in range(6)]
SIZES = (300_000_000, 600_000_000)
BUDGETS = (5e9, 2e10, 8e10)
QUERY = {"n_params": 4e8, "n_tokens": 2e10, "family": "step-law"}


def k_of(n_tokens: float) -> float:
    """b/a of a group, in tokens: the CBS grows as D^0.5 (and not with N)."""
    return 2.0**23 * (n_tokens / 2e10) ** 0.5


def post_protocol_group(
    client: HyperlawClient, experiment_id: int, n_params: int, n_tokens: float, target: float
) -> list[int]:
    """One (N, D) group of the cbs protocol as the trainer leaves it: the reference at its
    budget (steps to target = its steps), every larger batch size stopped at the target
    (S(B) = a + b/B with a·(1 + k/B_ref)·B_ref = D), the largest one censored at the cap. Each
    run's points carry b_simple, summarised on completion by the service."""
    k = k_of(n_tokens)
    a = n_tokens / (B_REF + k)
    ids = []
    for batch in BATCHES:
        steps = a * (1 + k / batch)
        censored = batch == BATCHES[-1]
        done = int(2 * n_tokens // batch) if censored else math.ceil(steps)
        trial = client.create_trial(
            experiment_id=experiment_id,
            n_params=n_params,
            n_tokens=int(n_tokens),
            seq_len=2048,
            learning_rate=1e-3,
            batch_size_tokens=batch,
            status="running",
        )
        client.post_points(
            trial["id"],
            [{"step": s, "tokens": s * batch, "b_simple": 1e6 + s} for s in range(1, done + 1, 7)],
        )
        client.update_trial(
            trial["id"],
            status="completed",
            final_eval_loss=target + (0.01 if censored else 0.0),
            stop_reason="budget" if batch == B_REF or censored else "target",
            tokens_done=done * batch,
            target_loss=target,
            reached_target=not censored,
            steps_to_target=None if censored else steps,
        )
        ids.append(trial["id"])
    return ids


@pytest.fixture
def steplaw_server(fresh_pg, database_for, live_server_factory):
    """The Step Law family fitted, behind a live service (PostgreSQL only: the fits' rules
    are the worker's on both databases, and test_fits covers the cbs kind on each)."""
    database = database_for(fresh_pg)
    import_steplaw(database)
    refit_once(database, kinds=[RECOMMENDER_KIND], options=OPTIONS)
    server = live_server_factory(database_url=fresh_pg)
    return database, HyperlawClient(server.url, server.token, max_retries=1)


def test_measured_steps_serve_the_cbs_and_its_law(steplaw_server):
    database, client = steplaw_server
    before = client.recommend(**QUERY)
    assert before["sources"]["critical_batch_size_tokens"].startswith("loss_surface")
    assert "fallback" in before["sources"]["critical_batch_size_tokens"]
    assert before["critical_batch_size_law"]["n_groups"] is None

    experiment = client.ensure_experiment("protocol", family="step-law")
    ids = []
    for n_params in SIZES:
        for i, n_tokens in enumerate(BUDGETS):
            ids += post_protocol_group(client, experiment["id"], n_params, n_tokens, 3.0 - 0.1 * i)
    outcomes = refit_once(database, kinds=[RECOMMENDER_KIND, CBS_KIND], options=OPTIONS)
    assert {(o.kind, o.status) for o in outcomes if o.scope == "family:step-law"} == {
        (RECOMMENDER_KIND, "ok"),
        (CBS_KIND, "ok"),
    }
    after = client.recommend(**QUERY)
    assert after["fit_ids"] != before["fit_ids"]
    source = after["sources"]["critical_batch_size_tokens"]
    assert source.startswith("steps-to-target") and "over 6 groups" in source

    # the law: B*_g = 1.2·B_ref + 0.2·k(D) per group, fitted in (ln N, ln D) by least squares
    n = np.repeat(SIZES, len(BUDGETS)).astype(float)
    d = np.tile(BUDGETS, len(SIZES))
    cbs = 1.2 * B_REF + 0.2 * np.array([k_of(v) for v in d])
    design = np.column_stack([np.ones(n.size), np.log(n), np.log(d)])
    (c0, beta, gamma), *_ = np.linalg.lstsq(design, np.log(cbs), rcond=None)
    law = after["critical_batch_size_law"]
    assert law["n_groups"] == 6 and law["source"] == source
    assert law["n_tokens_exponent"] == pytest.approx(gamma, abs=1e-6)
    assert law["n_params_exponent"] == pytest.approx(beta, abs=1e-6)
    assert abs(beta) < 1e-6  # N does not enter
    want = math.exp(c0 + beta * math.log(QUERY["n_params"]) + gamma * math.log(QUERY["n_tokens"]))
    assert after["critical_batch_size_tokens"] == pytest.approx(want, rel=1e-6)
    low, high = law["n_tokens_exponent_interval"]["low"], law["n_tokens_exponent_interval"]["high"]
    assert low < high and abs((low + high) / 2 - gamma) < 0.01  # groups on a near-exact law
    iv = after["critical_batch_size_tokens_interval"]
    assert iv["low"] <= after["critical_batch_size_tokens"] <= iv["high"]

    # runs that stopped at the target or trained past D are not final losses at D
    fit = client.get_fit(after["fit_ids"][0])
    assert fit["quality"]["n_runs"] == 1911  # the Step Law runs only; the references ...
    assert set(ids) <= set(fit["trial_ids"])  # ... and the rest are used by the CBS law
    for key in ("learning_rate", "batch_size_tokens"):  # the surface's answer did not move
        assert after[key] == pytest.approx(before[key], rel=1e-9), key

    # the cbs fit: each group's B_noise beside its CBS, from the trials' b_simple summaries
    cbs_fit = client.latest_fit(kind=CBS_KIND, scope="family:step-law")
    groups = [g for g in cbs_fit["params"]["groups"] if g["target_rule"] == "measured"]
    assert len(groups) == 6
    for g in groups:
        noise = g["noise_scale"]
        assert noise["n_runs"] == len(BATCHES) - 1  # the censored run is left out
        assert noise["b_noise_q25_tokens"] <= noise["b_noise_tokens"] <= noise["b_noise_q75_tokens"]
        assert noise["b_noise_over_cbs"] == pytest.approx(
            noise["b_noise_tokens"] / g["fit"]["critical_batch_size"], rel=1e-9
        )
        trial = client.get_trial(g["best_trial_ids"][0])
        assert trial["b_simple"] is not None and trial["b_simple"] > 1e6


def test_a_family_of_protocol_runs_alone_is_served_its_cbs(
    fresh_pg, database_for, live_server_factory
):
    """A family whose only runs are the cbs protocol's measures S(B), not L(η, B): no loss
    surface, so η and B are NaN with a warning saying why, while the CBS and its law come
    from the measured steps to target."""
    database = database_for(fresh_pg)
    server = live_server_factory(database_url=fresh_pg)
    client = HyperlawClient(server.url, server.token, max_retries=1)
    experiment = client.ensure_experiment("protocol", family="protocol-only")
    for i, n_tokens in enumerate(BUDGETS):
        post_protocol_group(client, experiment["id"], SIZES[0], n_tokens, 3.0 - 0.1 * i)
    outcomes = refit_once(database, kinds=[RECOMMENDER_KIND], options=OPTIONS)
    assert {(o.scope, o.status) for o in outcomes} >= {("family:protocol-only", "ok")}
    answer = client.recommend(n_params=SIZES[0], n_tokens=1e10, family="protocol-only")
    assert math.isnan(answer["learning_rate"]) and math.isnan(answer["batch_size_tokens"])
    assert answer["sources"]["learning_rate"].startswith("unavailable: no loss surface")
    assert any("NaN" in w and "steps to target" in w for w in answer["warnings"])
    law = answer["critical_batch_size_law"]
    assert law["n_groups"] == 3 and law["n_params_exponent"] == 0.0  # one N: a law in D
    cbs = 1.2 * B_REF + 0.2 * np.array([k_of(d) for d in BUDGETS])
    gamma, c0 = np.polyfit(np.log(BUDGETS), np.log(cbs), 1)
    assert law["n_tokens_exponent"] == pytest.approx(gamma, abs=1e-6)
    assert answer["critical_batch_size_tokens"] == pytest.approx(
        math.exp(c0 + gamma * math.log(1e10)), rel=1e-6
    )
    assert answer["sources"]["critical_batch_size_tokens"] == law["source"]
