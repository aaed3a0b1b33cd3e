"""``hyperlaw cbs`` (:mod:`fitting.cli`): table and JSON output, bad rows, censored runs."""

from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from fitting import cli

# Zhang et al. 2024, Table 6(a) (α = 1, B_opt = 256): (n_params, a, b, log2 B*).
TABLE6 = [
    (85e6, 1293.83, 2834258.08, 9.54),
    (151e6, 1752.42, 5677478.78, 9.90),
    (302e6, 2095.35, 11383269.89, 10.44),
    (604e6, 2459.93, 19449688.59, 10.88),
    (1.2e9, 3897.31, 43381130.22, 11.31),
]


def run_cbs(argv, capsys):
    parser = argparse.ArgumentParser(prog="hyperlaw")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cbs", *argv])
    code = args.func(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def table6_csv(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["n_params,batch_size,steps"]
    for n, a, b, _ in TABLE6:
        for batch in 2 ** np.arange(6, 14):
            lines.append(f"{n:.0f},{batch},{(a + b / batch) * math.exp(rng.normal(0, 0.01)):.2f}")
    lines.append("1200000000,16384,")  # never reached the target: censored
    path = tmp_path / "steps.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_json_reproduces_table6_and_the_power_law(table6_csv, capsys):
    code, out, _ = run_cbs([str(table6_csv), "--b-opt", "256", "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert [g["n_params"] for g in doc["groups"]] == [t[0] for t in TABLE6]
    for group, (_, a, _, log2_cbs) in zip(doc["groups"], TABLE6, strict=True):
        assert group["a"] == pytest.approx(a, rel=0.1)
        assert math.log2(group["critical_batch_size"]) == pytest.approx(log2_cbs, abs=0.05)
    assert doc["groups"][-1]["n_censored"] == 1
    law = doc["power_law"]
    assert set(law) >= {"coefficient", "exponent"}
    # B* grows with N roughly as N^0.47 over these sizes (the paper's fit: 93.20·N^0.47).
    assert 0.4 < law["exponent"] < 0.52
    cbs_85m = doc["groups"][0]["critical_batch_size"]
    assert law["coefficient"] * 85e6 ** law["exponent"] == pytest.approx(cbs_85m, rel=0.1)


def test_table_output_and_overhead(table6_csv, capsys):
    code, out, _ = run_cbs([str(table6_csv), "--b-opt", "256"], capsys)
    assert code == 0
    assert "critical_batch_size = " in out and "n_params^" in out
    code, out_json, _ = run_cbs(
        [str(table6_csv), "--b-opt", "256", "--overhead", "0.5", "--json"], capsys
    )
    # A larger tolerated overhead admits larger batches: B* = 1.5·256 + 0.5·b/a.
    first = json.loads(out_json)["groups"][0]
    assert first["critical_batch_size"] == pytest.approx(
        1.5 * 256 + 0.5 * first["b"] / first["a"], rel=1e-9
    )


def test_bad_rows_are_reported_with_line_numbers(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("n_params,batch_size,steps\n1e8,256,100\n1e8,-4,100\n1e8,abc,5\n")
    code, out, err = run_cbs([str(path)], capsys)
    assert code == 2 and out == ""
    assert "line 3: batch_size must be finite and > 0" in err
    assert "line 4:" in err
    missing = tmp_path / "missing.csv"
    missing.write_text("n_params,batch\n1,2\n")
    code, _, err = run_cbs([str(missing)], capsys)
    assert code == 2 and "missing column(s): batch_size, steps" in err


def test_thin_group_says_insufficient_data(tmp_path, capsys):
    path = tmp_path / "thin.csv"
    path.write_text("n_params,batch_size,steps\n1e8,256,1000\n1e8,512,600\n")
    code, out, _ = run_cbs([str(path), "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["groups"][0]["status"] == "insufficient_data"
    assert doc["groups"][0]["critical_batch_size"] is None
    assert doc["power_law"]["status"] == "insufficient_data"


def test_through_the_hyperlaw_entry_point(table6_csv):
    proc = subprocess.run(
        [sys.executable, "-m", "hyperlaw", "cbs", str(table6_csv), "--b-opt", "256", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["groups"]) == 5


def test_output_goes_to_the_stream_given(table6_csv, capsys):
    buffer = io.StringIO()
    assert cli.cbs_command(str(table6_csv), overhead=0.2, b_opt=256.0, out=buffer) == 0
    assert capsys.readouterr().out == ""
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "log S = log(a + b/B), B* = (1+0.2)·B_opt + 0.2·b/a"
    assert len(lines) == 2 + len(TABLE6) + 1 and lines[-1].startswith("critical_batch_size = ")


def test_registration_imports_no_numerics():
    code = "import sys, fitting.cli; print(sorted({'numpy', 'scipy'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
