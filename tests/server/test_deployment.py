"""docker-compose.yml cannot be run here (no Docker); check its structure and that the
service commands it runs are ones our CLI accepts."""

from __future__ import annotations

import argparse
import shlex

import pytest
import yaml

from server import cli
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def _command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def test_services_present(compose):
    assert set(compose["services"]) >= {"postgres", "api", "worker", "ray-head", "ray-gpu-worker"}


def test_ray_head_exposes_dashboard(compose):
    head = compose["services"]["ray-head"]
    assert "8265:8265" in head["ports"]
    assert "--dashboard-port=8265" in _command(head) and "--head" in _command(head)
    gpu = compose["services"]["ray-gpu-worker"]
    assert "--address=ray-head:6379" in _command(gpu)
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)


def test_api_and_worker_use_postgres(compose):
    for name in ("api", "worker"):
        service = compose["services"][name]
        url = service["environment"]["HYPERLAW_DATABASE_URL"]
        assert url.startswith("postgresql://") and "@postgres:5432/" in url
        assert "postgres" in service["depends_on"]
    pg = compose["services"]["postgres"]["environment"]
    url = compose["services"]["api"]["environment"]["HYPERLAW_DATABASE_URL"]
    assert url.endswith("/" + pg["POSTGRES_DB"]) and pg["POSTGRES_USER"] in url
    assert compose["services"]["api"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_api_command_parses_with_our_cli(compose):
    shell = _command(compose["services"]["api"])
    assert shell[:2] == ["sh", "-c"]
    parser = argparse.ArgumentParser(prog="hyperlaw")
    cli.register(parser.add_subparsers(dest="command", required=True))
    steps = [shlex.split(part) for part in shell[2].split("&&")]
    assert [s[0] for s in steps] == ["hyperlaw", "hyperlaw"]
    upgrade = parser.parse_args(steps[0][1:])
    assert upgrade.func is cli.cmd_db_upgrade
    serve = parser.parse_args(steps[1][1:])
    assert serve.func is cli.cmd_serve and serve.host == "0.0.0.0" and serve.port == 8000
    ports = compose["services"]["api"]["ports"]
    assert f"{serve.port}:{serve.port}" in ports
