"""The `hyperlaw` command line.

One entry point; each package contributes its subcommands through a ``register(subparsers)``
function in its own ``cli`` module. Registration must stay cheap (no torch, ray or scipy
imports at module level) so that ``hyperlaw --help`` answers at once. A part whose
dependencies are not installed (the light client, ``pip install "hyperlaw[client]"``, has
only ``client``'s) contributes no commands, and ``--help`` says which are missing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

# Modules that contribute subcommands, in the order their commands are listed.
COMMAND_MODULES = (
    "server.cli",
    "server.cli_export",
    "fitting.cli",
    "trainer.cli",
    "client.cli",
)
# What each part's commands need at run time. Their cli modules import cheaply anywhere, so
# whether a part is installed is asked of its dependency (a lookup, not an import).
PART_NEEDS = {"server": "sqlalchemy", "fitting": "scipy", "trainer": "torch", "client": "httpx"}

OWN_PACKAGES = frozenset({"hyperlaw", "client", "server", "trainer", "fitting", "migrations"})


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
    missing: dict[str, str] = {}
    for name in COMMAND_MODULES:
        part = name.split(".")[0]
        needs = PART_NEEDS[part]
        if importlib.util.find_spec(needs) is None:
            missing[part] = needs
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # an install without that part's dependencies
            if (exc.name or "").split(".")[0] in OWN_PACKAGES:
                raise  # one of ours: a bug, not an install choice
            missing[name.split(".")[0]] = str(exc.name)
            continue
        module.register(subparsers)
    if missing:
        parts = ", ".join(f"{part} (needs {module})" for part, module in missing.items())
        parser.epilog = (
            f"Not installed here: the commands of {parts}; "
            'pip install "hyperlaw[all]" installs every part.'
        )
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
