"""Shared storage (``storage:``, ``trainer.storage``, ``trainer.checkpoints``) on a real S3
endpoint: a moto server (``python -m moto.server``, a separate process speaking the S3 protocol
over HTTP on this machine) holds a bucket with a byte corpus. A GPT sweep with
``storage: s3://...`` and ``corpus_dir: s3://...`` trains one Tune trial that packs two runs
(``runs_per_trial: 2``) in 2-worker ZeRO-2 Ray Train workers; a worker of the second run is
killed with SIGKILL after step 15, and the restarted worker group resumes that run from its
step-10 checkpoint, which Ray Train had merged from both workers' shards in the bucket (seen
there while the sweep ran), not from the first run's last one (step 20); both curves reach
the service, and the bucket keeps Tune's results but no checkpoint once the runs are done.

Without Ray: the corpus cache (one copy per node however many workers ask at once, copied
again when the corpus at the URI changes), a Ray Train checkpoint of another run is not
resumed from, and locations with a query."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyarrow.fs
import pytest
import ray
import ray.cloudpickle
import ray.train

from client import HyperlawClient
from tests.conftest import free_port
from trainer import storage
from trainer.checkpoints import RayTrainCheckpoints
from trainer.data import build_corpus
from trainer.sweep import run_sweep
from trainer.sweep_config import load_sweep_config

BUCKET = "hyperlaw-test"
RAY_INIT = {"num_cpus": 2, "include_dashboard": False}
STEPS, EVERY, KILL_AT = 30, 10, 15


@dataclass(frozen=True)
class S3:
    port: int

    @property
    def query(self) -> str:
        return f"endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def uri(self, path: str) -> str:
        return f"s3://{BUCKET}/{path}?{self.query}"

    def keys(self, prefix: str = "") -> list[str]:
        fs, root = storage.resolve(self.uri(prefix))
        selector = pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True)
        found = fs.get_file_info(selector)
        return [i.path for i in found if i.type == pyarrow.fs.FileType.File]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free port, with a bucket; its credentials in this process's
    environment (which the sweep's local Ray cluster inherits)."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1.0)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "moto's server did not answer in 60 s"
                time.sleep(0.2)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ACCESS_KEY_ID", "hyperlaw-test-key")
            env.setenv("AWS_SECRET_ACCESS_KEY", "hyperlaw-test-secret")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            env.setenv("AWS_EC2_METADATA_DISABLED", "true")
            env.delenv("AWS_PROFILE", raising=False)
            endpoint = S3(port)
            maker, _ = pyarrow.fs.FileSystem.from_uri(
                f"s3://{BUCKET}?{endpoint.query}&allow_bucket_creation=true"
            )
            maker.create_dir(BUCKET)
            yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@dataclass(frozen=True)
class KillInSecondRun:
    """``on_step`` hook: every worker process records its rank and first step in ``folder``;
    rank 1 is killed with SIGKILL after step ``step`` of the second run (once the first has
    reached its last step ``last``), once."""

    folder: str
    step: int
    last: int

    def __call__(self, step: int, rank: int) -> None:
        folder = Path(self.folder)
        record = folder / f"worker-{os.getpid()}-{rank}.json"
        if not record.exists():
            record.write_text(json.dumps({"rank": rank, "first_step": step}))
        if step == self.last and rank == 0:
            (folder / "first-run-done").touch()
        killed = folder / "killed"
        if step == self.step and rank == 1 and (folder / "first-run-done").exists():
            if not killed.exists():
                killed.touch()
                os.kill(os.getpid(), signal.SIGKILL)


class Watch(threading.Thread):
    """Lists the bucket under ``prefix`` every 0.2 s while the sweep runs: every key seen."""

    def __init__(self, s3: S3, prefix: str) -> None:
        super().__init__(daemon=True)
        self.s3, self.prefix = s3, prefix
        self.seen: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.seen.update(self.s3.keys(self.prefix))


def test_a_sweep_on_s3_resumes_a_killed_worker_group_from_the_bucket(
    s3, live_server, sweep_yaml, tmp_path, monkeypatch
):
    corpus = tmp_path / "corpus"
    words = "storage holds the checkpoints and the corpus of every node".split()
    text = "\n".join(
        " ".join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(800)
    )
    (tmp_path / "text.txt").write_text(text)
    meta = build_corpus([str(tmp_path / "text.txt")], corpus)
    fs, _ = storage.resolve(s3.uri("corpus"))
    pyarrow.fs.copy_files(str(corpus), f"{BUCKET}/corpus", destination_filesystem=fs)
    cache = tmp_path / "cache"
    monkeypatch.setenv(storage.CACHE_ENV, str(cache))  # the workers inherit it

    experiment = "trainer-test-s3-storage"
    path = sweep_yaml(
        experiment=experiment,
        family="byte-gpt-s3-test",
        task="gpt",
        synthetic={},
        corpus_dir=s3.uri("corpus"),
        storage=s3.uri("sweeps"),
        seq_len=16,
        model={"n_layer": 1, "n_head": 2, "d_model": 32},
        n_tokens=[64 * STEPS],
        search={"learning_rate": [0.01, 0.02], "batch_size_tokens": [64]},
        optimizer={"name": "adamw"},
        eval={"batches": 2},
        workers_per_trial=2,
        zero_stage=2,
        checkpoint_every=EVERY,
        max_failures=1,
        runs_per_trial=2,
    )
    records = tmp_path / "workers"
    records.mkdir()
    hook = KillInSecondRun(str(records), step=KILL_AT, last=STEPS)
    this_module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(this_module)  # the hook, without tests/
    watch = Watch(s3, "sweeps")
    watch.start()
    try:
        summary = run_sweep(
            load_sweep_config(path),
            url=live_server.url,
            token=live_server.token,
            ray_init=RAY_INIT,
            on_step=hook,
        )
    finally:
        watch.stop.set()
        watch.join(timeout=10)
        ray.cloudpickle.unregister_pickle_by_value(this_module)
    assert (records / "killed").exists()  # the failure happened, in the second run
    assert (summary.completed, summary.failed) == (2, 0)

    first, second = summary.trial_ids
    with HyperlawClient(live_server.url, live_server.token) as client:
        trials = [client.get_trial(i) for i in (first, second)]
        curves = [client.get_points(i)["data"] for i in (first, second)]
    for trial, points in zip(trials, curves, strict=True):
        assert trial["status"] == "completed" and trial["steps_done"] == STEPS, trial
        assert [p["step"] for p in points] == list(range(STEPS + 1))
        assert points[-1]["eval_loss"] < points[0]["eval_loss"]
        # the driver read the corpus's meta.json from the bucket
        assert trial["config"]["data"] == {
            "corpus": "corpus",
            "fingerprint": meta["fingerprint"],
            "tokenizer": "byte",
        }
    # the restarted worker group skipped the first run (completed) and resumed the second from
    # its own step-10 checkpoint, not from the first run's last one (step 20)
    workers = [json.loads(p.read_text()) for p in records.glob("worker-*.json")]
    resumed = sorted(w["first_step"] for w in workers if w["first_step"] > 1)
    assert resumed == [11, 11], workers

    # the checkpoint was in the bucket: one folder merged from both workers' files
    train_run = f"{BUCKET}/sweeps/{experiment}/ray_train/trial-{first}-{second}"
    step10 = f"{train_run}/trial-{second}-step{10:08d}"
    merged = {k.removeprefix(step10 + "/") for k in watch.seen if k.startswith(step10 + "/")}
    assert {
        "latest",
        "step10/mp_rank_00_model_states.pt",
        "step10/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "step10/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    } <= merged, sorted(watch.seen)
    # ... and is gone with its Ray Train run; Tune's results stay
    left = s3.keys("sweeps")
    assert not [k for k in left if k.startswith(train_run)], left
    assert any(k.startswith(f"{BUCKET}/sweeps/{experiment}/ray_tune/") for k in left), left
    # the credentials reach no file that the sweep wrote: Tune's state in the bucket (its
    # pickled filesystem among them), the local disk
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    fs, _ = storage.resolve(s3.uri(""))
    for key in left:
        with fs.open_input_stream(key) as stream:
            assert secret not in stream.read(), key
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and secret in p.read_bytes()]
    # no checkpoint on the local disk; the corpus copied once into this node's cache
    assert not (tmp_path / "runs" / "checkpoints").exists()
    (copy,) = [p for p in (cache / "corpora").iterdir() if p.is_dir()]
    assert json.loads((copy / "meta.json").read_text()) == meta


# ----------------------------------------------------------------------------- without Ray


def test_the_corpus_cache_copies_once_per_node_and_again_when_the_corpus_changes(
    tmp_path, monkeypatch
):
    """Eight workers of one node asking at once: one copy, all read it whole. A corpus rebuilt
    at the same URI (another fingerprint) is copied again."""
    source = tmp_path / "remote" / "corpus"
    (tmp_path / "a.txt").write_text("the first corpus " * 200)
    first = build_corpus([str(tmp_path / "a.txt")], source)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    copies = []
    real_copy = pyarrow.fs.copy_files

    def counted(*args, **kwargs):
        copies.append(args[0])
        time.sleep(0.2)  # a slow store: the others arrive while it copies
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(pyarrow.fs, "copy_files", counted)
    uri = source.as_uri()  # file://: a URI, so it goes through the cache
    got: list[Path] = []
    workers = [
        threading.Thread(target=lambda: got.append(storage.local_corpus(uri))) for _ in range(8)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(copies) == 1 and len(set(got)) == 1 and len(got) == 8
    (local,) = set(got)
    assert local.parent == tmp_path / "cache" / "corpora" and local != source
    assert json.loads((local / "meta.json").read_text()) == first
    assert (local / "train.bin").read_bytes() == (source / "train.bin").read_bytes()

    (tmp_path / "b.txt").write_text("a corpus built again " * 300)
    second = build_corpus([str(tmp_path / "b.txt")], source)
    assert storage.local_corpus(uri) == local and len(copies) == 2
    assert json.loads((local / "meta.json").read_text()) == second
    assert not [p for p in local.parent.iterdir() if p.name.startswith(".")]  # no leftovers
    assert storage.local_corpus(str(source)) == source  # a path is read where it is


def test_a_run_resumes_only_from_a_ray_checkpoint_of_its_own(monkeypatch):
    """Several runs packed in one Ray Train run: the latest checkpoint may be the run before's."""

    @dataclass
    class Reported:
        path: str

    monkeypatch.setattr(
        ray.train, "get_checkpoint", lambda: Reported("b/sweeps/x/ray_train/t/trial-7-step00000030")
    )
    assert RayTrainCheckpoints(8).load(engine=None) is None  # never touches the engine
    assert RayTrainCheckpoints(70).load(engine=None) is None  # trial-7 is not trial-70's prefix
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    assert RayTrainCheckpoints(7).load(engine=None) is None


def test_locations_keep_their_query():
    uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.child(uri, "exp", "ray_train") == (
        "s3://bucket/runs/exp/ray_train?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert storage.basename(storage.child(uri, "corpus")) == "corpus"
    fs, path = storage.resolve(storage.child(uri, "exp"))
    assert isinstance(fs, pyarrow.fs.S3FileSystem) and path == "bucket/runs/exp"
    assert storage.resolve("relative/runs") == (None, str(Path("relative/runs").resolve()))
    assert storage.child("/shared/runs", "exp") == "/shared/runs/exp"
