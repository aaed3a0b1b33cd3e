"""``hyperlaw.init`` / ``run.log`` / ``run.finish`` against the live service: a run resumed by
its key, finished at exit or failed by an exception, logged offline and synced later, and
three lines added to a real torchrun script on two CPU processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import pytest

import hyperlaw
from client import HyperlawClient
from tests.databases import REPO_ROOT, hyperlaw_command

SHAPE = {
    "n_params": 10_000,
    "n_tokens": 64_000,
    "seq_len": 16,
    "learning_rate": 3e-3,
    "batch_size_tokens": 64,
}


@pytest.fixture
def env_of(live_server, monkeypatch):
    monkeypatch.setenv("HYPERLAW_URL", live_server.url)
    monkeypatch.setenv("HYPERLAW_TOKEN", live_server.token)
    monkeypatch.delenv("RANK", raising=False)
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def _trials(live_server, experiment: str) -> list[dict]:
    with HyperlawClient(live_server.url, live_server.token) as client:
        (exp,) = client.list_experiments(name=experiment)["data"]
        return client.list_trials(experiment_id=exp["id"])["data"]


def _steps(live_server, trial_id: int) -> list[int]:
    with HyperlawClient(live_server.url, live_server.token) as client:
        return [p["step"] for p in client.get_points(trial_id)["data"]]


def test_a_run_is_created_logged_finished_and_resumed_by_its_key(env_of, live_server):
    """A job killed after step 5 (no exit handlers run) and started again with the same key
    goes on in the same trial."""
    experiment = f"client-run-{uuid.uuid4().hex[:6]}"
    config = {"weight_decay": 0.1, "schedule": "cosine", "my_flag": True}
    job = textwrap.dedent(
        f"""
        import os, sys, hyperlaw
        run = hyperlaw.init(experiment={experiment!r}, family="client-tests", key="job-1",
                            config={config!r}, **{SHAPE!r})
        first, last = int(sys.argv[1]), int(sys.argv[2])
        for step in range(first, last + 1):
            run.log({{"train_loss": 5.0 / step, "lr": 3e-3, "tokens": 64 * step}}, step=step)
        if last < 6:
            run._sender.flush()
            os._exit(0)  # killed: no finish, no exit handler
        run.finish(final_loss=0.9, tokens_done=last * 64)
        """
    )
    for first, last in ((1, 5), (6, 6)):
        argv = [sys.executable, "-c", job, str(first), str(last)]
        subprocess.run(argv, env=env_of, check=True, capture_output=True, timeout=60)
    (trial,) = _trials(live_server, experiment)
    assert trial["status"] == "completed" and trial["idempotency_key"] == "job-1"
    assert trial["steps_done"] == 6 and trial["tokens_done"] == 6 * 64
    assert trial["schedule"] == "cosine" and trial["weight_decay"] == 0.1
    assert trial["config"]["my_flag"] is True
    assert _steps(live_server, trial["id"]) == [1, 2, 3, 4, 5, 6]


def test_an_exception_fails_the_run_with_its_reason_in_a_block_and_at_exit(env_of, live_server):
    experiment = f"client-run-fail-{uuid.uuid4().hex[:6]}"
    with pytest.raises(RuntimeError):
        with hyperlaw.init(experiment=experiment, key="block", **SHAPE) as run:
            run.log({"train_loss": 2.0})
            raise RuntimeError("loss exploded")
    script = textwrap.dedent(
        f"""
        import hyperlaw
        run = hyperlaw.init(experiment={experiment!r}, key="script", **{SHAPE!r})
        run.log({{"train_loss": 2.0}})
        run.log({{"train_loss": 1.5}})
        raise ValueError("out of memory")
        """
    )
    ended = subprocess.run([sys.executable, "-c", script], env=env_of, capture_output=True)
    assert ended.returncode == 1
    clean = script.replace('raise ValueError("out of memory")', "").replace('"script"', '"clean"')
    subprocess.run([sys.executable, "-c", clean], env=env_of, check=True, capture_output=True)
    trials = {t["idempotency_key"]: t for t in _trials(live_server, experiment)}
    assert trials["block"]["status"] == "failed"
    assert trials["block"]["status_reason"] == "RuntimeError: loss exploded"
    assert trials["script"]["status"] == "failed"
    assert trials["script"]["status_reason"] == "ValueError: out of memory"
    assert trials["clean"]["status"] == "completed" and trials["clean"]["steps_done"] == 1
    assert _steps(live_server, trials["script"]["id"]) == [0, 1]


def test_an_offline_run_is_spooled_and_synced_later(env_of, live_server, tmp_path):
    experiment = f"client-run-offline-{uuid.uuid4().hex[:6]}"
    run = hyperlaw.init(
        experiment=experiment, family="client-tests", key="off-1", offline=True,
        spool_dir=tmp_path, **SHAPE,
    )  # fmt: skip
    for step in range(3):
        run.log({"train_loss": 3.0 - step, "eval_loss": float("nan")}, step=step)
    run.finish(final_loss=1.0)
    assert run.trial_id is None and (tmp_path / "off-1.jsonl").exists()
    argv, env = hyperlaw_command("sqlite://", "sync", str(tmp_path))
    env.update(HYPERLAW_URL=live_server.url, HYPERLAW_TOKEN=live_server.token)
    for _ in range(2):  # the second sync finds the file done
        synced = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        assert synced.returncode == 0, synced.stderr
    (trial,) = _trials(live_server, experiment)
    assert trial["status"] == "completed" and trial["final_loss"] == 1.0
    assert trial["idempotency_key"] == "off-1"
    assert _steps(live_server, trial["id"]) == [0, 1, 2]
    assert (tmp_path / "off-1.jsonl.sent").exists()


def test_ranks_other_than_zero_record_nothing(env_of, monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    run = hyperlaw.init(experiment="never-made", spool_dir=tmp_path, **SHAPE)
    run.log({"train_loss": 1.0})
    run.finish()
    assert run.trial_id is None and not run.enabled and not list(tmp_path.iterdir())


TORCHRUN_SCRIPT = """
import torch, torch.distributed as dist
import hyperlaw                                                          # 1

dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
x, w = torch.randn(256, 16), torch.randn(16, 1)
run = hyperlaw.init(experiment=EXPERIMENT, family="client-tests", n_params=17,  # 2
                    n_tokens=20 * 64 * 2, seq_len=1, learning_rate=0.05,
                    batch_size_tokens=64 * 2)
for step in range(1, 21):
    batch = x[torch.randint(0, 256, (64,))]
    loss = ((model(batch) - batch @ w) ** 2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    run.log({"train_loss": loss.item(), "lr": 0.05}, step=step)           # 3
run.finish(final_loss=loss.item(), tokens_done=20 * 64 * 2)
dist.destroy_process_group()
"""


def test_three_lines_in_a_torchrun_script_on_two_processes(env_of, live_server, tmp_path):
    experiment = f"client-torchrun-{uuid.uuid4().hex[:6]}"
    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT.replace("EXPERIMENT", repr(experiment)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    done = subprocess.run(
        [*torchrun, "--nproc_per_node", "2", str(script)],
        env=env_of,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (trial,) = _trials(live_server, experiment)  # rank 1 made none
    assert trial["status"] == "completed" and trial["steps_done"] == 20
    assert trial["idempotency_key"]  # torchrun's run id
    assert _steps(live_server, trial["id"]) == list(range(1, 21))
