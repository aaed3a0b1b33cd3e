"""A real two-node Ray cluster on this machine: a head (``ray start --head``) and a second node
(``ray start --address``), separate processes with one CPU and a resource of their own each.
The sweep joins it from this process. Its trials are 2-worker ZeRO-2 runs over gloo with
``placement_strategy: STRICT_SPREAD``: one worker on each node (each worker records its Ray
node at its first step), the curve in the live service. Then the second node is lost
mid-trial (SIGKILL to its process group and to its workers, which leave the group), once the
service shows points past a checkpoint: Ray Train cannot place the two workers again until a
replacement node joins; it does, and the run goes on from its last checkpoint, not step 0.

The second nodes offer less ``memory`` than the Tune trial's 16 MiB token (``trainer.sweep``),
so the trial's function and its Ray Train controller stay on the head; only workers are lost
with a node. Teardown kills every process of the cluster (each node's process group, then
whatever carries the node's marker in its environment) and removes Ray's temp dir, also on
failure; never `ray stop`, which would stop every Ray process of this user."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray
import ray.cloudpickle

from client import HyperlawClient
from tests.conftest import free_port
from tests.databases import REPO_ROOT
from trainer.sweep import run_sweep
from trainer.sweep_config import load_sweep_config

pytestmark = pytest.mark.multinode
MARKER_ENV = "HYPERLAW_TEST_RAY_NODE"  # every process of a node carries its node's value
SECOND_NODE_MEMORY = 8 * 2**20  # below the Tune trial's 16 MiB: trial drivers stay on the head


@dataclass(frozen=True)
class RecordNode:
    """``on_step`` hook: each worker process keeps a file of its own in ``folder`` with its rank,
    Ray node, first step and last step (rewritten whole at each step), then sleeps ``delay_s``
    (so that a node can be killed mid-run)."""

    folder: str
    delay_s: float = 0.0

    def __call__(self, step: int, rank: int) -> None:
        path = Path(self.folder) / f"worker-{os.getpid()}.json"
        if path.exists():
            record = json.loads(path.read_text())
        else:
            node = ray.get_runtime_context().get_node_id()
            record = {"rank": rank, "node": node, "first_step": step}
        record["last_step"] = step
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(record))
        partial.replace(path)  # a reader never sees half a file
        time.sleep(self.delay_s)


def _recorded(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("worker-*.json"))]


def _marked_pids(marker: str) -> list[int]:
    needle = f"{MARKER_ENV}={marker}\0".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes() + b"\0":
                pids.append(int(environ.parent.name))
        except OSError:  # gone, or not ours
            continue
    return pids


@dataclass
class Node:
    name: str  # also its custom resource: one unit
    group: int  # the process group of its `ray start` (the raylet, its agents; the GCS)
    marker: str


@dataclass
class Cluster:
    temp_dir: Path  # Ray's --temp-dir: session directories and sockets (short paths)
    env: dict[str, str]
    address: str = ""  # the GCS's host:port
    nodes: dict[str, Node] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # Ray node id -> node name

    def start(self, name: str, *, head: bool = False) -> Node:
        marker = f"{secrets.token_hex(6)}-{name}"
        ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port"]
        ports += ["--metrics-export-port", "--runtime-env-agent-port"]
        argv = [str(Path(sys.executable).with_name("ray")), "start", "--num-cpus=1"]
        argv += [f"{flag}={free_port()}" for flag in ports]
        argv += [f"--resources={json.dumps({name: 1})}", "--disable-usage-stats"]
        if head:
            port = free_port()
            argv += ["--head", f"--port={port}", f"--ray-client-server-port={free_port()}"]
            argv += ["--include-dashboard=false", f"--temp-dir={self.temp_dir}"]
            self.address = f"127.0.0.1:{port}"
        else:
            argv += [f"--address={self.address}", f"--memory={SECOND_NODE_MEMORY}"]
        started = subprocess.Popen(
            argv,
            env={**self.env, MARKER_ENV: marker},
            cwd=self.temp_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # the node's processes: one process group
        )
        node = self.nodes[name] = Node(name, started.pid, marker)
        output, _ = started.communicate(timeout=120)
        assert started.returncode == 0, output
        return node

    def kill(self, name: str) -> list[int]:
        """SIGKILL to the node's process group and to every process of the node (Ray's workers
        leave the group), as a lost machine ends them; waits until they are gone (returns
        those that are not)."""
        node = self.nodes[name]
        try:
            os.killpg(node.group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 15
        while (pids := _marked_pids(node.marker)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        return _marked_pids(node.marker)

    def node_names(self) -> dict[str, str]:
        """Ray node id -> the name of its custom resource, of every node seen alive by a call
        (a dead node's resources are no longer listed)."""
        for info in ray.nodes():
            if info["Alive"]:
                (name,) = set(info["Resources"]) & set(self.nodes)
                self.names[info["NodeID"]] = name
        return self.names


def _reload_ray_auth() -> None:
    """Make this process read RAY_AUTH_MODE and the token again, as Ray does when it turns
    token authentication on (both are cached once read)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """The head and a second node, each with one CPU and its resource ("head", "second");
    this process joined to it (the sweeps join it too, and leave it running). Every node
    started here, replacements included, is killed in the finalizer, also on failure."""
    temp_dir = Path(tempfile.mkdtemp(prefix="hlmn-"))  # Ray's socket paths must stay short
    # Ray's token authentication, with a token of the cluster's own (not ~/.ray's)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",  # as a local sweep's cluster has it
        # the GCS declares a node dead after 3 missed health checks 0.5 s apart (not ~30 s)
        "RAY_health_check_period_ms": "500",
        "RAY_health_check_timeout_ms": "500",
        "RAY_health_check_failure_threshold": "3",
        **auth,
    }
    env.pop("RAY_ADDRESS", None)
    nodes = Cluster(temp_dir, env)
    this_module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(this_module)  # RecordNode, without tests/
    try:
        nodes.start("head", head=True)
        nodes.start("second")
        with pytest.MonkeyPatch.context() as patch:
            for name, value in auth.items():
                patch.setenv(name, value)
            _reload_ray_auth()
            ray.init(address=nodes.address, log_to_driver=False)
            nodes.node_names()
            yield nodes
    finally:
        try:
            ray.shutdown()
            ray.cloudpickle.unregister_pickle_by_value(this_module)
            _reload_ray_auth()  # this process's own settings again
        finally:
            for name in reversed(list(nodes.nodes)):
                nodes.kill(name)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _trial_of(client: HyperlawClient, experiment: str) -> dict | None:
    found = client.list_experiments(name=experiment)["data"]
    trials = client.list_trials(experiment_id=found[0]["id"])["data"] if found else []
    return trials[0] if trials else None


@pytest.mark.timeout(240)
def test_a_strict_spread_trial_puts_one_worker_on_each_node(
    cluster, live_server, sweep_yaml, tmp_path
):
    path = sweep_yaml(
        experiment="trainer-test-multinode",
        placement_strategy="STRICT_SPREAD",
        search={"learning_rate": [0.03], "batch_size_tokens": [64]},
        n_tokens=[64 * 16],
    )
    record = tmp_path / "workers"
    record.mkdir()
    summary = run_sweep(
        load_sweep_config(path),
        url=live_server.url,
        token=live_server.token,
        on_step=RecordNode(str(record)),
    )
    assert ray.is_initialized()  # the sweep left the cluster it joined running
    assert (summary.completed, summary.failed) == (1, 0)

    workers = _recorded(record)
    names = cluster.node_names()
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert sorted(names[w["node"]] for w in workers) == ["head", "second"], workers

    with HyperlawClient(live_server.url, live_server.token) as client:
        trial = client.get_trial(summary.trial_ids[0])
        points = client.get_points(trial["id"])["data"]
    assert trial["status"] == "completed" and trial["steps_done"] == 16
    assert (trial["world_size"], trial["zero_stage"]) == (2, 2)
    assert [p["step"] for p in points] == list(range(17))
    assert points[-1]["eval_loss"] < points[0]["eval_loss"]


@pytest.mark.timeout(300)
def test_a_lost_node_is_replaced_and_the_trial_resumes_from_its_checkpoint(
    cluster, live_server, sweep_yaml, tmp_path
):
    experiment, steps, every = "trainer-test-multinode-lost-node", 40, 5
    path = sweep_yaml(
        experiment=experiment,
        placement_strategy="STRICT_SPREAD",
        max_failures=1,
        checkpoint_every=every,
        search={"learning_rate": [0.03], "batch_size_tokens": [64]},
        n_tokens=[64 * steps],
    )
    record = tmp_path / "workers"
    record.mkdir()
    seen: dict[str, object] = {}

    def lose_the_second_node() -> None:
        """Once the service shows points past the second checkpoint: kill the second node,
        then start a replacement ("third")."""
        try:
            deadline = time.monotonic() + 150
            with HyperlawClient(live_server.url, live_server.token) as client:
                while time.monotonic() < deadline:
                    trial = _trial_of(client, experiment)
                    points = client.get_points(trial["id"])["data"] if trial else []
                    if points and max(p["step"] for p in points) > 2 * every:
                        break
                    time.sleep(0.2)
                else:
                    raise AssertionError("no points past the checkpoint in time")
            seen["steps_before_kill"] = max(p["step"] for p in points)
            seen["killed_at"] = time.monotonic()
            assert not cluster.kill("second"), "processes of the second node outlived SIGKILL"
            cluster.start("third")
            cluster.node_names()
            seen["replaced_at"] = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            seen["error"] = exc

    watcher = threading.Thread(target=lose_the_second_node, daemon=True)
    watcher.start()
    summary = run_sweep(
        load_sweep_config(path),
        url=live_server.url,
        token=live_server.token,
        on_step=RecordNode(str(record), delay_s=0.1),
    )
    watcher.join(timeout=150)
    if "error" in seen:
        raise seen["error"]  # type: ignore[misc]
    assert "replaced_at" in seen, "the second node was not killed and replaced"

    with HyperlawClient(live_server.url, live_server.token) as client:
        trial = client.get_trial(summary.trial_ids[0])
        points = client.get_points(trial["id"])["data"]
    assert (summary.completed, summary.failed) == (1, 0), trial
    assert trial["status"] == "completed" and trial["steps_done"] == steps

    # the first worker group: one worker on the head, one on the lost node; the second: one on
    # the head, one on its replacement, both starting after a checkpoint, not at step 1
    names = cluster.node_names()
    workers = _recorded(record)
    first = [w for w in workers if w["first_step"] == 1]
    resumed = [w for w in workers if w["first_step"] > 1]
    assert sorted(names[w["node"]] for w in first) == ["head", "second"], workers
    assert sorted(names[w["node"]] for w in resumed) == ["head", "third"], workers
    (resumed_at,) = {w["first_step"] - 1 for w in resumed}
    # from a checkpoint the lost group had written: the service's points lag the workers (sent in
    # batches), so the bound is the last step the lost node's worker began, not the service's
    (lost,) = [w for w in first if names[w["node"]] == "second"]
    assert resumed_at % every == 0 and every <= resumed_at <= lost["last_step"], (seen, workers)
    # every step's point once; the resumed process's wall clock starts again after the
    # restored step
    assert [p["step"] for p in points] == list(range(steps + 1))
    wall = {p["step"]: p["wall_time_s"] for p in points}
    assert wall[resumed_at + 1] < wall[resumed_at]
    assert points[-1]["eval_loss"] < points[0]["eval_loss"]
    replaced = seen["replaced_at"] - seen["killed_at"]  # type: ignore[operator]
    print(
        f"killed the second node at step {seen['steps_before_kill']} (service's points), "
        f"replaced it in {replaced:.1f} s; the run resumed from step {resumed_at}"
    )
