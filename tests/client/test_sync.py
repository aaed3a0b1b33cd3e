"""``hyperlaw sync`` as typed, against the live service: what it refuses before sending
anything, what the service will never take, and an unreachable service."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from client import HyperlawClient
from tests.conftest import free_port
from tests.databases import REPO_ROOT, hyperlaw_command


def _sync(live_server, *args: str, token: str | None = None, **env: str):
    argv, run_env = hyperlaw_command(live_server.database_url, "sync", *args)
    run_env.update(HYPERLAW_URL=live_server.url, HYPERLAW_TOKEN=token or live_server.token, **env)
    return subprocess.run(
        argv, cwd=REPO_ROOT, env=run_env, capture_output=True, text=True, timeout=60
    )


def _trial(client: HyperlawClient, experiment: str) -> dict:
    exp = client.ensure_experiment(experiment)
    return client.create_trial(
        experiment_id=exp["id"],
        n_params=8,
        n_tokens=1000,
        seq_len=1,
        learning_rate=0.1,
        batch_size_tokens=4,
    )


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


def test_a_damaged_line_stops_the_sync_before_anything_is_sent(live_server, tmp_path):
    with HyperlawClient(live_server.url, live_server.token) as client:
        trial = _trial(client, "client-test-sync-damaged")
        good = _write(tmp_path / "a.jsonl", [{"trial_id": trial["id"], "step": 1, "train_loss": 2}])
        bad = _write(
            tmp_path / "b.jsonl",
            [{"trial_id": trial["id"], "step": 2, "train_loss": 1.5}, '{"trial_id": 1, "st'],
        )
        done = _sync(live_server, str(tmp_path))
        assert done.returncode == 2
        assert f"{bad}, line 2: not JSON" in done.stderr and "nothing was sent" in done.stderr
        assert client.get_points(trial["id"])["count"] == 0
        assert good.exists() and bad.exists()

        _write(bad, [{"trial_id": trial["id"], "step": -3, "train_loss": 1.5}])
        negative = _sync(live_server, str(bad))
        assert negative.returncode == 2
        assert "line 1: step must be an integer >= 0" in negative.stderr

    missing = _sync(live_server, str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such spool file or folder" in missing.stderr


def test_points_of_a_failed_or_unknown_trial_are_reported_and_the_file_is_done(
    live_server, tmp_path
):
    with HyperlawClient(live_server.url, live_server.token) as client:
        trial = _trial(client, "client-test-sync-failed")
        taken = _trial(client, "client-test-sync-failed")
        client.update_trial(trial["id"], status="failed", status_reason="lost its node")
        path = _write(
            tmp_path / "run.jsonl",
            [
                {"trial_id": trial["id"], "step": 7, "train_loss": 2.0},
                {"trial_id": 987654321, "step": 1, "train_loss": 2.0},
                {"trial_id": taken["id"], "step": 3, "train_loss": 1.0},
            ],
        )
        done = _sync(live_server, str(path))
        assert done.returncode == 0, done.stderr
        assert f"trial {trial['id']}: 1 points not taken (HTTP 409" in done.stdout
        assert "trial 987654321: 1 points not taken (HTTP 404" in done.stdout
        assert "1 spool file(s) done: 1 points sent, 2 not taken" in done.stdout
        assert [p["step"] for p in client.get_points(taken["id"])["data"]] == [3]
    assert not path.exists() and (tmp_path / "run.jsonl.sent").exists()


def test_an_unreachable_service_or_a_refused_token_leaves_the_files(live_server, tmp_path):
    path = _write(tmp_path / "run.jsonl", [{"trial_id": 1, "step": 1, "train_loss": 2.0}])
    down = f"http://127.0.0.1:{free_port()}"
    unreachable = _sync(live_server, str(path), "--url", down, HYPERLAW_CLIENT_RETRY_S="0.5")
    assert unreachable.returncode == 1 and "run hyperlaw sync again" in unreachable.stderr
    refused = _sync(live_server, str(path), token="hl_not-a-token")
    assert refused.returncode == 2 and "HTTP 401" in refused.stderr
    assert "HYPERLAW_TOKEN" in refused.stderr
    assert path.exists()
