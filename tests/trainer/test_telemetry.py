"""Buffered telemetry survives a service outage without losing points, stops at once on a
batch the service refuses, and spools what a refused token held back for ``hyperlaw sync``."""

import datetime as dt
import logging
import socket
import subprocess
import threading
import time
import uuid

from sqlalchemy import update

from client import HyperlawClient
from server.core.db import open_database
from server.crud import revoke_token
from server.models import Trial, utcnow
from server.reaper import reap_stale_trials
from tests.conftest import make_token
from tests.databases import REPO_ROOT, hyperlaw_command
from trainer.telemetry import ServiceTelemetry


class TcpProxy:
    """A loopback TCP forwarder that can be cut (connections refused) and restored."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = self._free_port()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.up()

    @staticmethod
    def _free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        try:  # wakes the thread blocked in accept(); close() alone would not on Linux
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


def test_points_sent_during_an_outage_arrive_after_it(live_server):
    port = int(live_server.url.rsplit(":", 1)[1])
    proxy = TcpProxy(port)
    with HyperlawClient(live_server.url, live_server.token) as direct:
        exp = direct.ensure_experiment("trainer-test-outage")
        trial = direct.create_trial(
            experiment_id=exp["id"],
            n_params=8,
            n_tokens=1000,
            seq_len=1,
            learning_rate=0.1,
            batch_size_tokens=4,
        )
        sink = ServiceTelemetry(
            lambda: HyperlawClient(
                f"http://127.0.0.1:{proxy.port}",
                live_server.token,
                timeout=2.0,
                max_retries=1,
                backoff_s=0.05,
            ),
            trial["id"],
            batch_size=20,
            flush_interval_s=0.1,
            retry_interval_s=0.1,
        )
        sink.start()
        for step in range(50):
            sink.add_point({"step": step, "tokens": 4 * step, "train_loss": 1.0 / (step + 1)})
        assert sink.flush(timeout_s=10)
        proxy.down()
        for step in range(50, 150):
            sink.add_point({"step": step, "tokens": 4 * step, "train_loss": 1.0 / (step + 1)})
        deadline = time.monotonic() + 10
        while sink.failed_posts == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sink.failed_posts > 0  # the outage was real
        assert direct.get_points(trial["id"])["count"] == 50
        proxy.up()
        sink.finish(
            "completed",
            final_loss=1 / 150,
            steps_done=150,
            tokens_done=600,
            diverged=False,
            stop_reason="target",
        )
        assert sink.close(timeout_s=30)
        points = direct.get_points(trial["id"])["data"]
        stored = direct.get_trial(trial["id"])
    proxy.down()
    assert [p["step"] for p in points] == list(range(150))
    assert sink.delivered == 150
    assert stored["status"] == "completed" and stored["steps_done"] == 150
    assert stored["stop_reason"] == "target" and stored["tokens_done"] == 600


def _small_trial(client: HyperlawClient, experiment: str) -> dict:
    exp = client.ensure_experiment(experiment)
    return client.create_trial(
        experiment_id=exp["id"],
        n_params=8,
        n_tokens=1000,
        seq_len=1,
        learning_rate=0.1,
        batch_size_tokens=4,
    )


def _sink(live_server, trial_id: int, spool) -> ServiceTelemetry:
    """Posts only when flushed (the background thread's interval is longer than the test);
    a retry of a refused batch would show in ``failed_posts`` and keep ``flush`` waiting."""
    return ServiceTelemetry(
        lambda: HyperlawClient(live_server.url, live_server.token, max_retries=1, backoff_s=0.05),
        trial_id,
        batch_size=20,
        flush_interval_s=600.0,
        retry_interval_s=0.1,
        spool_path=spool,
    )


def _refusals(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "client.sender" and r.levelno == logging.WARNING and "refused" in r.msg
    ]


def test_points_for_a_trial_the_reaper_failed_stop_at_the_first_409(live_server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="client.sender")
    spool = tmp_path / "spool.jsonl"
    with HyperlawClient(live_server.url, live_server.token) as direct:
        trial = _small_trial(direct, "trainer-test-reaped")
        sink = _sink(live_server, trial["id"], spool)
        sink.start()
        for step in range(5):
            sink.add_point({"step": step, "train_loss": 1.0 / (step + 1)})
        assert sink.flush(timeout_s=10) and sink.delivered == 5
        # the run goes silent for ten days (grace five): the real reaper fails this trial only
        with open_database(live_server.database_url) as database:
            with database.session() as session:
                long_ago = utcnow() - dt.timedelta(days=10)
                stale = update(Trial).where(Trial.id == trial["id"]).values(heartbeat_at=long_ago)
                session.execute(stale)
            with database.session() as session:
                assert trial["id"] in reap_stale_trials(session=session, grace_s=5 * 86_400)

        for step in range(5, 10):
            sink.add_point({"step": step, "train_loss": 1.0 / (step + 1)})
        # the 409 ends the batch at once: flush returns with an empty buffer, nothing retried
        assert sink.flush(timeout_s=5)
        assert (sink.refused, sink.refused_status, sink.failed_posts) == (5, 409, 0)
        assert sink.client.retries == 0
        sink.add_point({"step": 10, "train_loss": 0.1})  # taken no more: not even queued
        assert sink.refused == 6
        assert sink.close(timeout_s=5) is False  # not every point reached the service
        stored = direct.get_trial(trial["id"])
        points = direct.get_points(trial["id"])["data"]
    assert not spool.exists()
    [warning] = _refusals(caplog)
    assert f"trial {trial['id']}:" in warning and "HTTP 409" in warning
    assert f"trial {trial['id']} is failed" in warning  # the service's reason
    assert stored["status"] == "failed" and [p["step"] for p in points] == list(range(5))


def test_an_invalid_batch_is_dropped_alone_and_later_batches_go_on(live_server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="client.sender")
    spool = tmp_path / "spool.jsonl"
    with HyperlawClient(live_server.url, live_server.token) as direct:
        trial = _small_trial(direct, "trainer-test-invalid-point")
        sink = _sink(live_server, trial["id"], spool)
        sink.add_point({"step": -1, "train_loss": 1.0})  # steps are >= 0: 422
        assert sink.flush(timeout_s=5)
        assert (sink.refused, sink.refused_status, sink.failed_posts) == (1, None, 0)
        for step in range(5):
            sink.add_point({"step": step, "train_loss": 1.0 / (step + 1)})
        assert sink.flush(timeout_s=10) and sink.delivered == 5
        assert sink.close(timeout_s=5) is False
        points = direct.get_points(trial["id"])["data"]
    assert not spool.exists()
    [warning] = _refusals(caplog)
    assert f"trial {trial['id']}:" in warning and "HTTP 422" in warning
    assert [p["step"] for p in points] == list(range(5))


def test_points_of_a_revoked_token_are_spooled_and_hyperlaw_sync_sends_them(
    live_server, tmp_path, caplog
):
    """The run's token is revoked mid-run: the first 401 stops posting, nothing is dropped,
    and at close every point not yet delivered is in the spool; ``hyperlaw sync`` (as typed,
    with a valid HYPERLAW_TOKEN) sends them, and a second sync finds nothing to do."""
    caplog.set_level(logging.WARNING, logger="client.sender")
    name = f"test-revoked-{uuid.uuid4().hex[:8]}"
    secret = make_token(live_server.database_url, name=name)
    spool_dir = tmp_path / "spool"
    spool = spool_dir / "trial.jsonl"
    with HyperlawClient(live_server.url, live_server.token) as direct:
        trial = _small_trial(direct, "trainer-test-revoked-token")
        sink = ServiceTelemetry(
            lambda: HyperlawClient(live_server.url, secret, max_retries=1, backoff_s=0.05),
            trial["id"],
            batch_size=20,
            flush_interval_s=600.0,
            retry_interval_s=0.1,
            spool_path=spool,
        )
        sink.start()
        for step in range(5):
            sink.add_point({"step": step, "train_loss": 1.0 / (step + 1)})
        assert sink.flush(timeout_s=10) and sink.delivered == 5
        with open_database(live_server.database_url) as database, database.session() as session:
            revoke_token(session=session, name=name)
        for step in range(5, 30):
            sink.add_point({"step": step, "train_loss": 1.0 / (step + 1), "lr": float("nan")})
        assert sink.flush(timeout_s=5) is False  # held at once, not retried for 5 s
        assert (sink.held_status, sink.refused, sink.failed_posts) == (401, 0, 0)
        assert sink.close(timeout_s=5) is False
        assert direct.get_points(trial["id"])["count"] == 5
    [warning] = _refusals(caplog)
    assert "HTTP 401" in warning and "hyperlaw sync" in warning
    assert len(spool.read_text().splitlines()) == 25

    argv, env = hyperlaw_command(
        live_server.database_url, "sync", str(spool_dir), "--url", live_server.url
    )
    env["HYPERLAW_TOKEN"] = live_server.token
    synced = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert synced.returncode == 0, synced.stderr
    assert f"trial {trial['id']}: 25 points sent" in synced.stdout
    assert not spool.exists() and spool.with_name("trial.jsonl.sent").exists()
    again = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "nothing to send" in again.stdout
    with HyperlawClient(live_server.url, live_server.token) as direct:
        points = direct.get_points(trial["id"])["data"]
    assert [p["step"] for p in points] == list(range(30))
    assert points[-1]["train_loss"] == 1 / 30
