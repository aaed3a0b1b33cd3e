"""Importers: the bundled Step Law sweep and the generic runs CSV."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from fitting.data import (
    Runs,
    RunsCsvError,
    bundled_steplaw_path,
    load_runs_csv,
    load_steplaw_csv,
)

HEADER = "n_params,n_tokens,seq_len,learning_rate,batch_size_tokens,final_loss"


def write(tmp_path, text, name="runs.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_bundled_steplaw_is_the_published_file_and_loads():
    path = bundled_steplaw_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == "9e46181076c04d450294d75dfe6f72adc416e231e154a07b337e378f9410002c"
    assert (path.parent / "CITATION.md").read_text().count("2503.04715") >= 1
    runs = load_steplaw_csv(path)
    assert len(runs) == 1911
    assert len(runs.groups()) == 17
    # bs is in sequences of 2048 tokens; bs · ti · 2048 ≈ D.
    assert set(np.unique(runs.seq_len)) == {2048}
    assert runs.batch_size_tokens.min() == 16 * 2048
    assert runs.batch_size_tokens.max() == 2048 * 2048
    assert np.all(runs.batch_size_sequences == runs.batch_size_tokens / 2048)
    assert runs.n_params.min() == 214663680 and runs.n_tokens.max() == 1e11


def test_steplaw_bad_rows_are_all_reported_with_line_numbers(tmp_path):
    lines = bundled_steplaw_path().read_text().splitlines()
    header, good = lines[0], lines[1]
    bad_lr = good.split(",")
    bad_lr[4] = "-0.001"
    bad_loss = good.split(",")
    bad_loss[8] = "abc"
    text = "\n".join([header, good, ",".join(bad_lr), good, ",".join(bad_loss)]) + "\n"
    with pytest.raises(RunsCsvError) as info:
        load_steplaw_csv(write(tmp_path, text))
    assert info.value.errors == [
        (3, "lr must be > 0, got -0.001"),
        (5, "smooth loss is not a number: 'abc'"),
    ]
    assert "line 3: lr must be > 0" in str(info.value)


def test_generic_csv_round_trip_with_diverged_and_optional_columns(tmp_path):
    text = (HEADER + ",steps_to_target,target_loss,trial_id,notes\n"
            "1e8,2e9,2048,0.001,524288,3.1,1200,3.2,7,first\n"
            "1e8,2e9,2048,0.02,524288,nan,inf,3.2,8,diverged\n"
            "\n"
            "2e8,4e9,1024,0.002,1048576,2.9,,,9,\n")
    runs = load_runs_csv(write(tmp_path, text))
    assert len(runs) == 3
    assert list(runs.trial_id) == [7, 8, 9]
    assert list(runs.seq_len) == [2048, 2048, 1024]
    assert runs.diverged.tolist() == [False, True, False]
    assert runs.steps_to_target[0] == 1200 and math.isinf(runs.steps_to_target[1])
    assert math.isnan(runs.steps_to_target[2]) and math.isnan(runs.target_loss[2])
    assert runs.batch_size_sequences[2] == 1024


def test_generic_csv_lists_every_bad_row_and_loads_nothing(tmp_path):
    text = (HEADER + "\n"
            "1e8,2e9,2048,0.001,524288,3.1\n"          # line 2 fine
            "0,2e9,2048,0.001,524288,3.1\n"            # line 3
            "1e8,2e9,20.5,0.001,524288,3.1\n"          # line 4
            "1e8,2e9,2048,x,524288,\n"                 # line 5: two problems
            "1e8,2e9,2048,0.001\n"                     # line 6: short row
            "1e8,2e9,2048,0.001,524288,3.1,extra\n")   # line 7: long row
    with pytest.raises(RunsCsvError) as info:
        load_runs_csv(write(tmp_path, text))
    errors = dict(info.value.errors)
    assert sorted(errors) == [3, 4, 5, 6, 7]
    assert errors[3] == "n_params must be > 0, got 0"
    assert errors[4] == "seq_len must be an integer, got 20.5"
    assert "learning_rate is not a number: 'x'" in errors[5]
    assert "final_loss (write nan for a diverged run) is empty" in errors[5]
    assert "fields, header has 6" in errors[6] and "fields, header has 6" in errors[7]


def test_generic_csv_missing_column_and_empty_file(tmp_path):
    with pytest.raises(RunsCsvError) as info:
        load_runs_csv(write(tmp_path, "n_params,n_tokens,seq_len\n1,2,3\n"))
    assert info.value.errors[0][0] == 1
    assert "learning_rate" in info.value.errors[0][1] and "final_loss" in info.value.errors[0][1]
    with pytest.raises(RunsCsvError, match="no runs"):
        load_runs_csv(write(tmp_path, HEADER + "\n", name="empty.csv"))


def test_partial_trial_ids_are_rejected(tmp_path):
    text = (HEADER + ",trial_id\n"
            "1e8,2e9,2048,0.001,524288,3.1,1\n"
            "1e8,2e9,2048,0.002,524288,3.0,\n")
    with pytest.raises(RunsCsvError) as info:
        load_runs_csv(write(tmp_path, text))
    assert info.value.errors == [(3, "trial_id is empty (give it for every row or none)")]


def test_runs_validation_and_records():
    runs = Runs.from_records([
        {"n_params": 1e8, "n_tokens": 2e9, "seq_len": 2048, "learning_rate": 1e-3,
         "batch_size_tokens": 2 ** 19, "loss": 3.0},
        {"n_params": 1e8, "n_tokens": 2e9, "seq_len": 2048, "learning_rate": 2e-3,
         "batch_size_tokens": 2 ** 19, "final_loss": float("inf")},
    ])
    assert len(runs) == 2 and runs.trial_id is None
    assert runs.diverged.tolist() == [False, True]
    with pytest.raises(ValueError, match="record 0: seq_len is required"):
        Runs.from_records([{"n_params": 1, "n_tokens": 1, "learning_rate": 1,
                            "batch_size_tokens": 1}])
    with pytest.raises(ValueError, match="batch_size_tokens must be finite and > 0"):
        Runs(n_params=[1.0], n_tokens=[1.0], seq_len=[1], learning_rate=[1.0],
             batch_size_tokens=[-1.0], loss=[1.0])
    with pytest.raises(ValueError, match="loss has 2 entries, expected 1"):
        Runs(n_params=[1.0], n_tokens=[1.0], seq_len=[1], learning_rate=[1.0],
             batch_size_tokens=[1.0], loss=[1.0, 2.0])
    sub = runs.subset(np.array([False, True]))
    assert len(sub) == 1 and sub.learning_rate[0] == 2e-3
