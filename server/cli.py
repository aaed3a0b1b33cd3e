"""The service's commands: ``hyperlaw serve``, ``db upgrade|downgrade|current|backup|restore``,
``token create|list|revoke``, ``worker``, ``fit`` and ``quickstart``, and (from
``server.cli_data``) ``recommend`` and ``families``, (from ``server.cli_import``) ``import
steplaw|runs|wandb-csv|mlflow`` and (from ``server.cli_plot``) ``plot``.

Parsing and printing only: each handler calls the functions the API and the worker use
(``server.crud``, ``server.importers``, ``server.worker.loop``, ``server.backup``).
Module-level imports stay light so that ``hyperlaw --help`` answers at once; each handler
imports what it needs. Results go to stdout, diagnostics to the log (stderr). Exit codes: 0
done, 1 refused or failed (e.g. a failed fit, revoking a token that does not exist), 2
unusable input or database, among them a database not migrated to this version (one line
naming ``hyperlaw db upgrade``) and a token name in use (one line naming ``--replace``).

``serve`` first migrates an empty database, or one at an older revision, to this version's
schema (one log line says so); it refuses one at a revision it does not know.

``python -m server.cli`` runs only these commands (no trainer or fitting commands).
"""

from __future__ import annotations

import argparse
import logging
import sys

from server import cli_data, cli_import, cli_plot
from server.cli_data import out as _out
from server.cli_data import settings as _settings
from server.cli_data import shown as _shown
from server.cli_data import store as _store

log = logging.getLogger(__name__)

EXAMPLE_QUERY = "/v1/recommendations?n_params=1e9&n_tokens=1e11"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the service's commands to the ``hyperlaw`` parser."""
    serve = subparsers.add_parser("serve", help="run the REST service (and the fitting worker)")
    serve.add_argument("--host", help="bind address (default: HYPERLAW_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: HYPERLAW_PORT or 8000)")
    serve.add_argument("--no-worker", action="store_true", help="do not run the fitting worker")
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per request on stderr (default: HYPERLAW_ACCESS_LOG or off)",
    )
    serve.set_defaults(func=cmd_serve)

    db = subparsers.add_parser("db", help="database migrations")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = db_sub.add_parser("upgrade", help="migrate the database to the newest schema")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=cmd_db_upgrade)
    down = db_sub.add_parser("downgrade", help="migrate the database down to REVISION")
    down.add_argument("revision", help="target revision, e.g. 0001, or base for empty")
    down.set_defaults(func=cmd_db_downgrade)
    cur = db_sub.add_parser("current", help="show the database's revision and the newest one")
    cur.set_defaults(func=cmd_db_current)
    backup = db_sub.add_parser(
        "backup", help="write the database to FILE (PostgreSQL: pg_dump -Fc; SQLite: a copy)"
    )
    backup.add_argument("file", help="the backup file to write")
    backup.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    backup.set_defaults(func=cmd_db_backup)
    restore = db_sub.add_parser(
        "restore", help="replace the database's contents with the backup in FILE"
    )
    restore.add_argument("file", help="a file written by `hyperlaw db backup`")
    restore.set_defaults(func=cmd_db_restore)

    token = subparsers.add_parser("token", help="API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_sub.add_parser("create", help="create a token and print it (shown once)")
    create.add_argument("--name", required=True)
    create.add_argument("--scope", required=True, choices=["read", "write", "admin"])
    create.add_argument(
        "--owner", help="who the token is for, free text (with --replace: the old one's)"
    )
    create.add_argument(
        "--replace",
        action="store_true",
        help="revoke the token of that name (kept in `token list`) and create a new one",
    )
    create.set_defaults(func=cmd_token_create)
    listing = token_sub.add_parser(
        "list", help="list tokens (names, scopes, owners, never secrets)"
    )
    listing.set_defaults(func=cmd_token_list)
    revoke = token_sub.add_parser("revoke", help="revoke a token by name")
    revoke.add_argument("--name", required=True)
    revoke.set_defaults(func=cmd_token_revoke)

    worker = subparsers.add_parser(
        "worker", help="run the fitting worker: refit whenever new trial results land"
    )
    worker.set_defaults(func=cmd_worker)
    fit = subparsers.add_parser("fit", help="refit every scope whose data changed, then exit")
    fit.set_defaults(func=cmd_fit)

    cli_data.register(subparsers)  # recommend, families
    cli_import.register(subparsers)  # import
    cli_plot.register(subparsers)  # plot

    quick = subparsers.add_parser(
        "quickstart", help="migrate, import the bundled Step Law sweep if empty, fit, and serve"
    )
    quick.add_argument("--host", help="bind address (default: 127.0.0.1)")
    quick.add_argument("--port", type=int, help="port (default: 8000)")
    quick.set_defaults(func=cmd_quickstart)


# --- serve, db, token ----------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import gc

    import uvicorn

    from server.core.db import migrate_to_head
    from server.core.errors import SchemaOutdatedError
    from server.main import BackgroundStarter, create_app
    from server.reaper import start_reaper

    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if args.access_log:
        updates["access_log"] = True
    settings = _settings().model_copy(update=updates)
    background: list[BackgroundStarter] = [start_reaper]
    if not args.no_worker:
        from server.worker.loop import start_worker_thread

        background.append(start_worker_thread)
    try:
        migrate_to_head(settings.database_url)  # an empty or older schema; logs one line
        app = create_app(settings, background=background)
    except SchemaOutdatedError as exc:  # an unknown revision, or tables without one
        log.error("%s", exc)
        return 2
    log.info("serving on http://%s:%d (docs at /docs)", settings.host, settings.port)
    # the ~130,000 objects of the imports and the app live as long as the process: out of
    # every full garbage collection, whose pause under load fell from 170 ms to 15 ms
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=_uvicorn_logging(),
        access_log=settings.access_log,
    )
    return 0


def _uvicorn_logging() -> dict:
    """uvicorn's logging with its own messages from WARNING up and, where it is on, its
    access log (INFO) on stderr beside them: stdout is for the commands' results."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config["loggers"]["uvicorn"]["level"] = "WARNING"
    config["loggers"]["uvicorn.error"]["level"] = "WARNING"
    config["loggers"]["uvicorn.access"]["level"] = "INFO"
    return config


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from server.core.db import current_revision, open_database, upgrade

    url = _settings().database_url
    upgrade(url, args.revision)
    with open_database(url) as database:
        log.info("database at revision %s", current_revision(database.engine))
    return 0


def cmd_db_downgrade(args: argparse.Namespace) -> int:
    from server.core.db import downgrade

    downgrade(_settings().database_url, args.revision)
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    from server.core.db import current_revision, head_revision, open_database

    with open_database(_settings().database_url) as database:
        current = current_revision(database.engine)
    head = head_revision()
    state = "up to date" if current == head else "out of date: run `hyperlaw db upgrade`"
    _out(f"current={current or 'none'} head={head} ({state})")
    return 0 if current == head else 1


def cmd_db_backup(args: argparse.Namespace) -> int:
    from server.backup import BackupError, BackupInputError, backup

    url = _settings().database_url
    try:
        summary = backup(url, args.file, overwrite=args.overwrite)
    except BackupError as exc:
        log.error("%s", exc)
        return 2 if isinstance(exc, BackupInputError) else 1
    _out(f"backed up {_shown(url)} to {summary.path} ({summary.describe()})")
    return 0


def cmd_db_restore(args: argparse.Namespace) -> int:
    from server.backup import BackupError, BackupInputError, restore
    from server.core.db import head_revision

    url = _settings().database_url
    try:
        summary = restore(url, args.file)
    except BackupError as exc:
        log.error("%s", exc)
        return 2 if isinstance(exc, BackupInputError) else 1
    _out(f"restored {summary.path} into {_shown(url)} ({summary.describe()})")
    if summary.revision != head_revision():
        log.warning(
            "the backup's schema is at revision %s, this version needs %s: run `hyperlaw db "
            "upgrade`",
            summary.revision,
            head_revision(),
        )
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    """Print the new token's secret, and nothing else on stdout: a name in use ends the
    command with one error line and exit status 2 unless ``--replace``, which revokes that
    token (renamed ``NAME (replaced, id N)``, as names are unique) in the same transaction;
    the new token keeps the old one's owner unless ``--owner`` names another."""
    from sqlalchemy import select

    from server import crud
    from server.core.errors import ConflictError, InputError
    from server.models import ApiToken, TokenScope

    try:
        with _store() as database, database.session() as session:
            old = session.scalar(select(ApiToken).where(ApiToken.name == args.name))
            if old is not None and not args.replace:
                state = "an active" if old.revoked_at is None else "a revoked"
                log.error(
                    "%s token named %r exists: pass --replace to revoke it and create a new "
                    "one, or choose another name (`hyperlaw token list` shows them)",
                    state,
                    args.name,
                )
                return 2
            owner = args.owner
            if old is not None:
                owner = old.owner if owner is None else owner
                crud.revoke_token(session=session, name=args.name)
                old.name = f"{args.name[:170]} (replaced, id {old.id})"
                session.flush()  # the name is free for the new token
                log.info("token %r revoked, listed as %r", args.name, old.name)
            _token, secret = crud.create_token(
                session=session, name=args.name, scope=TokenScope(args.scope), owner=owner
            )
    except (ConflictError, InputError) as exc:  # blank, or taken meanwhile
        log.error("%s", exc)
        return 2
    _out(secret)  # the command's output, shown this once; it is stored hashed
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from server import crud

    with _store() as database, database.session() as session:
        for t in crud.list_tokens(session=session):
            created = f"created {t.created_at:%Y-%m-%d %H:%M}"
            revoked = f"\trevoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else ""
            owner = f"\towner {t.owner}" if t.owner else ""
            _out(f"{t.name}\t{t.scope}\t{t.prefix}...\t{created}{owner}{revoked}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from server import crud
    from server.core.errors import NotFoundError

    try:
        with _store() as database, database.session() as session:
            crud.revoke_token(session=session, name=args.name)
    except NotFoundError as exc:
        log.error("%s", exc)
        return 1
    log.info("token %r revoked", args.name)
    return 0


# --- worker and fit ------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    import signal

    from server.worker.loop import worker_from_settings

    worker = worker_from_settings(_settings())

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping after the current fit", signum)
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    worker.run()
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from server.worker.loop import refit_once

    with _store() as database:
        outcomes = refit_once(database)
    if not outcomes:
        _out("every scope is up to date (or there are no completed trials)")
    for o in outcomes:
        detail = f" fit {o.fit_id} {o.status}" if o.fit_id is not None else ""
        _out(f"{o.scope} {o.kind}: {o.action}{detail}{f' ({o.message})' if o.message else ''}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


# --- quickstart ----------------------------------------------------------------------------


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Migrate, import the bundled Step Law sweep (family step-law) into an empty store, fit
    the default family's recommender, serve. The other scopes and the estimators' fits
    (slower) are left to the server's fitting worker, so the first answer does not wait for
    them."""
    from server import crud
    from server.core.db import upgrade
    from server.importers import STEPLAW_CITATION, import_steplaw
    from server.worker.fits import FIT_KINDS, RECOMMENDER_KIND
    from server.worker.loop import refit_once
    from server.worker.scopes import family_scope

    settings = _settings()
    upgrade(settings.database_url)
    with _store() as database:
        with database.session() as session:
            _none, n_trials = crud.list_trials(session=session, limit=1)
        if n_trials:
            _out(f"database has {n_trials} trials; using them")
        else:
            _out(f"empty database: importing the bundled Step Law sweep ({STEPLAW_CITATION})")
            _id, created, _existing = import_steplaw(database)
            _out(f"imported {created} runs")
        scope = family_scope(settings.default_family)
        outcomes = refit_once(database, kinds=[RECOMMENDER_KIND], scopes=[scope])
    for o in outcomes:
        _out(f"fit {o.scope}: {o.action} {o.status or ''} {o.message or ''}".rstrip())
    if not outcomes:
        _out("fits are up to date")
    _out(
        f"the server's fitting worker fits the other scopes and {', '.join(FIT_KINDS[1:])} "
        "in the background"
    )
    host = args.host or settings.host
    port = args.port or settings.port
    _out(f"serving on http://{host}:{port} (API docs at /docs); try:")
    _out(f"  curl 'http://{host}:{port}{EXAMPLE_QUERY}'")
    return cmd_serve(argparse.Namespace(host=host, port=port, no_worker=False, access_log=False))


def main(argv: list[str] | None = None) -> int:
    """Only the service's own commands (``python -m server.cli serve``), for running the
    service where the other packages' commands are not needed."""
    parser = argparse.ArgumentParser(prog="hyperlaw")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
