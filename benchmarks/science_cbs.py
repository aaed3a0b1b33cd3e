"""Science benchmark: Zhang et al.'s CBS finding reproduced end to end on this machine.

Zhang et al. 2024 (arXiv:2410.21676, appendix A.2, Theorem 8 / Corollary 8) prove for
mini-batch SGD on power-law linear regression (capacity λ_i = i^-a, source λ_i·w*_i² = i^-b,
b > a) that the critical batch size grows with the data as B* ≈ D^(1 − a/min(b, 2a+1)),
independently of the dimension once it is large enough. This script runs their protocol on
that task the way a user would: it starts ``hyperlaw serve`` (API and fitting worker) on a
fresh SQLite file, creates a write token, runs ``hyperlaw sweep examples/science_cbs.yaml``
(SGD; the sweep's ``cbs:`` section: at each (N, D) a reference batch size with its η tuned,
the target its EWA loss at D, every other batch size trained until it reaches the target),
waits for the worker's ``cbs`` fit of the family and reads it back over the API, then does
the same with ``examples/science_cbs_adamw.yaml`` (AdamW, reported beside it).

Printed per optimizer: each group's CBS, the fitted law B* = c·N^β·D^γ with γ's 90 %
bootstrap interval (over groups), β, the theory's γ, and the recommendation the family now
serves. ``--plot PATH`` writes the steps-to-target figure of the SGD run (default
``docs/science_cbs.png``). The last line is

    science cbs_d_exponent=… cbs_d_low=… cbs_d_high=… theory_d_exponent=… cbs_n_exponent=… minutes=…

for SGD, the theory's optimizer; ``minutes`` is the wall time of the whole script.

Usage: ``.venv/bin/python benchmarks/science_cbs.py [--only sgd|adamw] [--plot PATH]
[--workdir DIR [--resume]]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

log = logging.getLogger("benchmarks.science_cbs")
EXAMPLES = {
    "sgd": REPO_ROOT / "examples" / "science_cbs.yaml",
    "adamw": REPO_ROOT / "examples" / "science_cbs_adamw.yaml",
}
HYPERLAW = str(Path(sys.executable).with_name("hyperlaw"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def theory_exponent(a: float, b: float) -> float:
    """Zhang et al.'s Corollary 8: B* ≈ D^(1 − a/min(b, 2a+1)) for b > a."""
    return 1.0 - a / min(b, 2.0 * a + 1.0)


class Service:
    """``hyperlaw serve`` with its worker on a fresh SQLite file, and a write token."""

    def __init__(self, workdir: Path) -> None:
        self.env = {
            **os.environ,
            "HYPERLAW_DATABASE_URL": f"sqlite:///{workdir / 'hyperlaw.db'}",
            "HYPERLAW_WORKER_POLL_S": "2.0",
        }
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        subprocess.run([HYPERLAW, "db", "upgrade"], env=self.env, check=True, capture_output=True)
        self.log_file = open(workdir / "serve.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [HYPERLAW, "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"hyperlaw serve did not answer at {self.url}")
        made = subprocess.run(
            [HYPERLAW, "token", "create", "--name", f"science-{os.getpid()}", "--scope", "write"],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        )
        self.token = made.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log_file.close()


def run_sweep(service: Service, config: Path, workdir: Path, resume: bool) -> float:
    """``hyperlaw sweep CONFIG`` against the service; returns its wall time in seconds."""
    env = {**service.env, "HYPERLAW_URL": service.url, "HYPERLAW_TOKEN": service.token}
    argv = [HYPERLAW, "sweep", str(config), *(["--resume"] if resume else [])]
    t0 = time.perf_counter()
    with open(workdir / f"sweep-{config.stem}.log", "a") as out:
        done = subprocess.run(argv, env=env, cwd=workdir, stdout=out, stderr=out)
    if done.returncode != 0:
        raise RuntimeError(f"hyperlaw sweep {config.name} exited {done.returncode}: see {out.name}")
    return time.perf_counter() - t0


def wait_for_cbs_fit(
    service: Service, family: str, since: dt.datetime, timeout_s: float = 600, settle_s=None
) -> dict[str, Any]:
    """The family's newest ``cbs`` fit stored after ``since`` (the sweep's end: every trial
    was completed, and every reference run had stored its target, by then); with
    ``settle_s`` (a resumed sweep that may have run nothing), the newest one once none newer
    came for that long."""
    scope = f"family:{family}"
    deadline = time.monotonic() + timeout_s
    settled = time.monotonic() + (settle_s if settle_s is not None else math.inf)
    with httpx.Client(base_url=service.url, timeout=30) as client:
        while time.monotonic() < deadline:
            if time.monotonic() > settled:
                since = dt.datetime.min.replace(tzinfo=dt.UTC)
            answer = client.get("/v1/fits/latest", params={"kind": "cbs", "scope": scope})
            if answer.status_code == 200:
                fit = answer.json()
                created = dt.datetime.fromisoformat(fit["created_at"])
                if (created if created.tzinfo else created.replace(tzinfo=dt.UTC)) > since:
                    return fit
            time.sleep(2)
    raise RuntimeError(f"no cbs fit of {scope} stored after {since} within {timeout_s} s")


def report(name: str, config: dict[str, Any], fit: dict[str, Any], service: Service) -> dict:
    """Print the groups, the law and the served recommendation; return the figures."""
    synthetic = config.get("synthetic", {})
    a, b = float(synthetic["capacity_exponent"]), float(synthetic["source_exponent"])
    theory = theory_exponent(a, b)
    groups = [g for g in fit["params"]["groups"] if g["target_rule"] == "measured"]
    for g in sorted(groups, key=lambda g: (g["n_params"], g["n_tokens"])):
        f = {k: v for k, v in g["fit"].items() if k in ("critical_batch_size", "a", "b")}
        f = {k: float(v) for k, v in f.items()}  # the API writes NaN and Infinity as strings
        print(
            f"{name} group N={g['n_params']:g} D={g['n_tokens']:g} target={g['target_loss']:.5f} "
            f"cbs={f['critical_batch_size']:.4g} a={f['a']:.4g} b={f['b']:.4g} "
            f"censored={g['fit']['n_censored']} b_noise={g['noise_scale']['b_noise_tokens']}"
        )
    law = fit["params"]["laws"]["joint"]
    ivs = fit["intervals"]["laws"]["joint"]["exponents"]
    exps = dict(zip(law["names"], law["exponents"], strict=True))
    d_iv, n_iv = ivs["n_tokens"], ivs["n_params"]
    figures = {
        "cbs_d_exponent": exps["n_tokens"],
        "cbs_d_low": d_iv["low"],
        "cbs_d_high": d_iv["high"],
        "theory_d_exponent": theory,
        "cbs_n_exponent": exps["n_params"],
        "cbs_n_low": n_iv["low"],
        "cbs_n_high": n_iv["high"],
    }
    print(
        f"{name} law CBS ∝ N^{figures['cbs_n_exponent']:.3f} "
        f"[{figures['cbs_n_low']:.3f}, {figures['cbs_n_high']:.3f}] · "
        f"D^{figures['cbs_d_exponent']:.3f} [{figures['cbs_d_low']:.3f}, "
        f"{figures['cbs_d_high']:.3f}] (90 %); theory D^{theory:.3f} (a={a:g}, b={b:g})"
    )
    n_mid = sorted({g["n_params"] for g in groups})[0]
    d_mid = sorted({g["n_tokens"] for g in groups})[len({g["n_tokens"] for g in groups}) // 2]
    rec = httpx.get(
        service.url + "/v1/recommendations",
        params={"n_params": n_mid, "n_tokens": d_mid, "seq_len": 1, "family": config["family"]},
        timeout=30,
    )
    if rec.status_code == 200:
        body = rec.json()
        print(
            f"{name} served at N={n_mid:g} D={d_mid:g}: "
            f"CBS {float(body['critical_batch_size_tokens']):.4g} "
            f"({body['sources']['critical_batch_size_tokens']}); "
            f"learning_rate {body['learning_rate']} ({body['sources']['learning_rate']})"
        )
    else:
        print(f"{name} served: {rec.status_code} {rec.text[:200]}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(EXAMPLES), help="run one optimizer only")
    parser.add_argument("--plot", default=str(REPO_ROOT / "docs" / "science_cbs.png"))
    parser.add_argument("--workdir", help="keep the database, logs and runs here")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --workdir of an interrupted run: hyperlaw sweep --resume, completed runs kept",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hyperlaw-science-"))
    workdir.mkdir(parents=True, exist_ok=True)
    service = Service(workdir)
    results: dict[str, dict] = {}
    try:
        for name in [args.only] if args.only else ["sgd", "adamw"]:
            path = EXAMPLES[name]
            config = yaml.safe_load(path.read_text())
            wall = run_sweep(service, path, workdir, args.resume)
            log.info("%s sweep: %.1f min", name, wall / 60)
            ended = dt.datetime.now(dt.UTC)
            fit = wait_for_cbs_fit(
                service, config["family"], ended, settle_s=30 if args.resume else None
            )
            results[name] = report(name, config, fit, service)
            if name == "sgd" and args.plot:
                from fitting.plots import plot_steps_to_target

                law = fit["params"]["laws"]["joint"]
                exps = dict(zip(law["names"], law["exponents"], strict=True))
                plot_steps_to_target(
                    fit["params"]["groups"],
                    args.plot,
                    law={
                        "coefficient": law["coefficient"],
                        "n_params_exponent": exps["n_params"],
                        "n_tokens_exponent": exps["n_tokens"],
                    },
                    title="Synthetic power-law regression, SGD: steps to target (Zhang et al.)",
                )
                print(f"plot: {args.plot}")
    finally:
        service.stop()
    minutes = (time.perf_counter() - t0) / 60
    for name, fig in results.items():
        if name != "sgd":
            print(
                f"science_{name} "
                + " ".join(f"{k}={v:.4g}" for k, v in fig.items())
                + f" minutes={minutes:.1f}"
            )
    if "sgd" in results:
        fig = results["sgd"]
        print(
            f"science cbs_d_exponent={fig['cbs_d_exponent']:.4g} cbs_d_low={fig['cbs_d_low']:.4g} "
            f"cbs_d_high={fig['cbs_d_high']:.4g} theory_d_exponent={fig['theory_d_exponent']:.4g} "
            f"cbs_n_exponent={fig['cbs_n_exponent']:.4g} minutes={minutes:.1f}"
        )


if __name__ == "__main__":
    main()
