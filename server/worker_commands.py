"""``hyperlaw worker``, ``fit``, ``recommend``, ``import steplaw|runs`` and ``quickstart``.

Imports stay light at module level; each handler imports what it needs.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import signal
import sys
from pathlib import Path

log = logging.getLogger(__name__)

STEPLAW_CITATION = (
    "Li et al., \"Predictable Scale: Part I -- Optimal Hyperparameter Scaling Law in Large "
    "Language Model Pretraining\", arXiv:2503.04715, 2025 (repository step-law/steplaw)"
)
STEPLAW_EXPERIMENT = "steplaw"
EXAMPLE_QUERY = "/v1/recommendations?n_params=1e9&n_tokens=1e11"


def register(subparsers: argparse._SubParsersAction) -> None:
    worker = subparsers.add_parser(
        "worker", help="run the fitting worker: refit whenever new trial results land")
    worker.set_defaults(func=cmd_worker)

    fit = subparsers.add_parser("fit", help="refit every scope whose data changed, then exit")
    fit.set_defaults(func=cmd_fit)

    rec = subparsers.add_parser(
        "recommend", help="learning rate, batch size and critical batch size for (N, D)")
    rec.add_argument("--n-params", type=float, required=True,
                     help="non-embedding parameters N, e.g. 1e9")
    rec.add_argument("--n-tokens", type=float, required=True, help="training tokens D")
    rec.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    rec.add_argument("--batch-size-tokens", type=float, default=None,
                     help="impose this batch size (tokens): best η for it and its overheads")
    rec.add_argument("--experiment", default=None,
                     help="experiment id or name (default: the fit over all trials)")
    rec.add_argument("--json", action="store_true", help="print the API's JSON body")
    rec.add_argument("--url", default=None,
                     help="ask this hyperlaw server instead of reading the database")
    rec.set_defaults(func=cmd_recommend)

    imp = subparsers.add_parser("import", help="put published or past sweeps into the store")
    imp_sub = imp.add_subparsers(dest="import_command", required=True, metavar="FORMAT")
    steplaw = imp_sub.add_parser(
        "steplaw", help="a Step Law CSV (default: the copy bundled with hyperlaw)")
    steplaw.add_argument("file", nargs="?", default=None,
                         help="dense_lr_bs_loss.csv of step-law/steplaw (default: bundled)")
    steplaw.add_argument("--experiment", default=STEPLAW_EXPERIMENT,
                         help=f"experiment name (default: {STEPLAW_EXPERIMENT})")
    steplaw.set_defaults(func=cmd_import_steplaw)
    runs = imp_sub.add_parser("runs", help="a CSV of runs (columns: see fitting.data)")
    runs.add_argument("file")
    runs.add_argument("--experiment", default=None,
                      help="experiment name (default: the file's name without .csv)")
    runs.set_defaults(func=cmd_import_runs)

    quick = subparsers.add_parser(
        "quickstart",
        help="migrate, import the bundled Step Law sweep if empty, fit, and serve")
    quick.add_argument("--host", default=None, help="bind address (default: 127.0.0.1)")
    quick.add_argument("--port", type=int, default=None, help="port (default: 8000)")
    quick.set_defaults(func=cmd_quickstart)


def _settings():
    from server.core.config import get_settings

    return get_settings()


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --- worker and fit ------------------------------------------------------------------------

def cmd_worker(args: argparse.Namespace) -> int:
    from server.worker import FittingWorker

    settings = _settings()
    worker = FittingWorker(settings.database_url, poll_s=settings.worker_poll_s)

    def _stop(signum, _frame):
        log.info("signal %d: stopping after the current fit", signum)
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    worker.run()
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from server.core.db import make_engine
    from server.worker import refit_once

    engine = make_engine(_settings().database_url)
    try:
        outcomes = refit_once(engine)
    finally:
        engine.dispose()
    if not outcomes:
        _out("every scope is up to date (or there are no completed trials)")
    for o in outcomes:
        detail = f" fit {o.fit_id} {o.status}" if o.fit_id is not None else ""
        _out(f"{o.scope} {o.kind}: {o.action}{detail}"
             f"{f' ({o.message})' if o.message else ''}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


# --- recommend -----------------------------------------------------------------------------

def recommend_from_database(database_url: str, *, n_params: float, n_tokens: float,
                            seq_len: int = 2048, batch_size_tokens: float | None = None,
                            experiment: str | None = None) -> dict:
    """The API's recommendation body, computed from the newest ok fit in the database.

    Raises ``LookupError`` when there is no such fit (or no such experiment) and
    ``ValueError`` for bad parameters.
    """
    from sqlalchemy import select

    from fitting.recommender import Recommender
    from server.api.routes.recommendations import HOW_TO_FIT
    from server.core.db import make_engine, make_session_factory, session_scope
    from server.models import Experiment
    from server.worker import GLOBAL_SCOPE, experiment_scope, latest_ok_fit, recommendation_body

    engine = make_engine(database_url, sqlite_immediate=False)
    try:
        with session_scope(make_session_factory(engine)) as session:
            scope = GLOBAL_SCOPE
            if experiment is not None:
                ident = int(experiment) if experiment.isdigit() else session.scalar(
                    select(Experiment.id).where(Experiment.name == experiment))
                if ident is None:
                    raise LookupError(f"experiment {experiment!r} not found")
                scope = experiment_scope(ident)
            fit = latest_ok_fit(session, scope)
            if fit is None:
                raise LookupError(f"no recommender fit for scope {scope} yet. To get one: "
                                  f"{HOW_TO_FIT}")
            fit_id, fitted_at, n_trials, params = fit.id, fit.created_at, fit.n_trials, fit.params
    finally:
        engine.dispose()
    answer = Recommender.from_dict(params).recommend(
        n_params, n_tokens, seq_len=seq_len, batch_size_tokens=batch_size_tokens)
    return recommendation_body(answer, fit_id=fit_id, fitted_at=fitted_at, n_trials=n_trials,
                               scope=scope)


def format_recommendation(body: dict) -> str:
    """Human-readable lines for a recommendation body."""
    def iv(name: str) -> str:
        interval = body.get(f"{name}_interval") or {}
        low, high = interval.get("low"), interval.get("high")
        if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
            return ""
        return f"   [{low:.4g}, {high:.4g}] ({100 * interval.get('level', 0.9):.0f} %)"

    lines = [f"N={body['n_params']:.4g} parameters, D={body['n_tokens']:.4g} tokens, "
             f"seq_len={body['seq_len']}"]
    for name in ("learning_rate", "batch_size_tokens", "batch_size_sequences",
                 "critical_batch_size_tokens"):
        lines.append(f"  {name:<28}{body[name]:<12.4g}{iv(name)}")
    if body.get("imposed_batch_size_tokens") is not None:
        lines.append(f"at batch_size_tokens={body['imposed_batch_size_tokens']:.4g}:")
        lines.append(f"  {'learning_rate_for_batch':<28}{body['learning_rate_for_batch']:<12.4g}"
                     f"{iv('learning_rate_for_batch')}")
        lines.append(f"  {'step_overhead':<28}{body['step_overhead']:<12.4g}")
        lines.append(f"  {'token_overhead':<28}{body['token_overhead']:<12.4g}")
    lines.append(f"fit {', '.join(map(str, body['fit_ids']))} ({body['scope']}) on "
                 f"{body['n_trials']} trials, fitted at {body['fitted_at']}")
    lines.extend(f"warning: {w}" for w in body.get("warnings", []))
    return "\n".join(lines)


def cmd_recommend(args: argparse.Namespace) -> int:
    params = dict(n_params=args.n_params, n_tokens=args.n_tokens, seq_len=args.seq_len)
    if args.batch_size_tokens is not None:
        params["batch_size_tokens"] = args.batch_size_tokens
    if args.url:
        from client import HyperlawAPIError, HyperlawClient, HyperlawUnavailable

        if args.experiment is not None:
            params["experiment"] = args.experiment
        try:
            body = HyperlawClient(args.url, max_retries=1).recommend(**params)
        except HyperlawAPIError as exc:
            log.error("%s", exc)
            return 2
        except HyperlawUnavailable as exc:
            log.error("%s", exc)
            return 1
    else:
        try:
            body = recommend_from_database(_settings().database_url,
                                           experiment=args.experiment, **params)
        except (LookupError, ValueError) as exc:
            log.error("%s", exc)
            return 2
    if args.json:
        from client.wire import dumps

        _out(dumps(body, indent=2))
    else:
        _out(format_recommendation(body))
    return 0


# --- import --------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def import_runs(database_url: str, runs, *, experiment: str, description: str,
                key_prefix: str, config: dict) -> tuple[int, int, int]:
    """Store ``runs`` (``fitting.data.Runs``) as completed, imported trials of
    ``experiment``, in one transaction. Row i gets the idempotency key
    ``<key_prefix>:<i>``, so importing the same file again adds nothing.

    Returns (experiment id, trials created, trials already there).
    """
    from server import crud
    from server.core.db import make_engine, make_session_factory, session_scope
    from server.models import TrialSource, TrialStatus
    from server.schemas import ExperimentCreate, TrialCreate

    engine = make_engine(database_url)
    created = existing = 0
    try:
        with session_scope(make_session_factory(engine)) as session:
            exp, _ = crud.create_experiment(
                session=session,
                experiment_in=ExperimentCreate(name=experiment, description=description))
            for i in range(len(runs)):
                loss = float(runs.loss[i])
                row_config = {**config, "row": i}
                if runs.steps_to_target is not None:
                    steps, target = float(runs.steps_to_target[i]), float(runs.target_loss[i])
                    if not math.isnan(steps) and not math.isnan(target):
                        row_config.update(steps_to_target=steps, target_loss=target)
                if runs.trial_id is not None:
                    row_config["original_trial_id"] = int(runs.trial_id[i])
                trial_in = TrialCreate(
                    experiment_id=exp.id,
                    n_params=int(round(float(runs.n_params[i]))),
                    n_tokens=int(round(float(runs.n_tokens[i]))),
                    seq_len=int(runs.seq_len[i]),
                    learning_rate=float(runs.learning_rate[i]),
                    batch_size_tokens=int(round(float(runs.batch_size_tokens[i]))),
                    status=TrialStatus.COMPLETED, source=TrialSource.IMPORTED,
                    idempotency_key=f"{key_prefix}:{i}", final_loss=loss,
                    diverged=not math.isfinite(loss), config=row_config,
                )
                _trial, was_created = crud.create_trial(session=session, trial_in=trial_in)
                created += was_created
                existing += not was_created
            experiment_id = exp.id
    finally:
        engine.dispose()
    return experiment_id, created, existing


def import_steplaw(database_url: str, path: str | Path | None = None,
                   experiment: str = STEPLAW_EXPERIMENT) -> tuple[int, int, int]:
    """Import a Step Law CSV (default: the bundled copy); see ``import_runs``."""
    from fitting.data import bundled_steplaw_path, load_steplaw_csv

    path = Path(path) if path is not None else bundled_steplaw_path()
    digest = _sha256(path)
    runs = load_steplaw_csv(path)
    return import_runs(
        database_url, runs, experiment=experiment,
        description=f"Step Law dense LR x batch-size sweep; {STEPLAW_CITATION}",
        key_prefix=f"steplaw:{digest[:16]}",
        config={"dataset": "steplaw", "citation": STEPLAW_CITATION, "file_sha256": digest},
    )


def cmd_import_steplaw(args: argparse.Namespace) -> int:
    from fitting.data import RunsCsvError

    try:
        exp_id, created, existing = import_steplaw(_settings().database_url, args.file,
                                                   args.experiment)
    except (OSError, RunsCsvError) as exc:
        log.error("%s", exc)
        return 2
    _out(f"experiment {args.experiment} ({exp_id}): {created} trials imported, "
         f"{existing} already there. Data: {STEPLAW_CITATION}")
    return 0


def cmd_import_runs(args: argparse.Namespace) -> int:
    from fitting.data import RunsCsvError, load_runs_csv

    path = Path(args.file)
    experiment = args.experiment or path.stem
    try:
        runs = load_runs_csv(path)
        digest = _sha256(path)
    except (OSError, RunsCsvError) as exc:
        log.error("%s", exc)
        return 2
    exp_id, created, existing = import_runs(
        _settings().database_url, runs, experiment=experiment,
        description=f"imported from {path.name}", key_prefix=f"runs:{digest[:16]}",
        config={"dataset": path.name, "file_sha256": digest},
    )
    _out(f"experiment {experiment} ({exp_id}): {created} trials imported, "
         f"{existing} already there")
    return 0


# --- quickstart ----------------------------------------------------------------------------

def cmd_quickstart(args: argparse.Namespace) -> int:
    """Migrate, import the bundled Step Law sweep into an empty store, fit the recommender,
    serve. The estimators' fits (slower) are left to the server's fitting worker, so the
    first answer does not wait for them."""
    from sqlalchemy import func, select

    from server.commands import cmd_serve
    from server.core.db import make_engine, make_session_factory, session_scope, upgrade
    from server.models import Trial
    from server.worker import FIT_KINDS, RECOMMENDER_KIND, refit_once

    settings = _settings()
    url = settings.database_url
    upgrade(url)
    engine = make_engine(url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            n_trials = session.scalar(select(func.count()).select_from(Trial))
        if n_trials:
            _out(f"database has {n_trials} trials; using them")
        else:
            _out(f"empty database: importing the bundled Step Law sweep ({STEPLAW_CITATION})")
            _id, created, _existing = import_steplaw(url)
            _out(f"imported {created} runs")
        outcomes = refit_once(engine, kinds=[RECOMMENDER_KIND])
        for o in outcomes:
            _out(f"fit {o.scope}: {o.action} {o.status or ''} {o.message or ''}".rstrip())
        if not outcomes:
            _out("fits are up to date")
        _out(f"the server's fitting worker fits {', '.join(FIT_KINDS[1:])} in the background")
    finally:
        engine.dispose()
    host = args.host or settings.host
    port = args.port or settings.port
    _out(f"serving on http://{host}:{port} (API docs at /docs); try:")
    _out(f"  curl 'http://{host}:{port}{EXAMPLE_QUERY}'")
    return cmd_serve(argparse.Namespace(host=host, port=port, no_worker=False))
