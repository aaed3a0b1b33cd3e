"""``hyperlaw sweep CONFIG --address http://HEAD:8265``: the sweep as a Ray Job on a real Ray
head (``ray start --head`` with its dashboard, Ray's token authentication on) whose
environment holds the service's URL and a write token, as a cluster's nodes do. The command
runs as a user types it, with another token of its own and a service URL that does not
answer from the cluster: the job prints its id, streams its logs, trains its trial with the
nodes' URL and token, and exits 0; the driver's token is in neither the job's record nor any
file of the head's session directory; ``--no-wait`` returns while the job runs. Addresses
that are not a Ray dashboard are one error line."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from client import HyperlawClient
from tests.conftest import free_port, make_token
from tests.databases import REPO_ROOT, hyperlaw_command
from trainer.ray_job import job_entrypoint, job_request
from trainer.sweep_config import load_sweep_config

MARKER_ENV = "HYPERLAW_TEST_RAY_HEAD"  # every process of the head carries it: the finalizer's


@dataclass
class RayHead:
    address: str  # the dashboard's: the Jobs API
    temp_dir: Path  # Ray's --temp-dir: its session directories
    ray_token: str  # Ray's own token authentication

    def job_client(self):
        from ray.job_submission import JobSubmissionClient

        # the header by hand: RAY_AUTH_MODE is not changed in the test process
        return JobSubmissionClient(
            self.address, headers={"Authorization": f"Bearer {self.ray_token}"}
        )

    def submitter_env(self, **env: str) -> dict[str, str]:
        """What a user's shell needs for a cluster with token authentication."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.ray_token, **env}


def _marked_pids(marker: str) -> list[int]:
    needle = f"{MARKER_ENV}={marker}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes():
                pids.append(int(environ.parent.name))
        except OSError:  # gone, or not ours
            continue
    return pids


def _stop_head(group: int, marker: str) -> None:
    """SIGTERM to the head's process group, then, after a grace period, SIGKILL to whatever
    still carries the marker (the job's entrypoint and Ray's workers leave the group; the
    GCS and the raylet take long to go). Never `ray stop`, which stops every Ray process of
    this user on the machine."""
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        pass
    for grace, sig in [(5.0, signal.SIGKILL), (10.0, None)]:
        deadline = time.monotonic() + grace
        while _marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.25)
        for pid in _marked_pids(marker) if sig else []:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


@pytest.fixture
def ray_head(live_server) -> Iterator[RayHead]:
    """A Ray head started as `ray start --head` is, in an environment with the service's
    HYPERLAW_URL and HYPERLAW_TOKEN; stopped in the finalizer, also on failure."""
    # Ray's socket paths must stay short: not under pytest's long tmp_path
    temp_dir = Path(tempfile.mkdtemp(prefix="hlray-"))
    dashboard, marker, ray_token = free_port(), secrets.token_hex(8), secrets.token_hex(32)
    env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HYPERLAW_URL": live_server.url,
        "HYPERLAW_TOKEN": live_server.token,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": ray_token,
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",  # as a local sweep's cluster has it
        MARKER_ENV: marker,
    }
    env.pop("RAY_ADDRESS", None)
    start = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            f"--port={free_port()}",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        cwd=temp_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the head's processes: one process group
    )
    try:
        output, _ = start.communicate(timeout=120)
        assert start.returncode == 0, output
        yield RayHead(f"http://127.0.0.1:{dashboard}", temp_dir, ray_token)
    finally:
        if start.poll() is None:
            start.kill()
        _stop_head(start.pid, marker)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _hyperlaw(database_url: str, *args: str, env: dict[str, str], timeout: float):
    """`hyperlaw sweep ...` as a user types it, logging at INFO (what the job runs too)."""
    argv, run_env = hyperlaw_command(database_url, *args, env=env)
    argv[argv.index("WARNING")] = "INFO"
    return subprocess.run(
        argv, cwd=REPO_ROOT, env=run_env, capture_output=True, text=True, timeout=timeout
    )


def _files_holding(root: Path, secret: str) -> list[str]:
    return [
        str(path)
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink() and secret.encode() in path.read_bytes()
    ]


@pytest.mark.timeout(420)  # measured: 70 s on 2 cores with the head, 95 s on a first run
def test_a_sweep_submitted_as_a_ray_job_runs_on_the_cluster_without_the_drivers_token(
    live_server, ray_head, sweep_yaml
):
    driver_token = make_token(live_server.database_url)  # the submitter's own, never sent
    path = sweep_yaml(
        experiment="trainer-test-ray-job",
        workers_per_trial=1,
        zero_stage=0,
        search={"learning_rate": [0.03], "batch_size_tokens": [64]},
        n_tokens=[64 * 8],
    )
    # the service as the submitting machine names it: nothing answers there from the cluster,
    # so the trial reports only if the nodes' HYPERLAW_URL wins
    here_url = f"http://127.0.0.1:{free_port()}"
    env = ray_head.submitter_env(HYPERLAW_TOKEN=driver_token)
    args = ("sweep", str(path), "--address", ray_head.address, "--url", here_url)
    done = _hyperlaw(live_server.database_url, *args, env=env, timeout=300)

    assert done.returncode == 0, done.stdout + done.stderr
    first = done.stdout.splitlines()[0]
    match = re.fullmatch(rf"submitted Ray job (\S+) to {re.escape(ray_head.address)}", first)
    assert match, done.stdout
    job_id = match.group(1)
    assert "HYPERLAW_TOKEN is not sent with the job" in done.stderr
    assert "Traceback" not in done.stderr
    # the job's log, streamed: its driver's summary
    assert "sweep trainer-test-ray-job: 1 completed, 0 failed" in done.stdout

    with HyperlawClient(live_server.url, live_server.token) as client:
        (experiment,) = client.list_experiments(name="trainer-test-ray-job")["data"]
        (trial,) = client.list_trials(experiment_id=experiment["id"])["data"]
        points = client.get_points(trial["id"])["data"]
    assert trial["status"] == "completed" and trial["steps_done"] == 8
    assert [p["step"] for p in points] == list(range(9))

    jobs = ray_head.job_client()
    info = jobs.get_job_info(job_id)
    assert str(info.status.value) == "SUCCEEDED"
    assert info.entrypoint.startswith(f"hyperlaw --log-level INFO sweep {path.name} --address")
    assert f'--url "${{HYPERLAW_URL:-{here_url}}}"' in info.entrypoint
    assert info.runtime_env["working_dir"].startswith("gcs://")  # uploaded: the file alone
    assert "HYPERLAW_TOKEN" not in info.runtime_env.get("env_vars", {})
    record = json.dumps([info.entrypoint, info.runtime_env, info.metadata])
    assert driver_token not in record
    assert _files_holding(ray_head.temp_dir, driver_token) == []
    # nor the nodes' own, from the environment of `ray start`
    assert _files_holding(ray_head.temp_dir, live_server.token) == []

    # --no-wait: the id, at once; the job (a --resume with nothing left) ends after
    started = time.time()
    quick = _hyperlaw(
        live_server.database_url, *args, "--resume", "--no-wait", env=env, timeout=120
    )
    returned = time.time()
    assert quick.returncode == 0, quick.stdout + quick.stderr
    (line,) = quick.stdout.splitlines()
    second = re.fullmatch(r"submitted Ray job (\S+) to .*", line).group(1)
    deadline = time.monotonic() + 120
    while (status := str(jobs.get_job_status(second).value)) not in ("SUCCEEDED", "FAILED"):
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    ended = jobs.get_job_info(second)
    assert status == "SUCCEEDED", jobs.get_job_logs(second)
    assert started * 1000 < ended.start_time and ended.end_time > returned * 1000
    assert "0 trials to run, 1 already completed" in jobs.get_job_logs(second)


def test_an_address_that_is_no_ray_dashboard_is_one_error_line(live_server, sweep_yaml):
    path = sweep_yaml(experiment="trainer-test-ray-job-refused")
    for address, says in [
        (f"http://127.0.0.1:{free_port()}", "no Ray dashboard answers at"),
        (live_server.url, "is not a Ray dashboard (GET /api/version answered 404"),
    ]:
        done = _hyperlaw(
            live_server.database_url, "sweep", str(path), "--address", address, env={}, timeout=60
        )
        assert done.returncode == 1, done.stderr
        assert done.stdout == "" and "Traceback" not in done.stderr
        errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and says in errors[0], done.stderr


def test_the_nodes_service_url_wins_over_the_submitters(tmp_path):
    """The entrypoint as the job's shell reads it: the submitter's URL only where the nodes
    set no HYPERLAW_URL."""
    entrypoint = job_entrypoint(
        "my sweep.yaml", url="http://localhost:8000/", resume=True, output_dir="/shared/runs"
    )
    shown = "hyperlaw() { printf '%s\\n' \"$@\"; }; " + entrypoint  # its words, one a line
    env = {"PATH": os.environ["PATH"]}
    here = subprocess.run(["sh", "-c", shown], env=env, capture_output=True, text=True)
    nodes = subprocess.run(
        ["sh", "-c", shown],
        env={**env, "HYPERLAW_URL": "http://api:8000"},
        capture_output=True,
        text=True,
    )
    words = ["--log-level", "INFO", "sweep", "my sweep.yaml", "--address", "auto", "--resume"]
    words += ["--output-dir", "/shared/runs", "--url"]
    assert here.stdout.splitlines() == [*words, "http://localhost:8000/"]
    assert nodes.stdout.splitlines() == [*words, "http://api:8000"]


def test_the_job_carries_the_sweep_file_and_says_what_it_does_not_carry():
    """examples/cpu_small_gpt.yaml: its relative corpus_dir goes as the absolute path it
    names here, with a warning, as does its relative output_dir; of HYPERLAW_* only the
    client's settings go, never the token nor the server's database URL."""
    path = REPO_ROOT / "examples" / "cpu_small_gpt.yaml"
    config = load_sweep_config(path)
    environ = {
        "HYPERLAW_TOKEN": "secret-token",
        "HYPERLAW_DATABASE_URL": "postgresql://user:password@db/hyperlaw",
        "HYPERLAW_CLIENT_RETRY_S": "30",
    }
    request = job_request(
        path, config, url=None, resume=False, output_dir=None, log_level="INFO", environ=environ
    )
    assert request.entrypoint == (
        "hyperlaw --log-level INFO sweep cpu_small_gpt.yaml --address auto"
    )
    assert request.env_vars == {"HYPERLAW_CLIENT_RETRY_S": "30"}
    assert yaml.safe_load(request.file_text)["corpus_dir"] == config.corpus_dir
    corpus, output, token = request.warnings
    assert corpus.startswith(f"corpus_dir {config.corpus_dir} is not uploaded with the job")
    assert "every Ray node must read it at that path" in corpus
    assert output.startswith("output_dir 'runs/cpu-small-gpt' is relative")
    assert token.startswith("HYPERLAW_TOKEN is not sent with the job")
    assert "secret-token" not in repr(request) and "password" not in repr(request)


def test_a_job_on_shared_storage_carries_storage_and_the_corpus_uri(tmp_path):
    """``--storage`` goes with the entrypoint; a corpus URI goes as written, without the
    warning of a path (each node copies it); a relative output_dir holds only the spool."""
    uri = "s3://bucket/corpus?endpoint_override=minio:9000&scheme=http"
    path = tmp_path / "gpt.yaml"
    text = (REPO_ROOT / "examples" / "cpu_small_gpt.yaml").read_text()
    path.write_text(text.replace("corpus_dir: ../runs/corpus", f"corpus_dir: '{uri}'"))
    config = load_sweep_config(path).with_storage("s3://bucket/sweeps")
    request = job_request(
        path,
        config,
        url=None,
        resume=False,
        output_dir=None,
        log_level="INFO",
        environ={},
        storage="s3://bucket/sweeps",
    )
    assert request.entrypoint == (
        "hyperlaw --log-level INFO sweep gpt.yaml --address auto --storage s3://bucket/sweeps"
    )
    assert yaml.safe_load(request.file_text)["corpus_dir"] == uri
    (output,) = request.warnings
    assert output.startswith("output_dir 'runs/cpu-small-gpt' is relative")
    assert output.endswith("to keep the spool")
