"""The GPT path: corpus built through the CLI, a DeepSpeed run with gradient accumulation."""

import argparse
import random

import pytest

from trainer import cli
from trainer.model import gpt_non_embedding_params
from trainer.train import train


@pytest.fixture
def corpus_dir(tmp_path):
    rng = random.Random(0)
    words = "the cat sat on a mat and saw one dog run to its home by the sea".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(3000))
    (tmp_path / "text.txt").write_text(text)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["corpus", "build", str(tmp_path / "text.txt"), "--out", str(tmp_path / "corpus")]
    )
    assert args.func(args) == 0
    return tmp_path / "corpus"


@pytest.mark.parametrize("mup", [False, True])
def test_gpt_learns_with_accumulation(corpus_dir, mup):
    shape = {"n_layer": 1, "n_head": 2, "d_model": 32, "mup": mup, "mup_base_d_model": 16}
    result = train(
        {
            "task": "gpt",
            "corpus_dir": str(corpus_dir),
            "seq_len": 32,
            "model": shape,
            "batch_size_tokens": 32 * 8,
            "micro_batch_size_sequences": 4,  # accumulation 2
            "n_tokens": 32 * 8 * 60,
            "learning_rate": 1e-2,
            "schedule": {"name": "cosine", "warmup_fraction": 0.1},
            "eval": {"batches": 2},
        }
    )
    assert result.n_params == gpt_non_embedding_params(1, 32)
    assert result.steps_done == 60 and result.tokens_done == 60 * 256
    assert not result.diverged
    # a byte-level model of this tiny language drops far below ln(256) = 5.55 nats
    assert result.final_eval_loss < 3.0


def test_corpus_cli_reports_bad_sources(tmp_path):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["corpus", "build", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]
    )
    assert args.func(args) == 2
