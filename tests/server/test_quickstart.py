"""``hyperlaw quickstart`` (what ``make run`` runs): from an empty machine to a finite
recommendation, with default settings (the embedded SQLite file in the per-user data dir)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import httpx

from tests.conftest import REPO_ROOT, free_port

LIMIT_S = 180.0


def start(data_home, port, log_path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERLAW_")}
    env.update(XDG_DATA_HOME=str(data_home), PYTHONPATH=str(REPO_ROOT))
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "hyperlaw", "quickstart", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def first_answer(proc, url: str, log_path) -> dict:
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        try:
            answer = httpx.get(url, timeout=2)
            if answer.status_code == 200:
                return answer.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no answer within {LIMIT_S} s:\n{log_path.read_text()}")


def stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_quickstart_answers_then_reuses_what_is_there(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/recommendations?n_params=1e9&n_tokens=1e11"
    for run in (1, 2):
        log_path = tmp_path / f"run{run}.log"
        started = time.monotonic()
        proc = start(tmp_path / "data", port, log_path)
        try:
            body = first_answer(proc, url, log_path)
            took = time.monotonic() - started
        finally:
            stop(proc)
        assert took < LIMIT_S
        for key in (
            "learning_rate",
            "batch_size_tokens",
            "batch_size_sequences",
            "critical_batch_size_tokens",
        ):
            assert math.isfinite(body[key]) and body[key] > 0
        out = log_path.read_text()
        assert f"curl '{url}'" in out
        if run == 1:
            assert "importing the bundled Step Law sweep" in out and "arXiv:2503.04715" in out
            first_fit = body["fit_ids"]
        else:
            assert "database has 1911 trials; using them" in out
            assert "fits are up to date" in out
            assert body["fit_ids"] == first_fit
    assert (tmp_path / "data" / "hyperlaw" / "hyperlaw.db").exists()
