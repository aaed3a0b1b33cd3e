"""Trainer commands: ``hyperlaw sweep`` (``--schema``: the sweep file's JSON Schema; an
http(s) ``--address`` submits it as a Ray Job: ``trainer.ray_job``) and ``hyperlaw corpus
build``.

Registration is cheap: torch, DeepSpeed and Ray are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sweep`` and ``corpus`` to the ``hyperlaw`` command line."""
    sweep = subparsers.add_parser(
        "sweep",
        help="run a Ray Tune sweep of DeepSpeed trainings and report them to the service",
        description=(
            "Run the (learning rate, batch size, model, token budget) sweep described by a YAML "
            "file. Each trial is a Ray Train TorchTrainer of DeepSpeed workers; every trial, "
            "its loss curve and its final metrics are stored through the hyperlaw service."
        ),
    )
    sweep.add_argument(
        "config", nargs="?", help="sweep description (YAML), e.g. examples/cpu_small.yaml"
    )
    sweep.add_argument(
        "--schema",
        action="store_true",
        help="print the JSON Schema of sweep files (for editors) and exit; "
        "examples/sweep.schema.json is its output",
    )
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep: finished trials are not run again",
    )
    sweep.add_argument(
        "--address",
        default=None,
        help="an existing Ray cluster: 'auto' or ray://HEAD:10001 runs the sweep's driver "
        "here; the head's dashboard, http://HEAD:8265, submits the sweep as a Ray Job that "
        "runs it there (default: start a local cluster)",
    )
    sweep.add_argument(
        "--no-wait",
        action="store_true",
        help="with --address http://HEAD:8265: print the job's id and return instead of "
        "following its logs to its end",
    )
    sweep.add_argument(
        "--url",
        default=None,
        help="hyperlaw service URL (default: $HYPERLAW_URL, else http://127.0.0.1:8000); "
        "the write token is read from $HYPERLAW_TOKEN",
    )
    sweep.add_argument(
        "--output-dir",
        default=None,
        help="where Ray keeps trial results and checkpoints (default: output_dir in the YAML)",
    )
    sweep.add_argument(
        "--storage",
        default=None,
        help="instead of --output-dir for Ray's results and the checkpoints: a path every node "
        "mounts or a URI such as s3://bucket/prefix (credentials from AWS_* in the "
        "environment); default: storage in the YAML",
    )
    sweep.set_defaults(func=_sweep)

    corpus = subparsers.add_parser("corpus", help="build a memory-mapped token corpus")
    corpus_sub = corpus.add_subparsers(dest="corpus_command", required=True, metavar="ACTION")
    build = corpus_sub.add_parser(
        "build",
        help="tokenize local text files into train.bin / val.bin",
        description=(
            "Tokenize local text files (byte-level, offline) into a memory-mapped token "
            "file with a train/validation split and a meta.json describing it."
        ),
    )
    build.add_argument("sources", nargs="+", help="text files or directories of text files")
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="fraction of the tokens held out for validation (default 0.05)",
    )
    build.add_argument(
        "--tokenizer",
        default="byte",
        choices=["byte"],
        help="offline tokenizer (default: byte, vocabulary of 256)",
    )
    build.set_defaults(func=_corpus_build)


def _sweep(args: argparse.Namespace) -> int:
    from trainer.sweep_config import SweepConfigError, load_sweep_config, sweep_json_schema

    if args.schema:
        print(json.dumps(sweep_json_schema(), indent=2, ensure_ascii=False))
        return 0
    if args.config is None:
        logger.error("hyperlaw sweep: a sweep file is required (or --schema)")
        return 2
    try:
        config = load_sweep_config(args.config)
    except SweepConfigError as exc:
        logger.error("%s: %s", args.config, exc)
        return 2
    if args.output_dir:
        config = config.with_output_dir(args.output_dir)
    if args.storage:
        try:
            config = config.with_storage(args.storage)
        except SweepConfigError as exc:
            logger.error("--storage: %s", exc)
            return 2
    from trainer.ray_job import is_job_address, run_sweep_job

    if is_job_address(args.address):
        return run_sweep_job(
            args.address,
            Path(args.config),
            config,
            url=args.url or os.environ.get("HYPERLAW_URL"),
            resume=args.resume,
            output_dir=args.output_dir,
            storage=args.storage,
            log_level=getattr(args, "log_level", "INFO"),
            environ=os.environ,
            wait=not args.no_wait,
        )
    if args.no_wait:
        logger.error("hyperlaw sweep: --no-wait is for a Ray Job (--address http://HEAD:8265)")
        return 2
    from client import HyperlawAPIError, HyperlawUnavailable
    from trainer.sweep import run_sweep

    url = args.url or os.environ.get("HYPERLAW_URL") or "http://127.0.0.1:8000"
    try:
        summary = run_sweep(
            config,
            url=url,
            token=os.environ.get("HYPERLAW_TOKEN"),
            address=args.address,
            resume=args.resume,
        )
    except SweepConfigError as exc:
        logger.error("%s: %s", args.config, exc)
        return 2
    except HyperlawUnavailable as exc:
        logger.error("the hyperlaw service at %s is unreachable: %s", url, exc)
        return 2
    except HyperlawAPIError as exc:
        logger.error("the hyperlaw service at %s refused the sweep: %s", url, exc)
        return 2
    logger.info(
        "sweep %s: %d completed, %d failed, %d skipped (already done), best %s",
        config.experiment,
        summary.completed,
        summary.failed,
        summary.skipped,
        summary.best_description(),
    )
    return 0 if summary.failed == 0 else 1


def _corpus_build(args: argparse.Namespace) -> int:
    from trainer.data import CorpusError, build_corpus

    try:
        meta = build_corpus(
            args.sources, args.out, val_fraction=args.val_fraction, tokenizer=args.tokenizer
        )
    except CorpusError as exc:
        logger.error("%s", exc)
        return 2
    logger.info(
        "corpus %s: %d train tokens, %d val tokens, vocab %d, fingerprint %s",
        args.out,
        meta["n_train_tokens"],
        meta["n_val_tokens"],
        meta["vocab_size"],
        meta["fingerprint"],
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Only the trainer's commands (``python -m trainer.cli sweep ...``), for machines that run
    sweeps without the rest of the command line."""
    import sys

    parser = argparse.ArgumentParser(prog="hyperlaw")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
