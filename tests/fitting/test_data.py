"""Importers: the bundled Step Law sweep, the generic runs CSV and the steps CSV; groups."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from fitting.data import (
    Runs,
    RunsCsvError,
    StepsCsvError,
    bundled_steplaw_path,
    load_runs_csv,
    load_steplaw_csv,
    read_steps_csv,
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
    groups = runs.groups()
    assert len(groups) == 17
    # Sorted by N then D; each group names its (N, D) and the positions of its runs.
    assert [(g.n_params, g.n_tokens) for g in groups] == sorted(
        {(float(n), float(d)) for n, d in zip(runs.n_params, runs.n_tokens, strict=True)}
    )
    assert sum(g.index.size for g in groups) == len(runs)
    first = groups[0]
    assert np.all(runs.n_params[first.index] == first.n_params)
    assert np.all(runs.n_tokens[first.index] == first.n_tokens)
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
    text = (
        HEADER + ",steps_to_target,target_loss,trial_id,notes\n"
        "1e8,2e9,2048,0.001,524288,3.1,1200,3.2,7,first\n"
        "1e8,2e9,2048,0.02,524288,nan,inf,3.2,8,diverged\n"
        "\n"
        "2e8,4e9,1024,0.002,1048576,2.9,,,9,\n"
    )
    runs = load_runs_csv(write(tmp_path, text))
    assert len(runs) == 3
    assert list(runs.trial_id) == [7, 8, 9]
    assert list(runs.seq_len) == [2048, 2048, 1024]
    assert runs.diverged.tolist() == [False, True, False]
    assert runs.steps_to_target[0] == 1200 and math.isinf(runs.steps_to_target[1])
    assert math.isnan(runs.steps_to_target[2]) and math.isnan(runs.target_loss[2])
    assert runs.batch_size_sequences[2] == 1024


def test_generic_csv_lists_every_bad_row_and_loads_nothing(tmp_path):
    text = (
        HEADER + "\n"
        "1e8,2e9,2048,0.001,524288,3.1\n"  # line 2 fine
        "0,2e9,2048,0.001,524288,3.1\n"  # line 3
        "1e8,2e9,20.5,0.001,524288,3.1\n"  # line 4
        "1e8,2e9,2048,x,524288,\n"  # line 5: two problems
        "1e8,2e9,2048,0.001\n"  # line 6: short row
        "1e8,2e9,2048,0.001,524288,3.1,extra\n"
    )  # line 7: long row
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
    text = HEADER + ",trial_id\n1e8,2e9,2048,0.001,524288,3.1,1\n1e8,2e9,2048,0.002,524288,3.0,\n"
    with pytest.raises(RunsCsvError) as info:
        load_runs_csv(write(tmp_path, text))
    assert info.value.errors == [(3, "trial_id is empty (give it for every row or none)")]


def test_runs_validation_and_records():
    runs = Runs.from_records(
        [
            {
                "n_params": 1e8,
                "n_tokens": 2e9,
                "seq_len": 2048,
                "learning_rate": 1e-3,
                "batch_size_tokens": 2**19,
                "loss": 3.0,
            },
            {
                "n_params": 1e8,
                "n_tokens": 2e9,
                "seq_len": 2048,
                "learning_rate": 2e-3,
                "batch_size_tokens": 2**19,
                "final_loss": float("inf"),
            },
        ]
    )
    assert len(runs) == 2 and runs.trial_id is None
    assert runs.diverged.tolist() == [False, True]
    with pytest.raises(ValueError, match="record 0: seq_len is required"):
        Runs.from_records(
            [{"n_params": 1, "n_tokens": 1, "learning_rate": 1, "batch_size_tokens": 1}]
        )
    with pytest.raises(ValueError, match="batch_size_tokens must be finite and > 0"):
        Runs(
            n_params=[1.0],
            n_tokens=[1.0],
            seq_len=[1],
            learning_rate=[1.0],
            batch_size_tokens=[-1.0],
            loss=[1.0],
        )
    with pytest.raises(ValueError, match="loss has 2 entries, expected 1"):
        Runs(
            n_params=[1.0],
            n_tokens=[1.0],
            seq_len=[1],
            learning_rate=[1.0],
            batch_size_tokens=[1.0],
            loss=[1.0, 2.0],
        )
    sub = runs.subset(np.array([False, True]))
    assert len(sub) == 1 and sub.learning_rate[0] == 2e-3


def test_steps_csv_keeps_censored_runs_and_reports_every_bad_row(tmp_path):
    path = write(
        tmp_path,
        "n_params,batch_size,steps,note\n1e8,256,1000,x\n1e8,512,,\n2e8,256,inf,\n2e8,512,nan,\n",
        "steps.csv",
    )
    n_params, batch, steps = read_steps_csv(path)
    assert n_params.tolist() == [1e8, 1e8, 2e8, 2e8]
    assert batch.tolist() == [256, 512, 256, 512]
    assert steps[0] == 1000 and np.all(np.isinf(steps[1:]))
    bad = write(
        tmp_path, "n_params,batch_size,steps\n0,256,10\n1e8,abc,10\n1e8,256,-1\n", "bad.csv"
    )
    with pytest.raises(StepsCsvError) as info:
        read_steps_csv(bad)
    assert [line for line, _ in info.value.errors] == [2, 3, 4]
    assert "line 4: steps must be > 0" in str(info.value)
    with pytest.raises(StepsCsvError, match="missing column\\(s\\): steps"):
        read_steps_csv(write(tmp_path, "n_params,batch_size\n1,2\n", "missing.csv"))
    with pytest.raises(StepsCsvError, match="no data rows"):
        read_steps_csv(write(tmp_path, "n_params,batch_size,steps\n", "empty.csv"))


GOOD_ROW = "1e8,2e9,2048,0.001,524288,3.1"


@pytest.mark.parametrize(
    ("body", "line", "problem"),
    [
        (b"\xff\xfe garbage\n", 3, "not UTF-8 text"),  # a binary file
        (b"1e8,2e9,2048,0.001,524288,3.1\x00\n", 3, "holds a NUL byte"),
        (b"1e8,2e9,2048,0.001,524288,1e400\n", 3, "final_loss (write nan for a diverged run) "),
        (b"1e8,2e9,2048,1e-400,524288,3.1\n", 3, "learning_rate is below a float's range"),
        (b"1e8,2e9,2048,0.001,524288,3.1e-400\n", 3, "below a float's range"),
        (b'1e8,2e9,2048,0.001,524288,"' + b"9" * 200_000 + b'"\n', 3, "not a CSV row"),
    ],
)
def test_hostile_files_are_refused_whole_with_the_line(tmp_path, body, line, problem):
    """Bytes that are not UTF-8, a NUL byte, a number beyond or below a float's range (which
    would have become inf or 0) and a line the csv module cannot read are errors of their
    line, in the one RunsCsvError, never a traceback or a changed value."""
    path = tmp_path / "hostile.csv"
    path.write_bytes((HEADER + "\n" + GOOD_ROW + "\n").encode() + body)
    with pytest.raises(RunsCsvError) as info:
        load_runs_csv(path)
    [(at, reason)] = info.value.errors
    assert at == line and problem in reason, info.value.errors
    if "1e400" in body.decode(errors="replace"):
        assert "beyond a float's range: '1e400'" in reason
    steps = tmp_path / "steps.csv"  # the steps CSV of `hyperlaw cbs` reads through the same
    steps.write_bytes(b"n_params,batch_size,steps\n1e8,64,100\n" + b"\xff\n")
    with pytest.raises(StepsCsvError, match="line 3: not UTF-8"):
        read_steps_csv(steps)


def test_written_infinities_and_zero_still_parse(tmp_path):
    """The range checks leave what is written on purpose alone: nan/inf/-Infinity losses of
    diverged runs, and a loss written as 0."""
    rows = [f"1e8,2e9,2048,0.001,524288,{loss}" for loss in ("nan", "inf", "-Infinity", "0.0")]
    runs = load_runs_csv(write(tmp_path, "\n".join([HEADER, *rows]) + "\n"))
    assert np.isnan(runs.loss[0]) and runs.loss[1] == math.inf and runs.loss[2] == -math.inf
    assert runs.loss[3] == 0.0
