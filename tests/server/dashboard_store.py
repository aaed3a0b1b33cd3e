"""A store for the dashboard's tests (``test_dashboard.py``, ``test_dashboard_browser.py``):
a live service over a PostgreSQL database holding the Step Law sweep with every kind of fit
(the recommender with its intervals), a family with measured steps to target (the cbs:
protocol's trial fields) and a family with a running trial and its curve. Built once per
session; tests that add data add their own trials."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from client import HyperlawClient
from server.core.db import Database, open_database, upgrade
from server.worker.fits import BELL_KIND, CBS_KIND, NEAR_OPTIMAL_KIND
from server.worker.loop import refit_once
from server.worker.scopes import family_scope
from tests.conftest import LiveServer, start_live_server
from tests.databases import light_fits, seed_steplaw

CBS_FAMILY = "cbs-demo"
LIVE_FAMILY = "live-demo"
B_REF = 2**16
BATCHES = [B_REF * 2**k for k in range(6)]
CBS_BUDGETS = (5e9, 2e10, 8e10)
CBS_N = 300_000_000
GROUP = {"n_params": 214663680, "n_tokens": 4000000000}  # a Step Law group


@dataclass
class Store:
    server: LiveServer
    client: HyperlawClient
    http: httpx.Client
    database: Database
    running_trial: int


def post_measured_group(
    client: HyperlawClient, experiment_id: int, n_tokens: float, target: float
) -> None:
    """One (N, D) group as the cbs: protocol leaves it: S(B) = a·(1 + k/B) steps to the
    target (a group is a model size and a target), the largest batch size censored (never
    reached it within its cap)."""
    k = 2.0**23 * (n_tokens / 2e10) ** 0.5
    a = n_tokens / (B_REF + k)
    for batch in BATCHES:
        censored = batch == BATCHES[-1]
        steps = a * (1 + k / batch)
        trial = client.create_trial(
            experiment_id=experiment_id,
            n_params=CBS_N,
            n_tokens=int(n_tokens),
            seq_len=2048,
            learning_rate=1e-3,
            batch_size_tokens=batch,
            status="running",
        )
        done = int(2 * n_tokens // batch) if censored else math.ceil(steps)
        client.update_trial(
            trial["id"],
            status="completed",
            final_eval_loss=target + (0.01 if censored else 0.0),
            stop_reason="budget" if batch == B_REF or censored else "target",
            tokens_done=done * batch,
            steps_done=done,
            target_loss=target,
            reached_target=not censored,
            steps_to_target=None if censored else steps,
        )


def curve(n_points: int) -> list[dict]:
    """A running trial's first points: 1,000 steps planned of 64 sequences of 256 tokens."""
    return [
        {"step": s, "tokens": (s + 1) * 64 * 256, "train_loss": 5 / (s + 1) ** 0.3, "lr": 1e-3}
        for s in range(n_points)
    ]


def start_running_trial(client: HyperlawClient, n_points: int) -> dict:
    """A new running trial of the live family with the first ``n_points`` of :func:`curve`."""
    live = client.ensure_experiment("live", family=LIVE_FAMILY)
    trial = client.create_trial(
        experiment_id=live["id"],
        n_params=10**6,
        n_tokens=64 * 1000 * 256,
        seq_len=256,
        learning_rate=1e-3,
        batch_size_tokens=64 * 256,
        status="running",
    )
    client.post_points(trial["id"], curve(n_points))
    return trial


@pytest.fixture(scope="session")
def dashboard_store(make_database, tmp_path_factory) -> Iterator[Store]:
    url = make_database("postgresql")
    upgrade(url)
    seed_steplaw(url)  # the recommender with its intervals
    with open_database(url) as database:  # the estimators' fits, light: only shown here
        refit_once(database, kinds=[NEAR_OPTIMAL_KIND, BELL_KIND], **light_fits())
    server = start_live_server(url, log_dir=tmp_path_factory.mktemp("dashboard"))
    client = HyperlawClient(server.url, server.token, max_retries=1)
    database = Database.from_url(url)
    experiment = client.ensure_experiment("protocol", family=CBS_FAMILY)
    for i, n_tokens in enumerate(CBS_BUDGETS):
        post_measured_group(client, experiment["id"], n_tokens, 3.0 - 0.1 * i)
    refit_once(
        database,
        kinds=[CBS_KIND],
        scopes=[family_scope(CBS_FAMILY)],
        options={"n_bootstrap": 8, "law_forms": False},
    )
    trial = start_running_trial(client, 100)
    http = httpx.Client(base_url=server.url, timeout=60)
    yield Store(server, client, http, database, trial["id"])
    http.close()
    client.close()
    database.dispose()
    server.stop()
