"""The sweep file: its rules and messages, the shipped examples, and the published schema."""

import json
from pathlib import Path

import pytest
import yaml

from trainer import cli
from trainer.config import EvalConfig, OptimizerConfig, ScheduleConfig
from trainer.plan import expand_trials, idempotency_key
from trainer.sweep_config import SweepConfigError, load_sweep_config, parse_sweep_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MODELINE = "# yaml-language-server: $schema=sweep.schema.json"


@pytest.mark.parametrize(
    "over,message",
    [
        ({"experiment": ""}, "experiment must be a non-empty name"),
        ({"search": {"kind": "random"}}, "search.kind must be 'grid' or 'adaptive'"),
        ({"search": {"learning_rate": [0.1]}}, "search.batch_size_tokens is required"),
        (
            {"search": {"learning_rate": [-0.1], "batch_size_tokens": [64]}},
            "search.learning_rate values must be > 0",
        ),
        ({"workers_per_trial": 3}, "divisible by world_size: 64 sequences"),
        ({"seq_len": 4}, "seq_len must be 1 for the synthetic task"),
        ({"max_concurrent_trials": 0}, "max_concurrent_trials must be 'auto' or > 0"),
        ({"lr": 0.1}, "unknown fields: lr"),
        ({"optimizer": {"momentum": 0.9}}, "unknown optimizer fields: momentum"),
        (
            {"schedule": {"warmup_fraction": 1.5}},
            r"schedule.warmup_fraction must be in \[0, 1\) \(got 1.5\)",
        ),
        ({"n_tokens": [32]}, r"n_tokens must be >= batch_size_tokens \(got n_tokens=32"),
        ({"use_gpu": "maybe"}, r"use_gpu must be 'auto', true or false \(got 'maybe'\)"),
        ({"family": "team a"}, r"family must be 1-100 characters .* \(got 'team a'\)"),
        ({"family": "-x"}, "starting with a letter or digit"),
        ({"storage": "ftp://host/runs"}, "storage has an unknown scheme 'ftp'"),
        ({"storage": ""}, "storage must be a path or a URI"),
        ({"storage": "s3:///runs"}, r"storage names no bucket or host"),
        ({"storage": "s3://key:secret@bucket/runs"}, "storage must not hold credentials"),
        (
            {"storage": "s3://bucket/runs?endpoint=localhost:9000"},
            "storage is not a URI that pyarrow can open .*Unexpected query parameter",
        ),
        ({"task": "gpt", "corpus_dir": "sftp://h/corpus"}, "corpus_dir has an unknown scheme"),
    ],
)
def test_bad_sweep_files_name_the_field(sweep_yaml, over, message):
    with pytest.raises(SweepConfigError, match=message):
        load_sweep_config(sweep_yaml(**over))


def test_sections_are_the_training_configs_own():
    config = load_sweep_config(EXAMPLES / "cpu_small.yaml")
    assert config.optimizer == OptimizerConfig(beta2=0.99, grad_clip=0.0)
    assert config.schedule == ScheduleConfig(ewa_decay=0.98)
    assert config.eval == EvalConfig(every=256)
    # a single value stands for a list of one; what is not set takes the defaults
    config = parse_sweep_config(
        {
            "experiment": " one ",
            "n_tokens": 4096,
            "search": {"learning_rate": 0.01, "batch_size_tokens": 64},
        }
    )
    assert config.experiment == "one" and config.n_tokens == [4096] and config.seeds == [0]
    assert config.family == "default"
    assert config.search.learning_rate == [0.01] and config.eval == EvalConfig()
    (spec,) = expand_trials(config)
    assert spec["optimizer"] == {} and spec["learning_rate"] == 0.01


@pytest.mark.parametrize("example", ["examples/cpu_small.yaml", "examples/cpu_small_gpt.yaml"])
def test_shipped_cpu_examples_are_valid(example):
    config = load_sweep_config(example)
    specs = expand_trials(config)
    assert len({s["batch_size_tokens"] for s in specs}) >= 3
    assert len({s["learning_rate"] for s in specs}) >= 3
    assert len({idempotency_key(config, s) for s in specs}) == len(specs)


def test_examples_name_their_family():
    """The synthetic task's losses compare with no LLM's; the GPT examples share theirs."""
    families = {p.name: load_sweep_config(p).family for p in sorted(EXAMPLES.glob("*.yaml"))}
    assert families == {
        "cpu_cbs.yaml": "synthetic-regression",
        "cpu_small.yaml": "synthetic-regression",
        "cpu_small_gpt.yaml": "byte-gpt-local-text",
        "gpu_science_cbs.yaml": "byte-gpt-local-text",
        "gpu_small_gpt.yaml": "byte-gpt-local-text",
        "science_cbs.yaml": "science-cbs-sgd",
        "science_cbs_adamw.yaml": "science-cbs-adamw",
    }


def test_shipped_gpu_example_is_valid():
    config = load_sweep_config("examples/gpu_small_gpt.yaml")
    specs = expand_trials(config)
    assert config.use_gpu == "auto" and config.workers_per_trial == 1
    assert {s["zero_stage"] for s in specs} == {2}
    assert len({s["batch_size_tokens"] for s in specs}) == 3
    assert len({idempotency_key(config, s) for s in specs}) == len(specs)


def test_committed_schema_is_what_the_command_prints(capsys):
    """After a change to the models: hyperlaw sweep --schema > examples/sweep.schema.json"""
    assert cli.main(["sweep", "--schema"]) == 0
    printed = capsys.readouterr().out
    committed = (EXAMPLES / "sweep.schema.json").read_text(encoding="utf-8")
    assert json.loads(printed) == json.loads(committed), "regenerate examples/sweep.schema.json"
    assert printed == committed
    schema = json.loads(printed)
    assert schema["additionalProperties"] is False
    assert schema["properties"]["schedule"]["$ref"] == "#/$defs/ScheduleConfig"
    assert schema["$defs"]["ScheduleConfig"]["properties"]["warmup_fraction"] == {
        "default": 0.05,
        "description": "linear warmup over ceil(warmup_fraction * steps) steps",
        "exclusiveMaximum": 1,
        "minimum": 0,
        "title": "Warmup Fraction",
        "type": "number",
    }


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_name_the_schema_and_pass_it(example):
    """What an editor does with the first line: check the file against the schema."""
    jsonschema = pytest.importorskip("jsonschema")  # installed with Ray
    text = (EXAMPLES / example).read_text()
    assert text.splitlines()[0] == MODELINE
    schema = json.loads((EXAMPLES / "sweep.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(text))
    with pytest.raises(jsonschema.ValidationError, match="is not one of"):
        jsonschema.validate({**yaml.safe_load(text), "zero_stage": 7}, schema)


def test_cli_rejects_a_bad_sweep_file(sweep_yaml):
    assert cli.main(["sweep", str(sweep_yaml(zero_stage=7))]) == 2
    assert cli.main(["sweep"]) == 2  # neither a file nor --schema


def test_storage_and_a_corpus_uri_are_taken_as_written(sweep_yaml):
    """A URI is checked without a network call (no region: pyarrow would ask AWS) and kept as
    written; a corpus URI is not resolved against the file's folder as a relative path is."""
    uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    corpus = "s3://bucket/corpus?endpoint_override=127.0.0.1:9000&scheme=http"
    config = load_sweep_config(sweep_yaml(storage=uri, task="gpt", corpus_dir=corpus, seq_len=8))
    assert (config.storage, config.corpus_dir) == (uri, corpus)
    assert load_sweep_config(sweep_yaml(storage="shared/runs")).storage == "shared/runs"
    assert config.with_storage("gs://bucket/runs").storage == "gs://bucket/runs"
    with pytest.raises(SweepConfigError, match="storage has an unknown scheme 'ftp'"):
        config.with_storage("ftp://host/runs")
