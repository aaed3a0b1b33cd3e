"""``pip install "hyperlaw[client]"`` into a fresh virtual environment installs the client
alone (httpx, no torch, no server): ``hyperlaw.init`` logs a run to the live service and
``hyperlaw sync`` answers, while ``hyperlaw --help`` says which parts are not installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid

import pytest

from client import HyperlawClient
from tests.databases import REPO_ROOT

HEAVY = ("torch", "deepspeed", "ray", "fastapi", "sqlalchemy", "scipy", "numpy")


@pytest.fixture(scope="module")
def light_env(tmp_path_factory):
    venv = tmp_path_factory.mktemp("light") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "--quiet", f"{REPO_ROOT}[client]"]
    done = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


def test_the_client_installs_without_torch_or_the_server(light_env):
    listed = subprocess.run(
        [str(light_env / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert "httpx" in names and "hyperlaw" in names
    assert not names & set(HEAVY), names & set(HEAVY)


def test_the_light_client_logs_a_run_and_its_command_answers(light_env, live_server, tmp_path):
    experiment = f"client-light-{uuid.uuid4().hex[:6]}"
    script = textwrap.dedent(
        f"""
        import sys, hyperlaw
        run = hyperlaw.init(experiment={experiment!r}, n_params=1000, n_tokens=8000,
                            seq_len=8, learning_rate=0.01, batch_size_tokens=64)
        for step in range(1, 4):
            run.log({{"train_loss": 4.0 / step}}, step=step)
        run.finish(final_loss=4.0 / 3)
        assert "torch" not in sys.modules and "server" not in sys.modules
        """
    )
    env = {"HYPERLAW_URL": live_server.url, "HYPERLAW_TOKEN": live_server.token, "PATH": ""}
    python = str(light_env / "bin" / "python")
    # from another folder, so that the checkout's packages are not importable by accident
    subprocess.run([python, "-c", script], env=env, cwd=tmp_path, check=True, timeout=60)
    with HyperlawClient(live_server.url, live_server.token) as client:
        (exp,) = client.list_experiments(name=experiment)["data"]
        (trial,) = client.list_trials(experiment_id=exp["id"])["data"]
    assert trial["status"] == "completed" and trial["steps_done"] == 3

    hyperlaw = str(light_env / "bin" / "hyperlaw")
    helped = subprocess.run([hyperlaw, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert helped.returncode == 0 and "sync" in helped.stdout
    assert "Not installed here" in helped.stdout and "hyperlaw[all]" in helped.stdout
    synced = subprocess.run(
        [hyperlaw, "sync", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert synced.returncode == 0 and "nothing to send" in synced.stdout
