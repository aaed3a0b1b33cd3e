"""``hyperlaw cbs``: critical batch size per model size from a steps-to-target CSV.

Registration stays light: numpy and scipy are imported inside the handler.
"""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cbs`` subcommand."""
    p = subparsers.add_parser(
        "cbs",
        help="critical batch size per n_params group from steps-to-target (Zhang et al. 2024)",
        description=(
            "Read a CSV with columns n_params,batch_size,steps (steps to reach the group's "
            "target loss; empty, 'inf' or 'nan' when never reached), fit "
            "log S = log(a + b/B) per n_params group and print a, b and the critical batch "
            "size B* = (1+overhead)*B_opt + overhead*b/a, then the power law of B* in "
            "n_params. batch_size may be in any unit; B* is in the same unit."
        ),
    )
    p.add_argument("file", metavar="FILE.csv", help="CSV with n_params,batch_size,steps")
    p.add_argument("--overhead", type=float, default=0.2,
                   help="tolerated step overhead versus linear scaling (default 0.2)")
    p.add_argument("--b-opt", type=float, default=None, dest="b_opt",
                   help="reference batch size in the linear-scaling regime "
                        "(default: each group's smallest batch size)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cbs_command)


def _cbs_command(args: argparse.Namespace) -> int:
    from fitting.cbs import cbs_command

    return cbs_command(args.file, overhead=args.overhead, b_opt=args.b_opt,
                       as_json=args.json)
