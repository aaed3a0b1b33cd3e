"""``hyperlaw sync``: send spooled loss-curve points (:mod:`client.spool`) to the service.

The service is ``--url``, else ``HYPERLAW_URL``, else http://127.0.0.1:8000; the write token
is ``HYPERLAW_TOKEN`` (never an argument: it would stay in the shell's history). Exit status:
0 when every file is done, 2 when a file cannot be read or the service refuses the token or
a point, 1 when the service cannot be reached (the files not yet sent stay for the next try).
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    sync = subparsers.add_parser(
        "sync",
        help="send spooled points (a run's undelivered loss curve) to the service",
        description=(
            "Send the points that runs could not deliver (JSON-lines spool files, e.g. a "
            "sweep's runs/spool/) to the service. Safe to repeat: points are upserts on "
            "(trial, step). A file that is done is renamed NAME.jsonl.sent."
        ),
    )
    sync.add_argument("paths", nargs="+", metavar="PATH", help="a spool file, or a folder of them")
    sync.add_argument("--url", help="the service (default: HYPERLAW_URL, else :8000 here)")
    sync.set_defaults(func=cmd_sync)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def cmd_sync(args: argparse.Namespace) -> int:
    from client import spool
    from client.rest import HyperlawAPIError, HyperlawClient, HyperlawUnavailable

    try:
        paths = spool.files(args.paths)
    except FileNotFoundError as exc:
        log.error("%s", exc)
        return 2
    if not paths:
        _say("nothing to send: no *.jsonl spool file in " + ", ".join(args.paths))
        return 0
    try:
        with HyperlawClient(args.url) as client:
            done = spool.sync(paths, client, progress=_say)
    except spool.SpoolError as exc:
        log.error("%s; nothing was sent", exc)
        return 2
    except HyperlawAPIError as exc:
        hint = " (set HYPERLAW_TOKEN to a write token)" if exc.status_code in (401, 403) else ""
        log.error("the service refused the points: %s%s; unsent files stay", exc, hint)
        return 2
    except HyperlawUnavailable as exc:
        log.error("%s; unsent files stay, run hyperlaw sync again", exc)
        return 1
    sent = sum(outcome.points_sent for outcome in done)
    refused = sum(t.points for outcome in done for t in outcome.trials if not t.sent)
    _say(
        f"{len(done)} spool file(s) done: {sent} points sent"
        + (f", {refused} not taken by the service" if refused else "")
    )
    return 0
