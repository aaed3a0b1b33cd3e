"""client.HyperlawClient against the live service (and, for 5xx/429 retries, a scripted
stub server standing in for a failing service)."""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from client import HyperlawAPIError, HyperlawClient, HyperlawUnavailable
from tests.conftest import free_port


def test_env_defaults(monkeypatch, live_server):
    monkeypatch.setenv("HYPERLAW_URL", live_server.url)
    monkeypatch.setenv("HYPERLAW_TOKEN", live_server.token)
    with HyperlawClient() as client:
        assert client.ensure_experiment("client-env")["name"] == "client-env"


def test_4xx_raises_at_once_without_retry(live_server):
    with HyperlawClient(live_server.url, live_server.token, backoff_s=5.0) as client:
        with pytest.raises(HyperlawAPIError) as err:
            client.get_trial(987654321)
        assert err.value.status_code == 404 and err.value.detail == "trial 987654321 not found"
        with pytest.raises(HyperlawAPIError) as bad:
            client.create_trial(experiment_id=1, n_params=0)
        assert bad.value.status_code == 422
        assert {
            "field": "n_params",
            "rule": "greater_than",
            "message": "n_params must be > 0",
        } in bad.value.detail
        assert client.retries == 0


def test_unreachable_raises_unavailable_after_retries():
    with HyperlawClient(f"http://127.0.0.1:{free_port()}", max_retries=3, backoff_s=0.01) as client:
        with pytest.raises(HyperlawUnavailable, match="after 4 attempts"):
            client.heartbeat(1)
        assert client.retries == 3


class _Scripted(BaseHTTPRequestHandler):
    """Answers each request with the next (status, headers, body) of ``script``."""

    script: list = []
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server naming)
        length = int(self.headers.get("Content-Length", 0))
        self.seen.append(json.loads(self.rfile.read(length) or b"null"))
        status, headers, body = self.script.pop(0)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        payload = json.dumps(body).encode()
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_5xx_and_429_are_retried_with_the_same_body():
    _Scripted.script = [
        (503, {}, {"detail": "database unavailable"}),
        (429, {"Retry-After": "0"}, {"detail": "slow down"}),
        (504, {}, {"detail": "gateway timeout"}),
        (200, {}, {"trial_id": 5, "count": 1}),
    ]
    _Scripted.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        with HyperlawClient(url, "t", max_retries=5, backoff_s=0.01) as client:
            client.post_points(5, [{"step": 1, "train_loss": math.nan}])
            assert client.retries == 3
        assert len(_Scripted.seen) == 4 and all(b == _Scripted.seen[0] for b in _Scripted.seen)
        assert _Scripted.seen[0] == {"points": [{"step": 1, "train_loss": "NaN"}]}
        _Scripted.script = [(502, {}, {"detail": "bad gateway"})] * 3
        with HyperlawClient(url, "t", max_retries=2, backoff_s=0.01) as client:
            with pytest.raises(HyperlawUnavailable, match="HTTP 502"):
                client.heartbeat(5)
    finally:
        httpd.shutdown()


def test_post_points_splits_batches_and_reads_back(live_server):
    with HyperlawClient(live_server.url, live_server.token) as client:
        exp = client.ensure_experiment("client-batches")
        trial = client.create_trial(
            experiment_id=exp["id"],
            n_params=10**6,
            n_tokens=10**8,
            seq_len=128,
            learning_rate=1e-3,
            batch_size_tokens=4096,
        )
        assert trial["idempotency_key"].startswith("client-")  # retries of the POST are safe
        points = [{"step": s, "train_loss": 5.0 - s * 1e-4} for s in range(25_000)]
        assert client.post_points(trial["id"], points) == {"trial_id": trial["id"], "count": 25_000}
        back = client.get_points(trial["id"])
        assert back["count"] == 25_000 and back["data"][-1]["step"] == 24_999
        assert client.get_points(trial["id"], step_min=24_990)["count"] == 10


def test_client_is_thread_safe(live_server):
    with HyperlawClient(live_server.url, live_server.token) as client:
        exp = client.ensure_experiment("client-threads")
        trials = [
            client.create_trial(
                experiment_id=exp["id"],
                n_params=1,
                n_tokens=1,
                seq_len=1,
                learning_rate=1e-3,
                batch_size_tokens=1,
                idempotency_key=f"t{i}",
            )["id"]
            for i in range(4)
        ]

        def work(i: int) -> None:
            trial_id = trials[i % 4]
            for k in range(10):
                client.heartbeat(trial_id)
                client.post_points(trial_id, [{"step": i * 100 + k, "train_loss": 1.0}])

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(work, range(8)))  # re-raises any thread's error here
        assert sum(client.get_points(t)["count"] for t in trials) == 80
