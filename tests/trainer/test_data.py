"""Token corpus builder and the synthetic power-law regression task."""

import json

import numpy as np
import pytest
import torch

from trainer.data import (
    CorpusError,
    SyntheticRegression,
    SyntheticRegressionConfig,
    TokenCorpus,
    batch_generator,
    build_corpus,
)


def test_build_corpus_byte_level_split_and_batches(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello world " * 50)
    (src / "b.txt").write_bytes(bytes(range(256)))
    meta = build_corpus([str(src)], tmp_path / "corpus", val_fraction=0.1)
    n_total = 600 + 2 + 256  # two files joined by a blank line
    assert meta["n_train_tokens"] + meta["n_val_tokens"] == n_total
    assert meta["n_val_tokens"] == int(np.ceil(n_total * 0.1))
    assert json.loads((tmp_path / "corpus" / "meta.json").read_text()) == meta
    corpus = TokenCorpus(tmp_path / "corpus")
    x, y = corpus.batch("train", 4, 16, batch_generator(0, 0, 0, 0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    x2, _ = corpus.batch("train", 4, 16, batch_generator(0, 0, 0, 0))
    assert torch.equal(x, x2)  # batches are a function of (seed, step, rank, micro)
    x3, _ = corpus.batch("train", 4, 16, batch_generator(0, 0, 1, 0))
    assert not torch.equal(x, x3)
    raw = (tmp_path / "src" / "a.txt").read_bytes()
    assert (
        bytes(np.fromfile(tmp_path / "corpus" / "train.bin", dtype=np.uint16)[:12].astype(np.uint8))
        == raw[:12]
    )


def test_build_corpus_skips_hidden_and_bytecode(tmp_path):
    (tmp_path / "src" / "__pycache__").mkdir(parents=True)
    (tmp_path / "src" / ".git").mkdir()
    (tmp_path / "src" / "keep.txt").write_text("x" * 100)
    (tmp_path / "src" / "__pycache__" / "m.pyc").write_bytes(b"\0" * 100)
    (tmp_path / "src" / ".git" / "HEAD").write_text("ref")
    meta = build_corpus([str(tmp_path / "src")], tmp_path / "out")
    assert meta["sources"] == ["keep.txt"]
    assert meta["n_train_tokens"] + meta["n_val_tokens"] == 100


def test_build_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="neither a file nor a directory"):
        build_corpus([str(tmp_path / "missing")], tmp_path / "out")
    (tmp_path / "tiny.txt").write_text("ab")
    with pytest.raises(CorpusError, match="too few"):
        build_corpus([str(tmp_path / "tiny.txt")], tmp_path / "out")
    with pytest.raises(CorpusError, match="val_fraction must be in"):
        build_corpus([str(tmp_path / "tiny.txt")], tmp_path / "out", val_fraction=1.5)


def test_synthetic_task_power_laws_and_exact_risk():
    cfg = SyntheticRegressionConfig(
        dim=32, capacity_exponent=1.5, source_exponent=2.0, noise_std=0.3
    )
    task = SyntheticRegression(cfg)
    i = torch.arange(1, 33, dtype=torch.float64)
    assert torch.allclose(task.eigenvalues, i**-1.5)
    assert torch.allclose(task.eigenvalues * task.w_star**2, i**-2.0)
    assert task.risk(task.w_star) == pytest.approx(0.09)
    # the exact risk matches the Monte-Carlo mean squared error at w = 0
    x, y = task.batch(200_000, batch_generator(1, 0, 0, 0))
    empirical = float(torch.mean(y.double() ** 2))
    assert empirical == pytest.approx(task.risk(torch.zeros(32)), rel=0.02)
    with pytest.raises(ValueError, match="capacity_exponent must be > 1"):
        SyntheticRegressionConfig(capacity_exponent=1.0)
