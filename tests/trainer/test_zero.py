"""The ZeRO settings the trainer builds in code train the same model as ZeRO-0: stages 1, 2
and 3 against stage 0, on one process and on two (gloo), with clipping active and µP
parameter groups whose learning rates differ; and parameter groups are merged only where
their hyperparameters are equal."""

import multiprocessing
import os
import queue
import random
import socket
import time

import pytest

from trainer.config import TrainConfig, batch_layout
from trainer.data import build_corpus
from trainer.engine import deepspeed_config, merge_equal_groups
from trainer.model import GPT, GPTConfig
from trainer.train import train

SHAPE = {"n_layer": 1, "n_head": 2, "d_model": 32, "mup": True, "mup_base_d_model": 16}


class Collect:
    """Telemetry sink that keeps the points in memory."""

    def __init__(self):
        self.points = []

    def start(self):
        pass

    def add_point(self, point):
        self.points.append(dict(point))

    def heartbeat(self):
        pass

    def flush(self, timeout_s=60.0):
        return True

    def finish(self, status, **final):
        pass

    def close(self, timeout_s=60.0):
        return True


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_corpus")
    rng = random.Random(1)
    words = "zero stage two partitions gradients over workers and gathers the weights".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(2000))
    (root / "text.txt").write_text(text)
    build_corpus([str(root / "text.txt")], root / "corpus")
    return root / "corpus"


def _config(corpus_dir, stage, schedule):
    return {
        "task": "gpt",
        "corpus_dir": str(corpus_dir),
        "seq_len": 16,
        "model": SHAPE,
        "batch_size_tokens": 16 * 8,
        "n_tokens": 16 * 8 * 24,
        "learning_rate": 2e-2,
        # a small clip threshold, so that every step is clipped by the global norm
        "optimizer": {"grad_clip": 0.05, "weight_decay": 0.1},
        "schedule": {"name": schedule, "warmup_fraction": 0.1},
        "eval": {"batches": 2, "log_every": 1},
        "zero_stage": stage,
    }


def _curve(points):
    return {p["step"]: p for p in points if p.get("train_loss") is not None}


def _assert_same_training(reference, other, label):
    ref, got = _curve(reference), _curve(other)
    assert sorted(got) == sorted(ref) == list(range(1, 25)), label
    for step in ref:
        assert got[step]["train_loss"] == pytest.approx(ref[step]["train_loss"], rel=2e-4), (
            f"{label}: train loss at step {step}"
        )
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=2e-3), (
            f"{label}: grad norm at step {step}"
        )
    assert ref[24]["grad_norm"] > 2 * 0.05  # clipping was active to the end


def _worker(rank, world_size, port, raw, results):
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
        }
    )
    sink = Collect()
    result = train(raw, telemetry=sink)
    results.put((rank, sink.points, result.final_eval_loss))
    # Leave without running C++ static destructors: at interpreter exit a gloo or DeepSpeed
    # thread still alive in them can abort the process ("terminate called without an active
    # exception", exit -6) after its result was delivered.
    results.close()
    results.join_thread()
    os._exit(0)


def _train_two_processes(raw):
    """Rank 0's points and final evaluation loss of a 2-process gloo run of ``train``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, 2, port, raw, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    got = {}
    deadline = time.monotonic() + 300
    try:
        while len(got) < len(procs):
            try:
                rank, points, final_eval = results.get(timeout=1.0)
            except queue.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not failed, f"a training process exited with {failed} (traceback above)"
                assert time.monotonic() < deadline, "the 2-process run did not finish in 300 s"
                continue
            got[rank] = (points, final_eval)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return got[0]


def test_merge_equal_groups_keeps_distinct_hyperparameters_apart():
    model = GPT(GPTConfig(vocab_size=64, seq_len=16, **SHAPE))  # width multiplier 2
    groups = model.optimizer_groups(learning_rate=0.01, weight_decay=0.1)
    merged = merge_equal_groups(groups)
    assert len(groups) == 3 and len(merged) == 2
    assert [(g["lr"], g["weight_decay"]) for g in merged] == [(0.005, 0.1), (0.01, 0.0)]
    assert [id(p) for p in merged[0]["params"]] == [id(p) for p in groups[0]["params"]]
    assert [id(p) for p in merged[1]["params"]] == [
        id(p) for p in groups[1]["params"] + groups[2]["params"]
    ]
    # the caller's groups are left as they were
    assert [len(g["params"]) for g in groups] == [
        len(g["params"]) for g in model.optimizer_groups(0.01, 0.1)
    ]
    # at the base width and without weight decay all three groups are one
    plain = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=32))
    one = merge_equal_groups(plain.optimizer_groups(learning_rate=0.01, weight_decay=0.0))
    assert len(one) == 1 and len(one[0]["params"]) == len(list(plain.parameters()))


@pytest.mark.parametrize(
    "accelerator,stage,contiguous",
    [
        ("cpu", 0, None),
        ("cpu", 1, False),
        ("cpu", 2, False),
        ("cpu", 3, None),
        ("cuda", 0, None),
        ("cuda", 2, None),
    ],
)
def test_zero_settings_per_stage_and_accelerator(corpus_dir, accelerator, stage, contiguous):
    """contiguous_gradients off only for ZeRO 1-2 on the CPU; DeepSpeed clips under ZeRO 1-3,
    the trainer under ZeRO-0."""
    config = TrainConfig.from_dict(_config(corpus_dir, stage, "wsd"))
    built = deepspeed_config(config, batch_layout(128, 16, 1), accelerator)
    assert built["zero_optimization"]["stage"] == stage
    assert built["zero_optimization"].get("contiguous_gradients") is contiguous
    assert built["gradient_clipping"] == (0.05 if stage > 0 else 0.0)


def test_zero_stages_train_like_zero0_on_one_process(corpus_dir):
    runs = {}
    for stage, schedule in (
        (0, "constant_ewa"),
        (1, "constant_ewa"),
        (2, "constant_ewa"),
        (0, "wsd"),
        (3, "wsd"),
    ):
        sink = Collect()
        result = train(_config(corpus_dir, stage, schedule), telemetry=sink)
        runs[stage, schedule] = (sink.points, result.final_eval_loss)
    for stage, schedule in ((1, "constant_ewa"), (2, "constant_ewa"), (3, "wsd")):
        points, final_eval = runs[stage, schedule]
        ref_points, ref_eval = runs[0, schedule]
        _assert_same_training(ref_points, points, f"ZeRO-{stage} on 1 process")
        assert final_eval == pytest.approx(ref_eval, rel=2e-4)


def test_zero_stages_train_like_zero0_on_two_processes(corpus_dir):
    ref_points, ref_eval = _train_two_processes(_config(corpus_dir, 0, "constant_ewa"))
    for stage in (1, 2):
        points, final_eval = _train_two_processes(_config(corpus_dir, stage, "constant_ewa"))
        _assert_same_training(ref_points, points, f"ZeRO-{stage} on 2 processes")
        assert final_eval == pytest.approx(ref_eval, rel=2e-4)
    ref_points, ref_eval = _train_two_processes(_config(corpus_dir, 0, "wsd"))
    points, final_eval = _train_two_processes(_config(corpus_dir, 3, "wsd"))
    _assert_same_training(ref_points, points, "ZeRO-3 on 2 processes")
    assert final_eval == pytest.approx(ref_eval, rel=2e-4)
