"""The client's retries: what it sends again, for how long, and that sending again is safe.

``DroppingProxy`` stands between the client and a real ``hyperlaw serve``: it forwards each
request, reads the service's whole answer (so the request was carried out and committed)
and then, for the first N requests that match, closes the client's connection instead of
passing the answer on. The client sees a connection lost after sending and retries; a trial
created with an idempotency key must still exist once, and each point once.

The time budget and the status codes are checked against a scripted stub server.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import func, select

from client import HyperlawAPIError, HyperlawClient, HyperlawUnavailable
from server.core.db import open_database
from server.models import Point, Trial
from tests.conftest import LiveServer, free_port

# --- a proxy that loses answers --------------------------------------------------------------


def _read_request(conn: socket.socket, pending: bytes) -> tuple[bytes, bytes] | None:
    """One HTTP/1.1 request (head and Content-Length body) from ``conn``; returns it and the
    bytes read past it, or None when the client closed the connection."""
    while b"\r\n\r\n" not in pending:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        pending += chunk
    head, _, rest = pending.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        rest += chunk
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


def _close_upstream(request: bytes) -> bytes:
    """The request with ``Connection: close``, so the service's answer ends at EOF."""
    head, _, body = request.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body


@dataclass
class DroppingProxy:
    """HTTP proxy on 127.0.0.1 to ``upstream_port`` that drops the answers to the first
    ``drops`` requests whose first line starts with ``match`` (e.g. ``b"POST /v1/trials "``)
    after the service has answered them in full."""

    upstream_port: int
    match: bytes = b""
    drops: int = 0
    seen: list[str] = field(default_factory=list)  # request lines that reached the service
    dropped: list[str] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)  # the service's status per dropped one

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        pending = b""
        with conn:
            while True:
                got = _read_request(conn, pending)
                if got is None:
                    return
                request, pending = got
                line = request.split(b"\r\n", 1)[0]
                answer = b""
                with socket.create_connection(("127.0.0.1", self.upstream_port)) as up:
                    up.sendall(_close_upstream(request))
                    while chunk := up.recv(65536):
                        answer += chunk
                with self._lock:
                    self.seen.append(line.decode())
                    drop = line.startswith(self.match) and len(self.dropped) < self.drops
                    if drop:
                        self.dropped.append(line.decode())
                        self.answered.append(int(answer.split(b" ", 2)[1]))
                if drop:
                    return  # the answer is lost; the client's connection closes unanswered
                conn.sendall(answer)


@pytest.fixture
def proxy(live_server: LiveServer) -> Iterator[DroppingProxy]:
    port = int(live_server.url.rsplit(":", 1)[1])
    p = DroppingProxy(port)
    yield p
    p.close()


def _trial_fields(experiment_id: int) -> dict:
    return dict(
        experiment_id=experiment_id,
        n_params=10**6,
        n_tokens=10**8,
        seq_len=128,
        learning_rate=1e-3,
        batch_size_tokens=4096,
    )


def test_trial_created_once_when_its_answers_are_lost(live_server, proxy):
    proxy.match, proxy.drops = b"POST /v1/trials ", 2
    with HyperlawClient(proxy.url, live_server.token, backoff_s=0.05) as client:
        exp = client.ensure_experiment("idempotency-trials")
        trial = client.create_trial(**_trial_fields(exp["id"]), idempotency_key="lost-answers")
        assert client.retry_causes == {"RemoteProtocolError": 2}  # lost after sending
    assert proxy.dropped == ["POST /v1/trials HTTP/1.1"] * 2
    assert proxy.answered == [201, 200]  # created, then found by its key; both answers lost
    assert proxy.seen.count("POST /v1/trials HTTP/1.1") == 3  # the service got all three
    with open_database(live_server.database_url) as database, database.session() as session:
        ids = session.scalars(
            select(Trial.id).where(
                Trial.experiment_id == exp["id"], Trial.idempotency_key == "lost-answers"
            )
        ).all()
    assert ids == [trial["id"]]


def test_points_stored_once_when_their_answers_are_lost(live_server, proxy):
    with HyperlawClient(live_server.url, live_server.token) as direct:
        exp = direct.ensure_experiment("idempotency-points")
        trial = direct.create_trial(**_trial_fields(exp["id"]))
    points_path = f"POST /v1/trials/{trial['id']}/points ".encode()
    proxy.match, proxy.drops = points_path, 3
    points = [{"step": s, "train_loss": 4.0 - s * 1e-5} for s in range(25_000)]  # 3 batches
    with HyperlawClient(proxy.url, live_server.token, backoff_s=0.05) as client:
        assert client.post_points(trial["id"], points)["count"] == 25_000
        assert client.retries == 3
    assert proxy.answered == [200] * 3  # each lost answer was a stored batch
    assert sum(line.startswith(points_path.decode()) for line in proxy.seen) == 3 + 3
    with open_database(live_server.database_url) as database, database.session() as session:
        n, distinct, low, high = session.execute(
            select(
                func.count(),
                func.count(func.distinct(Point.step)),
                func.min(Point.step),
                func.max(Point.step),
            ).where(Point.trial_id == trial["id"])
        ).one()
    assert (n, distinct, low, high) == (25_000, 25_000, 0, 24_999)


def test_a_request_not_known_to_be_idempotent_is_not_sent_twice(live_server, proxy):
    with HyperlawClient(live_server.url, live_server.token) as direct:
        exp = direct.ensure_experiment("idempotency-raw-post")
    proxy.match, proxy.drops = b"POST /v1/trials ", 1
    body = {**_trial_fields(exp["id"]), "idempotency_key": None}
    with HyperlawClient(proxy.url, live_server.token, backoff_s=0.05) as client:
        with pytest.raises(HyperlawUnavailable, match="not safe to retry"):
            client.request("POST", "/v1/trials", json_body=body)
        assert client.retries == 0
    assert proxy.seen == ["POST /v1/trials HTTP/1.1"]


# --- the time budget and the status codes, against a scripted stub --------------------------


class _Stub(BaseHTTPRequestHandler):
    """Answers each request with the next (status, headers) of ``script``; 200 when empty."""

    script: list[tuple[int, dict[str, str]]] = []
    seen: list[tuple[str, float]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        self.seen.append((f"{self.command} {self.path}", time.monotonic()))
        status, headers = self.script.pop(0) if self.script else (200, {})
        payload = json.dumps({"detail": f"scripted {status}"}).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = _answer  # noqa: N815 (http.server naming)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub() -> Iterator[tuple[str, type[_Stub]]]:
    _Stub.script, _Stub.seen = [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Stub
    httpd.shutdown()
    httpd.server_close()


def test_the_budget_is_time_and_outlasts_a_restart():
    """Nothing listens for 6.5 s, longer than the old budget of five doubling retries
    (3.1 to 6.2 s); the call waits and succeeds once the service is up."""
    port = free_port()
    holder: dict = {}

    def come_up_late() -> None:
        time.sleep(6.5)
        _Stub.script, _Stub.seen = [], []
        holder["httpd"] = httpd = ThreadingHTTPServer(("127.0.0.1", port), _Stub)
        httpd.serve_forever()

    threading.Thread(target=come_up_late, daemon=True).start()
    start = time.monotonic()
    try:
        with HyperlawClient(f"http://127.0.0.1:{port}", "t", retry_for_s=30) as client:
            assert client.get_trial(1) == {"detail": "scripted 200"}
            assert client.retries >= 4
        assert 6.5 <= time.monotonic() - start < 6.5 + 4  # backoff capped at 2 s, plus slack
    finally:
        for _ in range(50):
            if "httpd" in holder:
                holder["httpd"].shutdown()
                holder["httpd"].server_close()
                break
            time.sleep(0.2)


def test_the_budget_runs_out_and_comes_from_the_environment(monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HYPERLAW_CLIENT_RETRY_S", "1.5")
    start = time.monotonic()
    with HyperlawClient(url, backoff_s=0.05) as client:
        assert client.retry_for_s == 1.5
        with pytest.raises(HyperlawUnavailable, match=r"attempts in 1\.\d s: ConnectError"):
            client.heartbeat(1)
        assert client.retries >= 3
    assert 1.5 <= time.monotonic() - start < 2.5
    with HyperlawClient(url, retry_for_s=0) as client:  # the argument wins; 0: one attempt
        with pytest.raises(HyperlawUnavailable, match="after 1 attempts"):
            client.get_trial(1)
        assert client.retries == 0
    monkeypatch.setenv("HYPERLAW_CLIENT_RETRY_S", "soon")
    with pytest.raises(ValueError, match="HYPERLAW_CLIENT_RETRY_S"):
        HyperlawClient(url)


def test_retry_after_is_honoured(stub):
    url, handler = stub
    handler.script = [(503, {"Retry-After": "1"}), (429, {"Retry-After": "0"})]
    with HyperlawClient(url, "t", backoff_s=0.001) as client:
        client.update_trial(1, status="running")
        assert client.retries == 2
    (_, first), (_, second), _ = handler.seen
    assert second - first >= 1.0


def test_what_is_not_safe_or_not_worth_retrying_raises_at_once(stub):
    url, handler = stub
    with HyperlawClient(url, "t", backoff_s=0.001) as client:
        handler.script = [(500, {})]
        with pytest.raises(HyperlawAPIError) as err:
            client.get_trial(1)  # a fault of the service: sending again will not mend it
        assert err.value.status_code == 500
        handler.script = [(502, {})]  # a gateway's answer to a POST that may have run
        with pytest.raises(HyperlawAPIError) as err:
            client.request("POST", "/v1/trials", json_body={})
        assert err.value.status_code == 502
        handler.script = [(503, {}), (504, {})]  # refused: safe; then a gateway's: not
        with pytest.raises(HyperlawAPIError) as err:
            client.request("POST", "/v1/trials", json_body={})
        assert err.value.status_code == 504
        handler.script = [(502, {}), (504, {})]  # the same for an idempotent POST: retried
        assert client.post_points(1, [{"step": 1, "train_loss": 1.0}])["count"] == 1
        assert client.retries == 1 + 2
    assert len(handler.seen) == 1 + 1 + 2 + 3
