"""``hyperlaw plot {trial,group,laws,cbs} --out FILE.png|svg`` against a live service with
real data (``tests.server.dashboard_store``), as a user types it: each figure is written in
both formats and is a real PNG or SVG; refusals and an unreachable service exit with the
documented codes and say why."""

from __future__ import annotations

from pathlib import Path

from tests.databases import run_hyperlaw
from tests.server.dashboard_store import CBS_FAMILY, GROUP, Store

MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".svg": b"<?xml"}


def plot(store: Store, *args: str):
    return run_hyperlaw(store.server.database_url, "plot", *args, "--url", store.server.url)


def test_every_figure_is_written(dashboard_store, tmp_path):
    figures = {
        "trial": ["trial", str(dashboard_store.running_trial)],
        "group": [
            "group",
            "--n-params",
            str(GROUP["n_params"]),
            "--n-tokens",
            str(GROUP["n_tokens"]),
        ],
        "laws": ["laws", "--n-params", "3e8", "--n-params", "1e9"],
        "cbs": ["cbs", "--family", CBS_FAMILY],
    }
    for i, (name, args) in enumerate(figures.items()):  # each format twice
        suffix = (".png", ".svg")[i % 2]
        out = tmp_path / f"{name}{suffix}"
        done = plot(dashboard_store, *args, "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert f"wrote {out}" in done.stdout
        assert out.read_bytes().startswith(MAGIC[suffix]), name
        assert out.stat().st_size > 10_000, name  # drawn, not an empty canvas


def test_refusals_say_why(dashboard_store, tmp_path):
    out = str(tmp_path / "x.png")
    bad_suffix = plot(dashboard_store, "laws", "--out", str(tmp_path / "x.jpg"))
    assert bad_suffix.returncode == 2 and "must end in .png or .svg" in bad_suffix.stderr
    no_group = plot(dashboard_store, "group", "--n-params", "7", "--n-tokens", "7", "--out", out)
    assert no_group.returncode == 2 and "no run at n_params=7" in no_group.stderr
    no_cbs = plot(dashboard_store, "cbs", "--out", out)  # the Step Law sweep has no steps
    assert no_cbs.returncode == 2 and "no fit found with kind=cbs" in no_cbs.stderr
    assert not Path(out).exists()
    unreachable = run_hyperlaw(
        dashboard_store.server.database_url,
        "plot",
        "laws",
        "--out",
        out,
        "--url",
        "http://127.0.0.1:9",
    )
    assert unreachable.returncode == 1, unreachable.stderr
