"""docker-compose.yml cannot be run here (no Docker): every service's command is parsed by
the CLI that runs it (``hyperlaw``'s own parser, Ray's ``ray start``), the settings are
checked (ports on 127.0.0.1 by default, the database URL as the README writes it, the trials'
service URL and token from the node's environment, one GPU image built from a CUDA wheel),
and the stack's hyperlaw commands are run natively, in compose's order, on a fresh
PostgreSQL database with the URL written as compose writes it: migrate, serve, worker, until
a recommendation answers."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy.engine import make_url

from hyperlaw.cli import build_parser
from tests.conftest import REPO_ROOT, free_port
from tests.databases import LIGHT_FITS_ENV, hyperlaw_command


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def _argv(service: dict) -> list[list[str]]:
    """The service's command as the commands it runs (``sh -c "a && b"`` is two)."""
    cmd = service["command"]
    argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    if argv[:2] == ["sh", "-c"]:
        return [shlex.split(part) for part in argv[2].split("&&")]
    return [argv]


def _env(text: str) -> str:
    """``${NAME:-default}`` as compose expands it with nothing set."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def test_every_command_parses_with_the_cli_that_runs_it(compose):
    from ray.scripts.scripts import start as ray_start

    parser = build_parser()
    seen = set()
    for name, service in compose["services"].items():
        if "command" not in service:
            assert name == "postgres"
            continue
        for argv in _argv(service):
            if argv[0] == "hyperlaw":
                args = parser.parse_args(argv[1:])
                seen.add(args.func.__name__)
            else:
                assert argv[:2] == ["ray", "start"], (name, argv)
                params = ray_start.make_context("start", argv[2:]).params
                assert params["block"], name  # a container's process must not return
                seen.add("ray start --head" if params["head"] else "ray start --address")
    assert seen == {
        "cmd_db_upgrade",
        "cmd_import_steplaw",
        "cmd_serve",
        "cmd_worker",
        "ray start --head",
        "ray start --address",
    }


def test_ports_are_local_by_default_and_the_nodes_reach_the_api(compose):
    services = compose["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("${HYPERLAW_BIND:-127.0.0.1}:"), (name, port)
    assert "10001" not in yaml.safe_dump(compose)  # Ray Client: not published
    for name in ("ray-head", "ray-gpu-worker"):
        env = services[name]["environment"]
        assert env["HYPERLAW_URL"] == "http://api:8000"  # trials read it (trainer.ray_cluster)
        assert env["HYPERLAW_TOKEN"] == "${HYPERLAW_TOKEN:-}"
    gpu = services["ray-gpu-worker"]
    assert gpu["image"] == "hyperlaw:gpu" and "cu" in _env(gpu["build"]["args"]["TORCH_INDEX"])
    assert "ARG TORCH_INDEX" in (REPO_ROOT / "Dockerfile").read_text()
    for key in ("POSTGRES_PASSWORD", "HYPERLAW_TOKEN", "HYPERLAW_BIND", "TORCH_INDEX_GPU"):
        assert f"\n{key}=" in (REPO_ROOT / ".env.example").read_text(), key
    assert services["api"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )


def test_the_stack_runs_natively_and_answers_at_once(compose, make_database, tmp_path):
    """migrate, api and worker as compose runs them, on a fresh database whose URL is
    written as compose writes it (a plain postgresql:// URL); the worker with light fits."""
    database = make_url(make_database("postgresql"))
    written = _env(compose["x-hyperlaw-env"]["HYPERLAW_DATABASE_URL"])
    assert written.startswith("postgresql://")  # exactly the README's form
    url = f"postgresql://{database.username}@{database.host}:{database.port}/{database.database}"
    services = compose["services"]
    for argv in _argv(services["migrate"]):
        cmd, env = hyperlaw_command(url, *argv[1:])
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr
    port = free_port()
    serve = _argv(services["api"])[0][1:]
    serve[serve.index("--port") + 1] = str(port)
    serve[serve.index("--host") + 1] = "127.0.0.1"  # the container's 0.0.0.0, here
    started = [
        _start(url, serve, tmp_path),
        _start(url, _argv(services["worker"])[0][1:], tmp_path),
    ]
    try:
        deadline = time.monotonic() + 240
        answer = None
        while time.monotonic() < deadline:
            try:
                answer = httpx.get(
                    f"http://127.0.0.1:{port}/v1/recommendations",
                    params={"n_params": 1e9, "n_tokens": 1e11},
                    timeout=5,
                )
                if answer.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        assert answer is not None and answer.status_code == 200, answer and answer.text
        assert answer.json()["n_trials"] == 1911
    finally:
        for process in started:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def _start(url: str, args: list[str], log_dir: Path) -> subprocess.Popen:
    cmd, env = hyperlaw_command(url, *args, env=LIGHT_FITS_ENV)
    log = open(log_dir / f"{args[0]}.log", "wb")  # noqa: SIM115 - kept by the process
    return subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted((REPO_ROOT / "deploy" / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_kuberay_manifests_start_ray_and_the_sweep_as_the_clis_take_them():
    from ray.scripts.scripts import start as ray_start

    docs = _manifests()
    assert {"RayCluster", "RayJob", "PersistentVolumeClaim"} <= set(docs)
    cluster = docs["RayCluster"]["spec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:  # KubeRay passes rayStartParams to `ray start` as --key=value
        flags = [f"--{key}={value}" for key, value in group["rayStartParams"].items()]
        ray_start.make_context("start", flags)
        container = group["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["HYPERLAW_URL"]["value"].startswith("http://")
        assert "secretKeyRef" in env["HYPERLAW_TOKEN"]["valueFrom"]  # never a literal
        assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]
    job = docs["RayJob"]["spec"]
    argv = shlex.split(job["entrypoint"])
    args = build_parser().parse_args(argv[1:])
    assert argv[0] == "hyperlaw" and args.command == "sweep" and args.address == "auto"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    mounts = {m["mountPath"] for m in head["volumeMounts"]}
    assert any(args.config.startswith(path + "/") for path in mounts), args.config
    assert job["clusterSelector"]["ray.io/cluster"] == docs["RayCluster"]["metadata"]["name"]
