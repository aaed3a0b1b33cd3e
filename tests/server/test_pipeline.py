"""Import -> fit -> recommend, end to end on PostgreSQL and SQLite, through the library,
the CLI and the API."""

from __future__ import annotations

import json
import math
import re

import httpx
from sqlalchemy import select

from server import crud
from server.importers import import_steplaw
from server.models import Fit, Trial
from server.recommend import recommend_from_database
from server.worker.fits import RECOMMENDER_KIND
from server.worker.loop import refit_once, stale_scopes
from server.worker.scopes import experiment_scope, family_scope, scope_watermarks
from tests.databases import light_fits, run_hyperlaw, shared_fitter

STEP_LAW = family_scope("step-law")
KEYS = ("learning_rate", "batch_size_tokens", "batch_size_sequences", "critical_batch_size_tokens")


def test_import_fit_recommend(fresh_db, database_for):
    database = database_for(fresh_db)
    experiment_id, created, existing = import_steplaw(database)
    assert (created, existing) == (1911, 0)
    assert import_steplaw(database)[1:] == (0, 1911)  # idempotent

    assert stale_scopes(database) == [STEP_LAW, experiment_scope(experiment_id)]
    only = [RECOMMENDER_KIND]  # the estimators' fits: tests/server/worker/test_fits.py
    # the default fits, computed once per distinct input: the second backend loads the same
    # runs, so it stores and serves the fits computed for the first (shared_fitter)
    outcomes = refit_once(database, kinds=only, fitter=shared_fitter)
    assert [(o.scope, o.action, o.status) for o in outcomes] == [
        (STEP_LAW, "fitted", "ok"),
        (experiment_scope(experiment_id), "fitted", "ok"),
    ]
    assert refit_once(database, kinds=only) == []  # nothing changed, nothing refitted

    with database.session() as session:
        fit = crud.latest_ok_fit(session=session, kind=RECOMMENDER_KIND, scope=STEP_LAW)
        marks = scope_watermarks(session)
        trial_ids = set(session.scalars(select(Trial.id)))
        assert fit.data_watermark == marks[STEP_LAW]
        assert fit.n_trials == 1911 and set(fit.trial_ids) == trial_ids
        assert fit.params["n_runs"] == 1911
        assert fit.quality["n_bootstrap_ok"] > 0
        iv = fit.intervals["learning_rate_interval"]
        assert 0 < iv["low"] < iv["high"]

    body = recommend_from_database(database, n_params=1e9, n_tokens=1e11)
    for key in KEYS:
        assert math.isfinite(body[key]) and body[key] > 0, key
        low, high = body[f"{key}_interval"]["low"], body[f"{key}_interval"]["high"]
        assert low <= body[key] <= high, key
    assert body["fit_ids"] == [fit.id] and body["n_trials"] == 1911
    assert (body["family"], body["fit_key"], body["scope"]) == ("step-law", "step-law", STEP_LAW)
    # Step Law's own fit puts eta* near 1e-3 and B* near 1e6 tokens around (1e9, 1e11).
    assert 3e-4 < body["learning_rate"] < 5e-3
    assert 2.5e5 < body["batch_size_tokens"] < 4e6
    assert body["critical_batch_size_tokens"] > body["batch_size_tokens"]
    assert body["warnings"] == []


def test_cli_and_api_give_the_same_numbers(seeded_pg, live_server_factory):
    server = live_server_factory(database_url=seeded_pg)
    query = {"n_params": "3e8", "n_tokens": "2e10", "batch_size_tokens": "2097152"}
    api = httpx.get(server.url + "/v1/recommendations", params=query, timeout=10).json()
    cli_args = [
        "recommend",
        "--n-params",
        "3e8",
        "--n-tokens",
        "2e10",
        "--batch-size-tokens",
        "2097152",
        "--json",
    ]
    from_db = run_hyperlaw(seeded_pg, *cli_args)
    assert from_db.returncode == 0, from_db.stderr
    via_url = run_hyperlaw(seeded_pg, *cli_args, "--url", server.url)
    assert via_url.returncode == 0, via_url.stderr
    for out in (from_db.stdout, via_url.stdout):
        cli = json.loads(out)
        assert set(cli) == set(api)
        for key in (*KEYS, "learning_rate_for_batch", "step_overhead", "token_overhead"):
            assert cli[key] == api[key], key
        assert cli["fit_ids"] == api["fit_ids"] and cli["fitted_at"] == api["fitted_at"]

    text = run_hyperlaw(seeded_pg, "recommend", "--n-params", "3e8", "--n-tokens", "2e10")
    assert text.returncode == 0, text.stderr
    assert "learning_rate" in text.stdout and f"{api['fit_ids'][0]}" in text.stdout


def test_cli_commands(fresh_pg):
    """The commands' arguments, output and exit codes, on PostgreSQL only: what each command
    does to a database of either kind is checked on both by test_import_fit_recommend and
    test_import_runs_csv (the same import, fit and recommend code, and the CLI's own import)
    and by tests/server/worker/test_fits.py (every kind fitted and stored)."""
    empty = run_hyperlaw(fresh_pg, "recommend", "--n-params", "1e9", "--n-tokens", "1e11")
    assert empty.returncode == 2 and "hyperlaw import steplaw" in empty.stderr
    imported = run_hyperlaw(fresh_pg, "import", "steplaw")
    assert imported.returncode == 0, imported.stderr
    assert "1911 trials imported" in imported.stdout and "arXiv:2503.04715" in imported.stdout
    fitted = run_hyperlaw(fresh_pg, "fit")
    assert fitted.returncode == 0, fitted.stderr
    for kind in ("recommender", "near_optimal", "bell"):
        assert re.search(rf"^family:step-law {kind}: fitted fit \d+ ok$", fitted.stdout, re.M)
    assert re.search(
        r"^family:step-law cbs: fitted fit \d+ insufficient_data \(no trial has steps",
        fitted.stdout,
        re.M,
    )
    again = run_hyperlaw(fresh_pg, "fit")
    assert "up to date" in again.stdout
    bad = run_hyperlaw(fresh_pg, "recommend", "--n-params", "-5", "--n-tokens", "1e11")
    assert bad.returncode == 2 and "n_params must be finite and > 0" in bad.stderr
    by_name = run_hyperlaw(
        fresh_pg,
        "recommend",
        "--n-params",
        "1e9",
        "--n-tokens",
        "1e11",
        "--experiment",
        "steplaw",
        "--json",
    )
    assert by_name.returncode == 0 and json.loads(by_name.stdout)["scope"].startswith("experiment:")
    assert json.loads(by_name.stdout)["family"] is None  # an experiment's own fit
    listed = run_hyperlaw(fresh_pg, "families")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("step-law: 1 experiment(s), 1911 completed trial(s) in 17")
    assert "fit key step-law: 1911 trial(s), 17 group(s) (main" in listed.stdout
    assert re.search(r"recommender fit \d+ ok", listed.stdout)
    unknown = run_hyperlaw(
        fresh_pg, "recommend", "--n-params", "1e9", "--n-tokens", "1e11", "--family", "nope"
    )
    assert unknown.returncode == 2 and "known families: step-law" in unknown.stderr


def test_import_runs_csv(fresh_db, tmp_path, database_for):
    """A generic CSV of past runs becomes imported trials that the worker fits; a bad file
    is refused whole with its line numbers."""
    from fitting.data import bundled_steplaw_path, load_steplaw_csv

    runs = load_steplaw_csv(bundled_steplaw_path())
    path = tmp_path / "past.csv"
    lines = ["n_params,n_tokens,seq_len,learning_rate,batch_size_tokens,final_loss"]
    lines += [
        f"{runs.n_params[i]:.0f},{runs.n_tokens[i]:.0f},{runs.seq_len[i]},"
        f"{float(runs.learning_rate[i])!r},{runs.batch_size_tokens[i]:.0f},"
        f"{float(runs.loss[i])!r}"
        for i in range(len(runs))
    ]
    path.write_text("\n".join(lines) + "\n")
    bad = tmp_path / "bad.csv"
    bad.write_text(lines[0] + "\n" + lines[1] + "\n1e9,1e11,2048,-1,1e6,3.0\n")
    refused = run_hyperlaw(fresh_db, "import", "runs", str(bad))
    assert refused.returncode == 2 and "line 3" in refused.stderr
    bad_family = run_hyperlaw(fresh_db, "import", "runs", str(path), "--family", "team a")
    assert bad_family.returncode == 2 and "--family must be 1-100 characters" in bad_family.stderr
    args = ("import", "runs", str(path), "--experiment", "past")
    done = run_hyperlaw(fresh_db, *args, "--family", "team-a")
    assert done.returncode == 0, done.stderr
    assert "family team-a): 1911 trials imported" in done.stdout
    elsewhere = run_hyperlaw(fresh_db, *args)  # the default family: not where "past" is
    assert elsewhere.returncode == 2 and "is in family 'team-a', not 'default'" in elsewhere.stderr
    database = database_for(fresh_db)
    # light fits: nothing below reads an interval or the law forms' averaged answer; computed
    # once per distinct input, as in test_import_fit_recommend
    outcomes = refit_once(database, kinds=[RECOMMENDER_KIND], fitter=shared_fitter, **light_fits())
    assert {(o.scope, o.status) for o in outcomes} == {
        ("family:team-a", "ok"),
        ("experiment:1", "ok"),
    }
    with database.session() as session:
        fits = session.scalars(select(Fit)).all()
        assert {f.n_trials for f in fits} == {1911}
    answer = recommend_from_database(database, n_params=1e9, n_tokens=1e11, family="team-a")
    assert answer["family"] == "team-a" and answer["n_trials"] == 1911
