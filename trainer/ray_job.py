"""``hyperlaw sweep CONFIG --address http://HEAD:8265``: the sweep submitted as a Ray Job.

The Jobs API (``ray.job_submission.JobSubmissionClient``, the head's dashboard address) runs
the same ``hyperlaw sweep`` on the cluster with ``--address auto``: the sweep's driver lives
on the head, not on the submitting machine, which prints the job's id, follows its logs to
the end and exits with its outcome (0 if it SUCCEEDED, 1 if it FAILED or was STOPPED), or
returns at once with ``--no-wait``. Ctrl-C stops following, not the job.

What the job gets:

- The ``hyperlaw`` command itself from the cluster: the nodes' image or virtualenv must
  have hyperlaw installed (the docker-compose Ray nodes do); the package is not uploaded.
- ``runtime_env.working_dir``: a temporary directory that holds the sweep file alone
  (never the repository: ``runs/``, ``.venv``). Ray uploads it with the submission and
  starts the entrypoint in it.
- A ``corpus_dir`` is not uploaded (gigabytes): a relative one is written into the job's
  copy of the file as the absolute path this machine resolves, and a warning says that
  every Ray node must read the corpus at that path (storage the nodes share). A URI
  (``s3://...``) goes as it is, without a warning: each node copies it from there
  (``trainer.storage``). A relative ``output_dir`` (or ``storage`` path) would land in the
  job's working directory, a copy that Ray manages and deletes: a warning names
  ``--output-dir`` (``--storage``). ``--storage`` goes with the entrypoint as given.
- The service's URL (``--url``, else this machine's ``HYPERLAW_URL``) as the entrypoint's
  ``--url "${HYPERLAW_URL:-URL}"``: a ``HYPERLAW_URL`` set on the nodes wins, as for any
  sweep that joins a cluster (``trainer.ray_cluster``), since this machine's URL names the
  service as this machine sees it (docker-compose: http://localhost:8000 here,
  http://api:8000 on the nodes). In ``env_vars`` it would override the nodes' URL.
- ``runtime_env.env_vars``: the client's non-secret settings set here (``FORWARDED_ENV``),
  named one by one: other ``HYPERLAW_*`` variables are the server's and may hold passwords.
- Never ``HYPERLAW_TOKEN``: Ray logs every runtime env, env_vars included, in plain text on
  every node (runtime_env_agent.log) and keeps the job's entrypoint, runtime env and
  metadata in its job table (the dashboard shows them). The job and its trials take the
  token from the environment that ``ray start`` ran in on the nodes; a token set here is
  not sent, and a warning says so.

A cluster with Ray's token authentication (Ray's default for new clusters) wants what
``ray job submit`` wants: ``RAY_AUTH_MODE=token`` and its token (``RAY_AUTH_TOKEN`` or
``~/.ray/auth_token``) on this machine. An address that does not answer, or that is no Ray
dashboard, is one error line and exit status 1.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.storage import is_uri
from trainer.sweep_config import SweepConfig

logger = logging.getLogger(__name__)

JOB_SCHEMES = ("http://", "https://")
FORWARDED_ENV = ("HYPERLAW_CLIENT_RETRY_S",)  # the client's settings, none secret
TOKEN_ENV, URL_ENV = "HYPERLAW_TOKEN", "HYPERLAW_URL"
PROBE_TIMEOUT_S = 10.0
POLL_S = 1.0
# what ends or escapes "${HYPERLAW_URL:-...}" in the entrypoint's shell
_UNQUOTABLE = set('"$`\\}') | {" ", "\t", "\n", "\r"}


class JobSubmissionError(Exception):
    """The cluster cannot take the job: one line for the user."""


def is_job_address(address: str | None) -> bool:
    """An http(s) address is a Ray dashboard's: the sweep goes there as a Ray Job."""
    return bool(address) and str(address).lower().startswith(JOB_SCHEMES)


@dataclass(frozen=True)
class JobRequest:
    """The job's entrypoint, its sweep file (name and text) and its env_vars; ``warnings``:
    what the user must know about it (corpus, output directory, token)."""

    entrypoint: str
    file_name: str
    file_text: str
    env_vars: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def job_entrypoint(
    file_name: str,
    *,
    url: str | None,
    resume: bool = False,
    output_dir: str | None = None,
    log_level: str = "INFO",
    storage: str | None = None,
) -> str:
    """The shell command that the job runs in its working directory: this sweep joining the
    cluster (``--address auto``), the nodes' ``HYPERLAW_URL`` before ``url``."""
    words = ["hyperlaw", "--log-level", log_level, "sweep", file_name, "--address", "auto"]
    if resume:
        words.append("--resume")
    if output_dir:
        words += ["--output-dir", output_dir]
    if storage:
        words += ["--storage", storage]
    command = shlex.join(words)
    if url:
        bad = sorted(_UNQUOTABLE & set(url))
        if bad:
            raise JobSubmissionError(f"the service URL {url!r} holds {''.join(bad)!r}")
        command += f' --url "${{{URL_ENV}:-{url}}}"'
    return command


def job_request(
    config_path: Path,
    config: SweepConfig,
    *,
    url: str | None,
    resume: bool,
    output_dir: str | None,
    log_level: str,
    environ: Mapping[str, str],
    storage: str | None = None,
) -> JobRequest:
    """What to submit for the sweep file at ``config_path`` (``config``: as read, with
    ``--output-dir`` and ``--storage`` applied), given this machine's ``environ`` (module
    docstring)."""
    text = config_path.read_text()
    warnings: list[str] = []
    raw = yaml.safe_load(text)
    corpus = raw.get("corpus_dir") if isinstance(raw, dict) else None
    if isinstance(corpus, str) and config.corpus_dir and not is_uri(config.corpus_dir):
        if not Path(corpus).is_absolute():  # the file's folder is not on the cluster
            text = yaml.safe_dump({**raw, "corpus_dir": config.corpus_dir}, sort_keys=False)
        warnings.append(
            f"corpus_dir {config.corpus_dir} is not uploaded with the job "
            f"({_size_here(Path(config.corpus_dir))}): every Ray node must read it at that "
            "path, on storage the nodes share"
        )
    if not Path(config.output_dir).is_absolute():
        kept = "the spool" if config.storage else "the checkpoints and Tune's results"
        warnings.append(
            f"output_dir {config.output_dir!r} is relative: on the cluster it lands in the "
            "job's working directory, which Ray deletes; pass --output-dir with a path on "
            f"storage every node reaches to keep {kept}"
        )
    if config.storage and not is_uri(config.storage) and not Path(config.storage).is_absolute():
        warnings.append(
            f"storage {config.storage!r} is relative: on the cluster it lands in the job's "
            "working directory, which Ray deletes; pass --storage with a path every node "
            "mounts or a URI (s3://bucket/prefix)"
        )
    if environ.get(TOKEN_ENV):
        warnings.append(
            f"{TOKEN_ENV} is not sent with the job: its trials use the token the Ray nodes "
            f"were started with ({TOKEN_ENV} in the environment of `ray start`)"
        )
    return JobRequest(
        entrypoint=job_entrypoint(
            config_path.name,
            url=url,
            resume=resume,
            output_dir=output_dir,
            log_level=log_level,
            storage=storage,
        ),
        file_name=config_path.name,
        file_text=text,
        env_vars={name: environ[name] for name in FORWARDED_ENV if environ.get(name)},
        warnings=warnings,
    )


def _size_here(path: Path) -> str:
    if not path.is_dir():
        return "not on this machine"
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return f"{size / 2**20:.1f} MiB here"


def connect(address: str) -> Any:
    """A ``JobSubmissionClient`` of the dashboard at ``address``, or ``JobSubmissionError``
    saying why not. A plain GET of Ray's version route first, with a timeout: Ray's client
    waits as long as the connection does and answers a non-Ray server with a traceback."""
    import httpx

    address = address.rstrip("/")
    try:
        answer = httpx.get(f"{address}/api/version", timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise JobSubmissionError(
            f"no Ray dashboard answers at {address} ({type(exc).__name__}: {exc}); give the "
            "head's dashboard address (ray start --head --dashboard-host 0.0.0.0, port 8265)"
        ) from None
    if answer.status_code not in (401, 403) and not _ray_version(answer):
        raise JobSubmissionError(
            f"{address} is not a Ray dashboard (GET /api/version answered "
            f"{answer.status_code} without a Ray version); give the head's dashboard "
            "address, http://HEAD:8265"
        )
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise JobSubmissionError(
            f"the Ray cluster at {address} wants its token (Ray's token authentication): "
            "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) here, as "
            "for `ray job submit`"
        ) from None
    except (OSError, RuntimeError, ValueError) as exc:
        raise JobSubmissionError(f"the Ray cluster at {address} refused: {exc}") from None


def _ray_version(answer: Any) -> str | None:
    try:
        body = answer.json()
    except ValueError:
        return None
    return body.get("ray_version") if isinstance(body, dict) else None


def submit(client: Any, request: JobRequest, experiment: str) -> str:
    """Submit the job, its working directory a temporary one holding the sweep file (Ray
    uploads it before ``submit_job`` returns); returns the job's id."""
    with tempfile.TemporaryDirectory(prefix="hyperlaw-job-") as folder:
        (Path(folder) / request.file_name).write_text(request.file_text)
        runtime_env: dict[str, Any] = {"working_dir": folder}
        if request.env_vars:
            runtime_env["env_vars"] = dict(request.env_vars)
        try:
            return str(
                client.submit_job(
                    entrypoint=request.entrypoint,
                    runtime_env=runtime_env,
                    metadata={"hyperlaw_experiment": experiment},
                )
            )
        except (OSError, RuntimeError, ValueError) as exc:
            raise JobSubmissionError(f"the Ray cluster refused the job: {exc}") from None


def follow(client: Any, job_id: str, address: str) -> int:
    """Print the job's logs on stdout until it ends; 0 if it SUCCEEDED, else 1 (its status
    and message logged). Ctrl-C stops following and leaves the job running (130)."""
    try:
        try:
            asyncio.run(_print_logs(client, job_id))
        except (OSError, RuntimeError) as exc:  # the websocket closed before the job ended
            logger.warning("lost the job's log stream (%s); waiting for its end", exc)
        status, message = _wait_for_end(client, job_id, address)
    except KeyboardInterrupt:
        logger.warning(
            "stopped following Ray job %s, which goes on: `ray job logs %s --address %s "
            "--follow` follows it again, `ray job stop %s --address %s` stops it",
            job_id,
            job_id,
            address,
            job_id,
            address,
        )
        return 130
    if status == "SUCCEEDED":
        logger.info("Ray job %s succeeded", job_id)
        return 0
    logger.error("Ray job %s %s: %s", job_id, status, message or "no message")
    return 1


async def _print_logs(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _wait_for_end(client: Any, job_id: str, address: str) -> tuple[str, str | None]:
    while True:
        try:
            info = client.get_job_info(job_id)
        except (OSError, RuntimeError) as exc:
            raise JobSubmissionError(
                f"lost the Ray cluster at {address} while following job {job_id} ({exc}); "
                f"`ray job status {job_id} --address {address}` tells how it ends"
            ) from None
        status = str(getattr(info.status, "value", info.status))
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status, info.message
        time.sleep(POLL_S)


def run_sweep_job(
    address: str,
    config_path: Path,
    config: SweepConfig,
    *,
    url: str | None,
    resume: bool,
    output_dir: str | None,
    log_level: str,
    environ: Mapping[str, str],
    wait: bool = True,
    storage: str | None = None,
) -> int:
    """``hyperlaw sweep CONFIG --address http(s)://...``: submit, print ``submitted Ray job
    ID to ADDRESS``, and follow the job unless ``wait`` is false. Exit status: the job's
    (``follow``), 1 if the cluster cannot take it."""
    address = address.rstrip("/")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is noise here
    try:
        request = job_request(
            config_path,
            config,
            url=url,
            resume=resume,
            output_dir=output_dir,
            log_level=log_level,
            environ=environ,
            storage=storage,
        )
        for warning in request.warnings:
            logger.warning("%s", warning)
        client = connect(address)
        job_id = submit(client, request, config.experiment)
        print(f"submitted Ray job {job_id} to {address}", flush=True)
        if not wait:
            return 0
        return follow(client, job_id, address)
    except JobSubmissionError as exc:
        logger.error("%s", exc)
        return 1
