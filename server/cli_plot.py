"""``hyperlaw plot {trial,group,laws,cbs} ... --out FILE.png|svg``: the dashboard's figures
for papers and reports, drawn with matplotlib (:mod:`fitting.figures`,
:func:`fitting.plots.plot_steps_to_target`) from what a running service answers (``--url``,
default ``HYPERLAW_URL`` or http://127.0.0.1:8000; a read token from ``HYPERLAW_TOKEN``
where reads need one): the same JSON the page at ``/`` draws.

Exit codes as the other commands': 0 written, 1 the service could not be reached, 2 the
service refused the request (the field and the rule are logged) or there is nothing to draw.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from server.cli_data import ask_server

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``plot`` to the ``hyperlaw`` parser."""
    plot = subparsers.add_parser(
        "plot", help="write the dashboard's figures as PNG or SVG (from a running service)"
    )
    kinds = plot.add_subparsers(dest="plot_command", required=True, metavar="FIGURE")

    def figure(name: str, text: str) -> argparse.ArgumentParser:
        sub = kinds.add_parser(name, help=text)
        sub.add_argument("--out", required=True, help="the file to write: FILE.png or FILE.svg")
        sub.add_argument("--url", help="the service (default: HYPERLAW_URL or :8000 here)")
        sub.set_defaults(func=cmd_plot)
        return sub

    trial = figure("trial", "one trial's loss curves, learning rate, grad norm, b_simple")
    trial.add_argument("trial_id", type=int)
    group = figure("group", "one (N, D) group: loss heatmap over (η, B), bell curve, steps")
    group.add_argument("--n-params", type=float, required=True)
    group.add_argument("--n-tokens", type=float, required=True)
    laws = figure("laws", "η*, B* and the CBS against D with intervals and the groups' optima")
    laws.add_argument("--n-params", type=float, action="append", help="model sizes (repeat)")
    cbs = figure("cbs", "the cbs fit: steps to target against B per D, the CBS law")
    for sub in (group, laws, cbs):
        sub.add_argument("--family", help="default: the service's HYPERLAW_DEFAULT_FAMILY")


def _fetch(args: argparse.Namespace, client: Any) -> dict[str, Any]:
    """The JSON of the figure, as the page reads it."""
    if args.plot_command == "trial":
        trial = client.get_trial(args.trial_id)
        points = client.request("GET", f"/v1/trials/{args.trial_id}/points")["data"]
        return {"trial": trial, "points": points}
    if args.plot_command == "group":
        params = {"family": args.family, "n_params": int(args.n_params)}
        params["n_tokens"] = int(args.n_tokens)
        return client.request("GET", "/v1/dashboard/group", params=params)
    if args.plot_command == "laws":
        sizes = [int(n) for n in args.n_params or []] or None
        return client.request(
            "GET", "/v1/dashboard/laws", params={"family": args.family, "n_params": sizes}
        )
    family = args.family or client.request("GET", "/v1/dashboard/overview")["default_family"]
    params = {"kind": "cbs", "scope": f"family:{family}", "status": "ok"}
    return {"family": family, "fit": client.request("GET", "/v1/fits/latest", params=params)}


def _draw(args: argparse.Namespace, doc: dict[str, Any]):
    from fitting import figures
    from fitting.plots import plot_steps_to_target

    if args.plot_command == "trial":
        return figures.plot_trial(doc["trial"], doc["points"], args.out)
    if args.plot_command == "group":
        return figures.plot_group(doc, args.out)
    if args.plot_command == "laws":
        return figures.plot_laws(doc, args.out)
    params = doc["fit"]["params"] or {}
    joint = (params.get("laws") or {}).get("joint") or {}
    law = None
    if joint.get("status") == "ok":
        exps = dict(zip(joint["names"], joint["exponents"], strict=True))
        law = {
            "coefficient": joint["coefficient"],
            "n_params_exponent": exps.get("n_params", 0.0),
            "n_tokens_exponent": exps.get("n_tokens", 0.0),
        }
    title = f"{doc['family']}: steps to target (fit {doc['fit']['id']})"
    return plot_steps_to_target(params.get("groups") or [], args.out, law=law, title=title)


def cmd_plot(args: argparse.Namespace) -> int:
    if not str(args.out).lower().endswith((".png", ".svg")):
        log.error("--out must end in .png or .svg, got %s", args.out)
        return 2
    doc = ask_server(args.url, lambda client: _fetch(args, client))
    if isinstance(doc, int):
        return doc
    try:
        path = _draw(args, doc)
    except (ValueError, KeyError) as exc:
        log.error("nothing to draw: %s", exc)
        return 2
    print(f"wrote {path}")
    return 0
