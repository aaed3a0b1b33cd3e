"""Planning a sweep: N from the shape, and adaptive points around the recommendation."""

import pytest

from trainer.plan import expand_trials, idempotency_key
from trainer.sweep_config import SweepConfigError, parse_sweep_config


def test_gpt_sweep_counts_n_from_the_shape(tmp_path):
    corpus = tmp_path / "corpus"
    config = parse_sweep_config(
        {
            "experiment": "gpt",
            "task": "gpt",
            "seq_len": 32,
            "corpus_dir": str(corpus),
            "models": [{"n_layer": 2, "n_head": 2, "d_model": 32}],
            "n_tokens": [65536],
            "search": {"learning_rate": [1e-3], "batch_size_tokens": [1024]},
        }
    )
    spec = expand_trials(config)[0]
    assert idempotency_key(config, spec).startswith(f"N{2 * (12 * 32 * 32 + 64) + 32}-")


class _FixedRecommendation:
    """Stands in for the service's recommendation (the placement arithmetic is under test)."""

    def __init__(self):
        self.asked = []

    def recommend(self, **params):
        self.asked.append(params)
        return {"learning_rate": 0.01, "batch_size_tokens": 128}


def test_adaptive_search_concentrates_around_the_predicted_optimum():
    config = parse_sweep_config(
        {
            "experiment": "adaptive",
            "family": "synthetic-regression",
            "task": "synthetic",
            "synthetic": {"dim": 64},
            "n_tokens": [4096, 8192],
            "workers_per_trial": 2,
            "search": {
                "kind": "adaptive",
                "points_per_axis": 3,
                "lr_spread_decades": 0.5,
                "batch_spread_octaves": 1.0,
            },
        }
    )
    service = _FixedRecommendation()
    specs = expand_trials(config, service)
    asked = {"n_params": 64, "seq_len": 1, "family": "synthetic-regression"}  # its own family
    assert service.asked == [{**asked, "n_tokens": 4096}, {**asked, "n_tokens": 8192}]
    assert len(specs) == 2 * 3 * 3
    lrs = sorted({s["learning_rate"] for s in specs})
    assert lrs == pytest.approx([0.01 / 10**0.5, 0.01, 0.01 * 10**0.5])
    assert sorted({s["batch_size_tokens"] for s in specs}) == [64, 128, 256]
    with pytest.raises(SweepConfigError, match="needs the service"):
        expand_trials(config)
