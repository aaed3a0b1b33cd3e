"""``hyperlaw import steplaw|runs|wandb-csv|mlflow``: published or past sweeps into the
trial store; ``server.cli`` registers them with its own.

``import runs`` writes the database of ``HYPERLAW_DATABASE_URL``, or sends the file to a
running service (``--url``, else ``HYPERLAW_URL`` when it is set; ``POST /v1/imports/runs``
with ``HYPERLAW_TOKEN``), and logs (INFO) which. The others write the database. Each is all
or nothing: a bad file (or run) is reported line by line (run by run), and nothing is
stored.

Parsing and printing only: the handlers call ``server.importers`` and, for the trackers,
``server.wandb_csv``, ``server.mlflow_runs`` and ``server.tracked_runs``. Exit codes as in
``server.cli``: 0 done, 1 the service could not be reached, 2 unusable input or database.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from server.cli_data import ASK_SERVER_HELP, out, service_url, store

log = logging.getLogger(__name__)

MAP_HELP = (
    "FIELD=NAME: fill a trial field (n_params, n_tokens, seq_len, learning_rate, "
    "batch_size_tokens, final_loss) or a point's (step, train_loss, eval_loss, lr, grad_norm, "
    "tokens, wall_time_s) from NAME, e.g. learning_rate=optimizer.lr; repeatable"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``import`` and its formats to the ``hyperlaw`` parser."""
    imp = subparsers.add_parser("import", help="put published or past sweeps into the store")
    imp_sub = imp.add_subparsers(dest="import_command", required=True, metavar="FORMAT")
    steplaw = imp_sub.add_parser(
        "steplaw", help="a Step Law CSV (default: the copy bundled with hyperlaw)"
    )
    steplaw.add_argument(
        "file", nargs="?", help="dense_lr_bs_loss.csv of step-law/steplaw (default: bundled)"
    )
    steplaw.add_argument(
        "--experiment", help="experiment name (default: steplaw); its family is step-law"
    )
    steplaw.set_defaults(func=cmd_import_steplaw)
    runs = imp_sub.add_parser("runs", help="a CSV of runs (columns: see fitting.data)")
    runs.add_argument("file")
    runs.add_argument(
        "--experiment", help="experiment name (default: the file's name without .csv)"
    )
    _family_argument(runs)
    runs.add_argument("--url", help=ASK_SERVER_HELP.replace("ask", "send the file to"))
    runs.set_defaults(func=cmd_import_runs)

    wandb = imp_sub.add_parser("wandb-csv", help="a W&B runs table exported as CSV")
    wandb.add_argument("file", help="the runs table's CSV (Name, State, config and summary)")
    wandb.add_argument(
        "--history", help="a history CSV (_step, metrics, a run column): the runs' points"
    )
    wandb.add_argument("--experiment", required=True, help="experiment name")
    _family_argument(wandb)
    wandb.add_argument("--map", action="append", default=[], metavar="FIELD=NAME", help=MAP_HELP)
    wandb.set_defaults(func=cmd_import_wandb)

    mlflow = imp_sub.add_parser("mlflow", help="the runs of an MLflow experiment")
    mlflow.add_argument(
        "store", help="tracking URI (sqlite:///mlflow.db, http://...), SQLite file or mlruns/"
    )
    mlflow.add_argument("--experiment-name", required=True, help="the MLflow experiment")
    mlflow.add_argument("--experiment", help="experiment name (default: --experiment-name)")
    _family_argument(mlflow)
    mlflow.add_argument("--map", action="append", default=[], metavar="FIELD=NAME", help=MAP_HELP)
    mlflow.set_defaults(func=cmd_import_mlflow)


def _family_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--family",
        default="default",
        help="the family of the runs: what their losses are comparable with (default: default)",
    )


def _bad_family(family: str) -> bool:
    from client.wire import family_name_problem

    problem = family_name_problem(family)
    if problem is not None:
        log.error("--family %s", problem)
    return problem is not None


def cmd_import_steplaw(args: argparse.Namespace) -> int:
    from fitting.data import RunsCsvError
    from server.core.errors import ConflictError
    from server.importers import STEPLAW_CITATION, STEPLAW_EXPERIMENT, import_steplaw

    experiment = args.experiment or STEPLAW_EXPERIMENT
    try:
        with store() as database:
            exp_id, created, existing = import_steplaw(database, args.file, experiment)
    except (OSError, RunsCsvError, ConflictError) as exc:
        log.error("%s", exc)
        return 2
    out(
        f"experiment {experiment} ({exp_id}, family step-law): {created} trials imported, "
        f"{existing} already there. Data: {STEPLAW_CITATION}"
    )
    return 0


def _send_runs(url: str, path: str, experiment: str, family: str) -> dict[str, Any] | int:
    """``POST /v1/imports/runs`` of the file: the answer's body, or an exit code."""
    from client import HyperlawAPIError, HyperlawClient, HyperlawUnavailable

    try:
        data = Path(path).read_bytes()
        with HyperlawClient(url, max_retries=1) as client:
            return client.import_runs_csv(data, experiment=experiment, family=family)
    except OSError as exc:
        log.error("%s", exc)
        return 2
    except HyperlawAPIError as exc:
        if isinstance(exc.detail, list):  # a 422: every bad line
            lines = [str(e.get("message", e)) for e in exc.detail if isinstance(e, dict)]
            log.error(
                "%s: HTTP %d, nothing imported:\n  %s", path, exc.status_code, "\n  ".join(lines)
            )
        else:
            log.error("%s", exc)
        return 2
    except HyperlawUnavailable as exc:
        log.error("%s", exc)
        return 1


def cmd_import_runs(args: argparse.Namespace) -> int:
    from fitting.data import RunsCsvError
    from server.core.errors import ConflictError
    from server.importers import import_runs_csv

    if _bad_family(args.family):
        return 2
    experiment = args.experiment or Path(args.file).stem
    url = service_url(args.url)
    if url:
        answer = _send_runs(url, args.file, experiment, args.family)
        if isinstance(answer, int):
            return answer
        exp_id, created, existing = answer["experiment_id"], answer["created"], answer["existing"]
    else:
        try:
            with store() as database:
                exp_id, created, existing = import_runs_csv(
                    database, args.file, experiment, family=args.family
                )
        except (OSError, RunsCsvError, ConflictError) as exc:
            log.error("%s", exc)
            return 2
    out(
        f"experiment {experiment} ({exp_id}, family {args.family}): {created} trials "
        f"imported, {existing} already there"
    )
    return 0


def _store_tracked(args: argparse.Namespace, runs: list, skipped: list[str], source: str) -> int:
    """Store a tracker's runs (``server.tracked_runs``) and print what was stored."""
    from server.core.errors import HyperlawError
    from server.tracked_runs import store_tracked_runs

    experiment = args.experiment
    try:
        with store() as database:
            exp_id, created, existing, n_points = store_tracked_runs(
                database,
                runs,
                experiment=experiment,
                family=args.family,
                description=f"imported from {source}",
            )
    except (HyperlawError, ValueError) as exc:  # ValueError: pydantic's, a bad experiment name
        log.error("%s", exc)
        return 2
    if skipped:
        log.warning(
            "%d run(s) not over (running, pending or preempted) left out, to import once "
            "they are: %s",
            len(skipped),
            ", ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else ""),
        )
    out(
        f"experiment {experiment} ({exp_id}, family {args.family}): {created} trials "
        f"imported, {existing} already there, {n_points} points stored, {len(skipped)} runs "
        "not over left out"
    )
    return 0


def cmd_import_wandb(args: argparse.Namespace) -> int:
    from fitting.data import RunsCsvError
    from server.tracked_runs import parse_maps
    from server.wandb_csv import read_wandb

    if _bad_family(args.family):
        return 2
    try:
        maps = parse_maps(args.map)
        runs, skipped, columns = read_wandb(args.file, args.history, maps)
    except (OSError, RunsCsvError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    log.info("fields from columns: %s", ", ".join(f"{k}={v}" for k, v in columns.items()))
    return _store_tracked(args, runs, skipped, Path(args.file).name)


def cmd_import_mlflow(args: argparse.Namespace) -> int:
    from server.mlflow_runs import read_mlflow
    from server.tracked_runs import parse_maps

    if _bad_family(args.family):
        return 2
    args.experiment = args.experiment or args.experiment_name
    try:
        maps = parse_maps(args.map)
        runs, skipped = read_mlflow(args.store, args.experiment_name, maps)
    except ImportError as exc:
        log.error(
            "hyperlaw import mlflow needs the mlflow package (pip install mlflow-skinny): %s", exc
        )
        return 2
    except ValueError as exc:  # MlflowImportError is one
        log.error("%s", exc)
        return 2
    return _store_tracked(args, runs, skipped, f"MLflow experiment {args.experiment_name}")
