"""The framework callbacks (``client.integrations``) against the live service and the real
libraries on the CPU: a tiny GPT-2 under the ``transformers`` Trainer, a tiny module under
Lightning's (and pytorch_lightning's) Trainer, a Ray Tune run of a function trainable. Each
checks that the trial has the N, D, η and B the callback derived, its points and its final
status; and that importing the client imports none of the frameworks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from client import HyperlawClient
from client.integrations.common import POINT_COLUMNS, PointMapper, non_embedding_params
from tests.databases import REPO_ROOT

FRAMEWORKS = ("transformers", "lightning", "pytorch_lightning", "ray")


@pytest.fixture
def service(live_server, monkeypatch):
    monkeypatch.setenv("HYPERLAW_URL", live_server.url)
    monkeypatch.setenv("HYPERLAW_TOKEN", live_server.token)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("HYPERLAW_RUN_KEY", raising=False)
    return live_server


def _trials(live_server, experiment: str) -> dict[str, dict]:
    with HyperlawClient(live_server.url, live_server.token) as client:
        (exp,) = client.list_experiments(name=experiment)["data"]
        trials = client.list_trials(experiment_id=exp["id"])["data"]
        return {t["idempotency_key"]: t for t in trials}


def _points(live_server, trial_id: int) -> list[dict]:
    with HyperlawClient(live_server.url, live_server.token) as client:
        return client.get_points(trial_id)["data"]


def _experiment(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# -- without a framework ---------------------------------------------------------------------


def test_importing_the_client_imports_no_framework():
    script = textwrap.dedent(
        f"""
        import sys
        import client, client.run, client.integrations, client.integrations.common, hyperlaw
        hyperlaw.init
        loaded = {{m.split(".")[0] for m in sys.modules}} & {set(FRAMEWORKS) | {"torch"}!r}
        assert not loaded, loaded
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)


@pytest.mark.parametrize(
    ("module", "hidden", "named"),
    [
        ("huggingface", ["transformers"], "pip install transformers"),
        ("lightning", ["lightning", "pytorch_lightning"], "pip install lightning"),
        ("ray_tune", ["ray", "ray.tune"], 'pip install "ray[tune]"'),
    ],
)
def test_a_missing_framework_is_named_with_its_pip_package(module, hidden, named):
    script = textwrap.dedent(
        f"""
        import sys
        for name in {hidden!r}:
            sys.modules[name] = None  # as if not installed
        try:
            import client.integrations.{module}
        except ImportError as exc:
            assert {named!r} in str(exc), str(exc)
        else:
            raise AssertionError("imported without its framework")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)


def test_the_point_columns_are_the_services():
    from server.models import POINT_VALUE_COLUMNS

    assert POINT_COLUMNS == set(POINT_VALUE_COLUMNS)


def test_metrics_become_point_columns_and_the_rest_extras():
    points = PointMapper({"loss": "train_loss", "learning_rate": "lr"}, extras=False)
    sent = points({"loss": 2.5, "learning_rate": 1e-3, "epoch": 0.5, "eval_loss": "n/a"})
    assert sent == {"train_loss": 2.5, "lr": 1e-3}
    points({"grad_norm": True, "eval_loss": 3.0})
    assert points.last == {"train_loss": 2.5, "lr": 1e-3, "eval_loss": 3.0}
    assert points.at_step(4, {"train_loss": 2.0}) == {"train_loss": 2.0}
    assert points.at_step(4, {"eval_loss": 2.2}) == {"train_loss": 2.0, "eval_loss": 2.2}
    assert points.at_step(5, {"train_loss": 1.9}) == {"train_loss": 1.9}
    extras = PointMapper({"loss": "train_loss"})  # extras are sent by default
    sent = extras({"loss": 2.5, "epoch": 0.5, "bad key": 1.0, "note": "text"})
    assert sent == {"train_loss": 2.5, "epoch": 0.5}


# -- Hugging Face transformers ---------------------------------------------------------------


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    import torch

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def _token_rows(count: int, seq_len: int = 16) -> list[dict]:
    import torch

    ids = torch.randint(0, 64, (count, seq_len), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in ids]


def test_n_is_the_parameters_without_the_embeddings():
    """GPT-2 ties its readout to the token embedding: N = 12·L·d² + 13·L·d + 2·d (weights,
    biases, LayerNorms); an untied head counts."""
    import torch

    model = _tiny_gpt2()
    d = 16
    assert non_embedding_params(model) == 12 * d * d + 13 * d + 2 * d
    untied = torch.nn.Sequential(torch.nn.Embedding(64, d), torch.nn.Linear(d, 64))
    assert non_embedding_params(untied) == d * 64 + 64


def test_the_hf_callback_logs_a_trainer_run(service, tmp_path):
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    from client.integrations.huggingface import HyperlawCallback

    experiment = _experiment("hf")
    model = _tiny_gpt2()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        weight_decay=0.1,
        warmup_steps=1,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=3,
    )
    callback = HyperlawCallback(experiment, family="hf-tests", seq_len=16, key="hf-1")
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_token_rows(32),
        eval_dataset=_token_rows(4),
        callbacks=[callback],
    )
    trainer.train()

    trial = _trials(service, experiment)["hf-1"]
    batch = 2 * 2 * 1 * 16  # per device × accumulation × world size × seq_len
    assert trial["status"] == "completed"
    assert trial["n_params"] == 12 * 16 * 16 + 13 * 16 + 2 * 16
    assert trial["batch_size_tokens"] == batch and trial["seq_len"] == 16
    assert trial["n_tokens"] == 4 * batch and trial["learning_rate"] == 1e-3
    assert trial["steps_done"] == 4 and trial["tokens_done"] == 4 * batch
    assert trial["weight_decay"] == 0.1 and trial["seed"] == 3 and trial["world_size"] == 1
    assert trial["schedule"] == "linear" and trial["warmup_fraction"] == 0.25
    assert trial["model_shape"] == {"n_layer": 1, "n_head": 2, "d_model": 16, "vocab_size": 64}
    assert trial["config"]["training_args"]["per_device_train_batch_size"] == 2
    points = {p["step"]: p for p in _points(service, trial["id"])}
    assert sorted(points) == [1, 2, 3, 4]
    assert all(p["tokens"] == s * batch and p["train_loss"] > 0 for s, p in points.items())
    assert all(p["lr"] is not None and p["grad_norm"] is not None for p in points.values())
    assert [s for s, p in points.items() if p["eval_loss"] is not None] == [2, 4]
    assert trial["final_loss"] == points[4]["train_loss"]  # the last step's, not the mean
    assert trial["final_eval_loss"] == points[4]["eval_loss"]


def test_the_hf_callback_asks_for_seq_len_and_logs_on_the_main_process_only():
    pytest.importorskip("transformers", reason="pip install transformers")
    from types import SimpleNamespace

    from client.integrations.huggingface import HyperlawCallback

    with pytest.raises(ValueError, match="seq_len="):
        HyperlawCallback("never")
    args = SimpleNamespace(
        learning_rate=3e-4, per_device_train_batch_size=8, gradient_accumulation_steps=4,
        world_size=2,
    )  # fmt: skip
    state = SimpleNamespace(max_steps=100, is_world_process_zero=False)
    callback = HyperlawCallback("never", seq_len_from_model=True)
    shape = callback.derive(args, state, _tiny_gpt2())
    assert shape["seq_len"] == 16 and shape["batch_size_tokens"] == 8 * 4 * 2 * 16
    assert shape["n_tokens"] == 100 * 8 * 4 * 2 * 16 and shape["learning_rate"] == 3e-4
    callback.on_train_begin(args, state, None, model=_tiny_gpt2())  # rank 1: nothing sent
    callback.on_log(args, state, None, logs={"loss": 1.0})
    callback.on_train_end(args, state, None)
    assert callback.run is None


def test_an_exception_in_a_hf_trainer_run_fails_it(service, tmp_path):
    """No callback hears of it: the client's exit handling fails the run."""
    pytest.importorskip("transformers", reason="pip install transformers")
    experiment = _experiment("hf-fail")
    script = textwrap.dedent(
        f"""
        import transformers
        from client.integrations.huggingface import HyperlawCallback
        from tests.client.test_integrations import _tiny_gpt2, _token_rows

        class Diverge(transformers.TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == 2:
                    raise RuntimeError("loss went to NaN")

        args = transformers.TrainingArguments(
            output_dir="out", max_steps=5, per_device_train_batch_size=2, logging_steps=1,
            save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
        callback = HyperlawCallback({experiment!r}, seq_len=16, key="boom")
        transformers.Trainer(model=_tiny_gpt2(), args=args, train_dataset=_token_rows(16),
                             callbacks=[callback, Diverge()]).train()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    ended = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ended.returncode == 1, ended.stderr[-3000:]
    trial = _trials(service, experiment)["boom"]
    assert trial["status"] == "failed"
    assert trial["status_reason"] == "RuntimeError: loss went to NaN"
    assert [p["step"] for p in _points(service, trial["id"])] == [1, 2]


# -- PyTorch Lightning -----------------------------------------------------------------------


def _lightning_module(package: str, fail_at: int | None = None):
    pl = pytest.importorskip(package, reason=f"pip install {package.replace('_', '-')}")
    import torch

    class Tiny(pl.LightningModule):
        def __init__(self, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.embed = torch.nn.Embedding(32, 8)
            self.head = torch.nn.Linear(8, 32)

        def _loss(self, batch):
            return torch.nn.functional.cross_entropy(
                self.head(self.embed(batch[:, :-1])).mT, batch[:, 1:]
            )

        def training_step(self, batch, index):
            if fail_at is not None and self.global_step == fail_at:
                raise ValueError("diverged")
            loss = self._loss(batch)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, index):
            self.log("val_loss", self._loss(batch))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)

    torch.manual_seed(0)
    return pl, Tiny()


def _loaders():
    import torch

    data = torch.randint(0, 32, (64, 8), generator=torch.Generator().manual_seed(2))
    train = torch.utils.data.DataLoader(data, batch_size=4)
    return train, torch.utils.data.DataLoader(data[:8], batch_size=4)


@pytest.mark.parametrize("package", ["lightning", "pytorch_lightning"])
def test_the_lightning_logger_logs_a_fit(service, tmp_path, package):
    """N counted from the module, η from its hparams, B from the DataLoader × seq_len ×
    accumulation, D from max_steps; points at Lightning's step + 1."""
    pl, module = _lightning_module(package)
    from client.integrations.lightning import HyperlawLogger

    experiment = _experiment(f"lightning-{package}")
    logger = HyperlawLogger(experiment, seq_len=8, key="fit-1")
    trainer = pl.Trainer(
        max_steps=6,
        accumulate_grad_batches=2,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=logger,
        log_every_n_steps=1,
        val_check_interval=6,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    train, val = _loaders()
    trainer.fit(module, train, val)

    trial = _trials(service, experiment)["fit-1"]
    batch = 4 * 8 * 2  # sequences × seq_len × accumulation
    assert trial["status"] == "completed"
    assert trial["n_params"] == 8 * 32 + 32  # the head; the embedding is not counted
    assert trial["learning_rate"] == 0.05 and trial["batch_size_tokens"] == batch
    assert trial["n_tokens"] == 6 * batch and trial["seq_len"] == 8
    assert trial["weight_decay"] == 0.01 and trial["adam_beta2"] == 0.999
    assert trial["config"]["hparams"] == {"lr": 0.05}
    points = {p["step"]: p for p in _points(service, trial["id"])}
    assert sorted(points) == [1, 2, 3, 4, 5, 6]
    assert all(p["tokens"] == s * batch and p["train_loss"] > 0 for s, p in points.items())
    assert [s for s, p in points.items() if p["eval_loss"] is not None] == [3, 6]  # 6 batches
    assert trial["steps_done"] == 6 and trial["tokens_done"] == 6 * batch
    assert trial["final_loss"] == points[6]["train_loss"]
    assert trial["final_eval_loss"] == points[6]["eval_loss"]


def test_the_lightning_logger_falls_back_to_pytorch_lightning():
    pytest.importorskip("pytorch_lightning", reason="pip install pytorch-lightning")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["lightning"] = None  # as if only pytorch_lightning were installed
        import pytorch_lightning
        from client.integrations.lightning import HyperlawLogger
        assert issubclass(HyperlawLogger, pytorch_lightning.loggers.Logger)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)


def test_a_failed_lightning_fit_fails_its_run(service, tmp_path):
    pl, module = _lightning_module("lightning", fail_at=3)
    from client.integrations.lightning import HyperlawLogger

    experiment = _experiment("lightning-fail")
    trainer = pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=HyperlawLogger(experiment, seq_len=8, key="fit-2"),
        log_every_n_steps=1,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    with pytest.raises(ValueError, match="diverged"):
        trainer.fit(module, _loaders()[0])
    trial = _trials(service, experiment)["fit-2"]
    assert trial["status"] == "failed" and trial["status_reason"] == "ValueError: diverged"
    assert [p["step"] for p in _points(service, trial["id"])] == [1, 2, 3]


# -- Ray Tune --------------------------------------------------------------------------------


def test_the_tune_callback_makes_one_run_per_trial(service, tmp_path):
    """Three trials: one runs to its end (completed), one a Stopper ends early (pruned), one
    raises (failed)."""
    ray = pytest.importorskip("ray")
    from ray import tune

    from client.integrations.ray_tune import HyperlawTuneCallback

    def trainable(config):
        for step in range(1, 4):
            if config["learning_rate"] == 0.1 and step == 3:
                raise ValueError("loss is NaN")
            tune.report({"loss": 4.0 / step, "val_loss": 5.0 / step, "epoch": 1})

    def stop_early(trial_id, result):
        return result["config"]["learning_rate"] == 0.01 and result["training_iteration"] >= 2

    experiment = _experiment("tune")
    callback = HyperlawTuneCallback(experiment, family="tune-tests", n_params=1000, n_tokens=96)
    param_space = {
        "learning_rate": tune.grid_search([0.001, 0.01, 0.1]),
        "batch_size": 4,
        "seq_len": 8,
        "weight_decay": 0.05,
    }
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            run_config=tune.RunConfig(
                name=experiment,
                storage_path=str(tmp_path),
                callbacks=[callback],
                stop=stop_early,
                verbose=0,
            ),
        )
        results = tuner.fit()
    finally:
        ray.shutdown()
    assert len(results) == 3

    trials = {t["learning_rate"]: t for t in _trials(service, experiment).values()}
    assert sorted(trials) == [0.001, 0.01, 0.1]
    for trial in trials.values():
        assert trial["n_params"] == 1000 and trial["n_tokens"] == 96
        assert trial["batch_size_tokens"] == 32 and trial["seq_len"] == 8
        assert trial["weight_decay"] == 0.05 and trial["config"]["batch_size"] == 4
    done, pruned, failed = trials[0.001], trials[0.01], trials[0.1]
    assert done["status"] == "completed" and done["steps_done"] == 3
    assert done["final_loss"] == 4.0 / 3 and done["tokens_done"] == 3 * 32
    assert pruned["status"] == "pruned" and pruned["steps_done"] == 2
    assert failed["status"] == "failed" and failed["status_reason"] == "ValueError: loss is NaN"
    points = _points(service, done["id"])
    assert [(p["step"], p["tokens"], p["eval_loss"]) for p in points] == [
        (s, s * 32, 5.0 / s) for s in (1, 2, 3)
    ]
    assert [p["step"] for p in _points(service, failed["id"])] == [1, 2]


def test_a_tune_trial_without_its_shape_is_refused_with_the_key_to_give():
    pytest.importorskip("ray")
    from client.integrations.ray_tune import HyperlawTuneCallback

    callback = HyperlawTuneCallback("never", config_keys={"learning_rate": "optim/lr"})
    shape = callback.shape_of(
        {"optim": {"lr": 0.01}, "n_params": 10, "n_tokens": 100, "seq_len": 4, "batch_size": 2}
    )
    assert shape["learning_rate"] == 0.01 and shape["batch_size_tokens"] == 8
    with pytest.raises(ValueError, match="'n_tokens' in the trial's config or pass n_tokens="):
        callback.shape_of({"lr": 0.01, "n_params": 10, "seq_len": 4, "batch_size": 2})
