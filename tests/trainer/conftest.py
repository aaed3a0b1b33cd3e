"""Fixtures of the trainer's tests."""

import pytest
import yaml


@pytest.fixture
def sweep_yaml(tmp_path):
    """Writes the sweep file of the end-to-end sweep test (tests/trainer/test_sweep.py), with
    the given top-level fields replaced, into ``tmp_path``; returns its path."""

    def write(**over):
        doc = {
            "experiment": "trainer-test-sweep",
            "family": "synthetic-regression",
            "task": "synthetic",
            "synthetic": {"dim": 64},
            "n_tokens": [2048],
            "search": {"kind": "grid", "learning_rate": [0.03, 1000.0], "batch_size_tokens": [64]},
            "optimizer": {"grad_clip": 0.0},
            "schedule": {"ewa_decay": 0.9},
            "workers_per_trial": 2,
            "zero_stage": 2,
            "cpus_per_worker": 1,
            "max_failures": 0,
            "output_dir": str(tmp_path / "runs"),
        }
        doc.update(over)
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    return write
