"""The service's commands on stored data: ``hyperlaw recommend`` and ``families``
(``import`` is ``server.cli_import``'s), and what every command of the service shares (the
settings, the settings' database, a URL with its password masked, one result line on
stdout); ``server.cli`` registers them with its own.

``recommend`` and ``families`` read a running service (``--url``, else ``HYPERLAW_URL``
when it is set) or else the database of ``HYPERLAW_DATABASE_URL``, and log (INFO) which.

Parsing and printing only: each handler calls the functions the API uses
(``server.recommend``, ``server.families``). Module-level imports stay light so that
``hyperlaw --help`` answers at once. Exit codes as in ``server.cli``: 0 done,
1 the service could not be reached, 2 unusable input or database.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from client import HyperlawClient
    from server.core.config import Settings
    from server.core.db import Database

T = TypeVar("T")

log = logging.getLogger(__name__)

#: The service a client-side command asks when it has no ``--url``.
URL_ENV = "HYPERLAW_URL"
ASK_SERVER_HELP = (
    f"ask this hyperlaw server instead of reading the database (default: {URL_ENV} when "
    "set, else the database of HYPERLAW_DATABASE_URL)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``recommend`` and ``families`` to the ``hyperlaw`` parser."""
    rec = subparsers.add_parser(
        "recommend", help="learning rate, batch size and critical batch size for (N, D)"
    )
    rec.add_argument(
        "--n-params", type=float, required=True, help="non-embedding parameters N, e.g. 1e9"
    )
    rec.add_argument("--n-tokens", type=float, required=True, help="training tokens D")
    rec.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    rec.add_argument(
        "--batch-size-tokens",
        type=float,
        help="impose this batch size (tokens): best η for it and its overheads",
    )
    which = rec.add_mutually_exclusive_group()
    which.add_argument(
        "--family", help="the family whose fit answers (default: HYPERLAW_DEFAULT_FAMILY)"
    )
    which.add_argument("--experiment", help="experiment id or name: its own trials' fit")
    rec.add_argument("--json", action="store_true", help="print the API's JSON body")
    rec.add_argument("--url", help=ASK_SERVER_HELP)
    rec.set_defaults(func=cmd_recommend)

    fam = subparsers.add_parser(
        "families", help="families (what makes losses comparable), their data and fit status"
    )
    fam.add_argument("--json", action="store_true", help="print the API's JSON body")
    fam.add_argument("--url", help=ASK_SERVER_HELP)
    fam.set_defaults(func=cmd_families)


def settings() -> Settings:
    from server.core.config import get_settings

    return get_settings()


def out(line: str = "") -> None:
    """One line of the command's result on stdout (flushed: a server may follow)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def shown(url: str) -> str:
    """The URL (a database's or a service's) without its password."""
    from urllib.parse import urlsplit

    from sqlalchemy.engine import make_url

    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        return make_url(url).render_as_string(hide_password=True)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + parts.netloc.rsplit("@", 1)[1]).geturl()


def service_url(url: str | None) -> str | None:
    """The service a client-side command asks (``url`` from ``--url``, else ``HYPERLAW_URL``
    when it is set), or None for the database; logs which store the command reads."""
    from_env = os.environ.get(URL_ENV, "").strip() or None
    if url:
        log.info("reading %s (--url)", shown(url))
    elif from_env:
        log.info("reading %s (%s)", shown(from_env), URL_ENV)
    else:
        log.info("reading the database %s", shown(settings().database_url))
    return url or from_env


@contextmanager
def store(**engine_kwargs: Any) -> Iterator[Database]:
    """The database of the settings (``engine_kwargs``: see ``open_database``), disposed on
    exit. One that is not at this version's schema ends the command, as argparse ends one on
    bad arguments: one logged line naming ``hyperlaw db upgrade``, exit status 2, instead of
    a traceback from a missing table later."""
    from server.core.db import open_database, require_current_schema
    from server.core.errors import SchemaOutdatedError

    with open_database(settings().database_url, **engine_kwargs) as database:
        try:
            require_current_schema(database.engine)
        except SchemaOutdatedError as exc:
            log.error("%s", exc)
            raise SystemExit(2) from None
        yield database


def ask_server(url: str, call: Callable[[HyperlawClient], T]) -> T | int:
    """``call`` on a client of the service at ``url``: its result, or the exit code of its
    failure, logged: 2 when the service refused a request, 1 when it could not be reached.
    (The commands that ask a server: recommend, families, plot, export.)"""
    from client import HyperlawAPIError, HyperlawClient, HyperlawUnavailable

    try:
        with HyperlawClient(url, max_retries=1) as client:
            return call(client)
    except HyperlawAPIError as exc:
        log.error("%s", exc)
        return 2
    except HyperlawUnavailable as exc:
        log.error("%s", exc)
        return 1


# --- recommend -----------------------------------------------------------------------------


def format_recommendation(body: dict[str, Any]) -> str:
    """Human-readable lines for a recommendation body."""

    def iv(name: str) -> str:
        interval = body.get(f"{name}_interval") or {}
        low, high = interval.get("low"), interval.get("high")
        if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
            return ""
        return f"   [{low:.4g}, {high:.4g}] ({100 * interval.get('level', 0.9):.0f} %)"

    lines = [
        f"N={body['n_params']:.4g} parameters, D={body['n_tokens']:.4g} tokens, "
        f"seq_len={body['seq_len']}"
    ]
    for name in (
        "learning_rate",
        "batch_size_tokens",
        "batch_size_sequences",
        "critical_batch_size_tokens",
    ):
        lines.append(f"  {name:<28}{body[name]:<12.4g}{iv(name)}")
    if body.get("imposed_batch_size_tokens") is not None:
        lines.append(f"at batch_size_tokens={body['imposed_batch_size_tokens']:.4g}:")
        lr = body["learning_rate_for_batch"]
        lines.append(f"  {'learning_rate_for_batch':<28}{lr:<12.4g}{iv('learning_rate_for_batch')}")
        lines.append(f"  {'step_overhead':<28}{body['step_overhead']:<12.4g}")
        lines.append(f"  {'token_overhead':<28}{body['token_overhead']:<12.4g}")
    key = f", fit key {body['fit_key']}" if body.get("fit_key") else ""
    lines.append(
        f"fit {', '.join(map(str, body['fit_ids']))} ({body['scope']}{key}) on "
        f"{body['n_trials']} trials, fitted at {body['fitted_at']}"
    )
    lines.extend(f"warning: {w}" for w in body.get("warnings", []))
    return "\n".join(lines)


def cmd_recommend(args: argparse.Namespace) -> int:
    from client.wire import dumps

    params: dict[str, Any] = dict(
        n_params=args.n_params, n_tokens=args.n_tokens, seq_len=args.seq_len
    )
    if args.batch_size_tokens is not None:
        params["batch_size_tokens"] = args.batch_size_tokens
    url = service_url(args.url)
    if url:
        answer = ask_server(
            url,
            lambda client: client.recommend(
                experiment=args.experiment, family=args.family, **params
            ),
        )
        if isinstance(answer, int):
            return answer
        body = answer
    else:
        from server.core.errors import HyperlawError
        from server.recommend import recommend_from_database

        try:
            # a reader: plain deferred transactions on SQLite, never the write lock
            with store(sqlite_immediate=False) as database:
                body = recommend_from_database(
                    database,
                    experiment=args.experiment,
                    family=args.family,
                    default_family=settings().default_family,
                    **params,
                )
        except (HyperlawError, ValueError) as exc:  # ValueError: fitting's ParameterError
            log.error("%s", exc)
            return 2
    out(dumps(body, indent=2) if args.json else format_recommendation(body))
    return 0


# --- families ------------------------------------------------------------------------------


def format_families(families: list[dict[str, Any]]) -> str:
    """One block per family: its data, fit keys and fit status."""
    if not families:
        return "no families yet: import a sweep (hyperlaw import steplaw) or run one"
    lines = []
    for f in families:
        ranges = ""
        if f["n_params"] and f["n_tokens"]:
            (n_lo, n_hi), (d_lo, d_hi) = f["n_params"], f["n_tokens"]
            ranges = f", N {n_lo:.3g}..{n_hi:.3g}, D {d_lo:.3g}..{d_hi:.3g}"
        lines.append(
            f"{f['name']}: {f['n_experiments']} experiment(s), {f['n_trials']} completed "
            f"trial(s) in {f['n_groups']} (N, D) group(s){ranges}"
        )
        for k in f["fit_keys"]:
            main = " (main: its fits serve it)" if k["fit_key"] == f["main_fit_key"] else ""
            lines.append(
                f"  fit key {k['fit_key']}: {k['n_trials']} trial(s), {k['n_groups']} "
                f"group(s){main}"
            )
        fit = f["fit"]
        if fit is None:
            lines.append("  recommender: not fitted yet")
        else:
            why = f": {fit['message']}" if fit.get("message") else ""
            lines.append(f"  recommender fit {fit['id']} {fit['status']}{why}")
    return "\n".join(lines)


def cmd_families(args: argparse.Namespace) -> int:
    from client.wire import dumps

    url = service_url(args.url)
    if url:
        answer = ask_server(url, lambda client: client.families())
        if isinstance(answer, int):
            return answer
        body = answer
    else:
        from server.families import list_families
        from server.family_schemas import FamiliesPublic

        with store(sqlite_immediate=False) as database, database.session() as session:
            rows = list_families(session=session)
        body = FamiliesPublic.model_validate({"data": rows, "count": len(rows)}).model_dump(
            mode="json"
        )
    out(dumps(body, indent=2) if args.json else format_families(body["data"]))
    return 0
