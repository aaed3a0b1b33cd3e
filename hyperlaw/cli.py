"""The `hyperlaw` command line.

One entry point; each package contributes its subcommands through a ``register(subparsers)``
function in its own ``cli`` module. Registration must stay cheap (no torch, ray or scipy
imports at module level) so that ``hyperlaw --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands, in the order their commands are listed.
COMMAND_MODULES = (
    "server.cli",
    "fitting.cli",
    "trainer.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperlaw",
        description="Learning rate, batch size and critical batch size for LLM pre-training.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level != "DEBUG":  # each migration step is news; alembic's plugin setup is not
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
