"""An experiment's export round-trips, on PostgreSQL and SQLite: the CSV read back with the
csv module and the Parquet with pyarrow give the points posted (NaN and ±inf, extras as JSON
text) with their trials' columns, a trial without points once; chunked reads give the same
rows; ``hyperlaw export`` writes the same files from the database and from the service."""

from __future__ import annotations

import csv
import io
import json
import math

import pyarrow.parquet as pq
import pytest

from client.wire import dumps
from server import export
from server.models import POINT_VALUE_COLUMNS
from tests.databases import run_hyperlaw

CURVE = [
    {"step": 0, "tokens": 0, "train_loss": 11.0, "lr": 0.0, "mfu": 0.25},
    {"step": 10, "tokens": 5120, "train_loss": 4.5, "eval_loss": 4.75, "grad_norm": 1.5},
    {"step": 20, "tokens": 10240, "train_loss": math.nan, "eval_loss": math.inf, "loss/aux": -0.5},
    {"step": 30, "tokens": 15360, "train_loss": -math.inf, "wall_time_s": 12.25},
]
KNOWN = ("step", *POINT_VALUE_COLUMNS)


@pytest.fixture
def exported(api) -> tuple[dict, list[dict]]:
    """An experiment with a trial with CURVE, a trial without points and a short curve."""
    experiment = api.experiment()
    curved = api.trial(experiment["id"], status="running")
    api.client.post_points(curved["id"], CURVE)
    bare = api.trial(experiment["id"], status="completed", final_loss=math.nan, diverged=True)
    short = api.trial(experiment["id"], status="running")
    api.client.post_points(short["id"], [{"step": 5, "train_loss": 7.0}])
    return experiment, [curved, bare, short]


def _expected(trials: list[dict]) -> list[tuple[int, dict | None]]:
    """(trial id, point or None) in the export's order."""
    curved, bare, short = trials
    return (
        [(curved["id"], p) for p in CURVE]
        + [(bare["id"], None)]
        + [(short["id"], {"step": 5, "train_loss": 7.0})]
    )


def _same(got, want) -> bool:
    if isinstance(want, float) and math.isnan(want):
        return isinstance(got, float) and math.isnan(got)
    return got == want


def _check(rows: list[dict], trials: list[dict], parse) -> None:
    """``rows`` (column -> value as read, ``parse``d into Python values) against the posted
    trials and points."""
    by_id = {t["id"]: t for t in trials}
    assert [(r["trial_id"], r["step"]) for r in map(parse, rows)] == [
        (tid, None if p is None else p["step"]) for tid, p in _expected(trials)
    ]
    for row, (tid, point) in zip(map(parse, rows), _expected(trials), strict=True):
        trial = by_id[tid]
        for column in ("n_params", "learning_rate", "status", "final_loss", "diverged", "excluded"):
            assert _same(row[column], trial[column]), (column, row[column], trial[column])
        point = point or {}
        for column in KNOWN:
            assert _same(row[column], point.get(column)), (column, row[column], point)
        extras = {k: v for k, v in point.items() if k not in KNOWN}
        assert row["extras"] == (dumps(extras) if extras else None)


def _csv_value(column: str, text: str):
    if text == "":
        return None
    kind = dict(export.COLUMNS)[column]
    if kind == "int":
        return int(text)
    if kind == "float":
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(text) or float(
            text
        )
    if kind == "bool":
        return {"true": True, "false": False}[text]
    return text


def _parse_csv(row: dict) -> dict:
    return {column: _csv_value(column, text) for column, text in row.items()}


def test_csv_and_parquet_round_trip(api, exported):
    experiment, trials = exported
    path = f"/v1/experiments/{experiment['id']}/export"
    response = api.http.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    disposition = f'attachment; filename="experiment-{experiment["id"]}.csv"'
    assert response.headers["content-disposition"] == disposition
    reader = csv.DictReader(io.StringIO(response.text))
    assert tuple(reader.fieldnames or ()) == export.COLUMN_NAMES
    _check(list(reader), trials, _parse_csv)
    assert ",NaN," in response.text and ",Infinity," in response.text

    response = api.http.get(path, params={"format": "parquet"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/vnd.apache.parquet"
    table = pq.read_table(io.BytesIO(response.content))
    assert table.schema.names == list(export.COLUMN_NAMES)
    assert str(table.schema.field("train_loss").type) == "double"
    _check(table.to_pylist(), trials, lambda row: row)
    assert json.loads(table.column("extras")[0].as_py()) == {"mfu": 0.25}


def test_chunks_give_the_same_rows(api, exported):
    experiment, _trials = exported
    whole = [r for rows in export.export_rows(api.database, experiment["id"]) for r in rows]
    for chunk in (1, 2, 3, 4):
        chunks = list(export.export_rows(api.database, experiment["id"], chunk=chunk))
        assert repr([r for rows in chunks for r in rows]) == repr(whole)
        assert all(len(rows) <= chunk + 1 for rows in chunks)  # a chunk and a pointless trial
    assert len(whole) == len(CURVE) + 2


def test_export_errors(api, exported):
    experiment, _trials = exported
    bad = api.http.get(f"/v1/experiments/{experiment['id']}/export", params={"format": "xlsx"})
    assert bad.status_code == 422
    assert [(e["field"], e["rule"]) for e in bad.json()["detail"]] == [("format", "literal_error")]
    missing = api.http.get("/v1/experiments/987654321/export")
    assert missing.status_code == 404 and "987654321" in missing.json()["detail"]
    empty = api.experiment()
    response = api.http.get(f"/v1/experiments/{empty['id']}/export")
    assert response.text.strip() == ",".join(export.COLUMN_NAMES)
    response = api.http.get(f"/v1/experiments/{empty['id']}/export", params={"format": "parquet"})
    assert pq.read_table(io.BytesIO(response.content)).num_rows == 0


def test_the_command_writes_the_same_files(api, exported, tmp_path):
    experiment, trials = exported
    url = api.server.database_url
    served = api.http.get(f"/v1/experiments/{experiment['id']}/export").text
    by_name = tmp_path / "by-name.csv"
    done = run_hyperlaw(url, "export", experiment["name"], "-o", str(by_name))
    assert done.returncode == 0, done.stderr
    assert by_name.read_bytes().decode() == served
    from_service = run_hyperlaw(
        url,
        "export",
        str(experiment["id"]),
        "--url",
        api.server.url,
        "--format",
        "parquet",
        "-o",
        str(tmp_path / "x.parquet"),
    )
    assert from_service.returncode == 0, from_service.stderr
    _check(pq.read_table(tmp_path / "x.parquet").to_pylist(), trials, lambda row: row)
    stdout = run_hyperlaw(url, "export", str(experiment["id"]))
    assert stdout.returncode == 0 and stdout.stdout.replace("\n", "\r\n") == served
    unknown = run_hyperlaw(url, "export", "no-such-experiment")
    assert unknown.returncode == 2 and "not found" in unknown.stderr
