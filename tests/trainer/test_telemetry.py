"""Buffered telemetry survives a service outage without losing points."""

import socket
import threading
import time

from client import HyperlawClient
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
