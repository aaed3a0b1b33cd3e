"""``hyperlaw serve``, ``hyperlaw db upgrade|downgrade|current``, ``hyperlaw token ...``.

Imports stay light at module level; each handler imports what it needs.
"""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the REST service (and the fitting worker)")
    serve.add_argument("--host", default=None, help="bind address (default: HYPERLAW_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default: HYPERLAW_PORT or 8000)")
    serve.add_argument("--no-worker", action="store_true", help="do not run the fitting worker")
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

    token = subparsers.add_parser("token", help="API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_sub.add_parser("create", help="create a token and print it (shown once)")
    create.add_argument("--name", required=True)
    create.add_argument("--scope", required=True, choices=["read", "write", "admin"])
    create.set_defaults(func=cmd_token_create)
    lst = token_sub.add_parser("list", help="list tokens (names, scopes, never secrets)")
    lst.set_defaults(func=cmd_token_list)
    revoke = token_sub.add_parser("revoke", help="revoke a token by name")
    revoke.add_argument("--name", required=True)
    revoke.set_defaults(func=cmd_token_revoke)


def _settings():
    from server.core.config import get_settings

    return get_settings()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.main import SchemaOutdatedError, create_app
    from server.reaper import start_reaper

    settings = _settings()
    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update=updates)
    background = [start_reaper]
    if not args.no_worker:
        from server.worker import start_worker_thread

        background.append(start_worker_thread)
    try:
        app = create_app(settings, background=background)
    except SchemaOutdatedError as exc:
        log.error("%s", exc)
        return 2
    log.info("serving on http://%s:%d (docs at /docs)", settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                access_log=False)
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from server.core.db import current_revision, make_engine, upgrade

    url = _settings().database_url
    upgrade(url, args.revision)
    engine = make_engine(url)
    try:
        log.info("database at revision %s", current_revision(engine))
    finally:
        engine.dispose()
    return 0


def cmd_db_downgrade(args: argparse.Namespace) -> int:
    from server.core.db import downgrade

    downgrade(_settings().database_url, args.revision)
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    from server.core.db import current_revision, head_revision, make_engine

    engine = make_engine(_settings().database_url)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    state = "up to date" if current == head else "out of date: run `hyperlaw db upgrade`"
    sys.stdout.write(f"current={current or 'none'} head={head} ({state})\n")
    return 0 if current == head else 1


def _with_session(fn):
    from server.core.db import make_engine, make_session_factory, session_scope

    engine = make_engine(_settings().database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            return fn(session)
    finally:
        engine.dispose()


def cmd_token_create(args: argparse.Namespace) -> int:
    from server import crud
    from server.core.errors import ConflictError
    from server.models import TokenScope

    try:
        _token, secret = _with_session(
            lambda s: crud.create_token(session=s, name=args.name, scope=TokenScope(args.scope))
        )
    except ConflictError as exc:
        log.error("%s", exc)
        return 1
    # The secret is the command's output (stdout), shown this once; it is stored hashed.
    sys.stdout.write(secret + "\n")
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from server import crud

    def rows(session):
        return [
            f"{t.name}\t{t.scope}\t{t.prefix}...\tcreated {t.created_at:%Y-%m-%d %H:%M}"
            + (f"\trevoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "")
            for t in crud.list_tokens(session=session)
        ]

    for line in _with_session(rows):
        sys.stdout.write(line + "\n")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from server import crud
    from server.core.errors import NotFoundError

    try:
        _with_session(lambda s: crud.revoke_token(session=s, name=args.name))
    except NotFoundError as exc:
        log.error("%s", exc)
        return 1
    log.info("token %r revoked", args.name)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Only the service's own commands (``python -m server.commands serve``), for running the
    service where the other packages' commands are not needed."""
    parser = argparse.ArgumentParser(prog="hyperlaw")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
