"""The run options are declared once (qwen_batch/run/config.py): the CLI's flags, the flows' parameters and the
engine's config are all made from that declaration, so these tests fail as soon as one of them drifts."""

import argparse
import re
from dataclasses import MISSING
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.parameters import BatchParameters, FanoutParameters
from qwen_batch.cli import build_parser, main
from qwen_batch.errors import ConfigError
from qwen_batch.memory.modes import MEMORY_MODES
from qwen_batch.run.config import RunConfig, option_default, run_options

REPO = Path(__file__).resolve().parents[1]
# How a flow cuts its work into tasks (the CLI runs one process), and the Prefect Secret blocks a flow may take its
# C2PA certificate and key from (the CLI reads files).
FLOW_ONLY = {"chunk_size", "c2pa_cert_secret", "c2pa_key_secret"}


def run_actions() -> dict[str, argparse.Action]:
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return {action.dest: action for action in commands.choices["run"]._actions}


def test_every_run_option_is_a_cli_flag_with_its_default_choices_and_help():
    actions = run_actions()
    for name, how in run_options():
        action = actions[name]
        assert action.help.replace("%%", "%") == how.help, name
        if how.choices:
            assert action.metavar == "{" + ",".join(how.choices) + "}", name
        default = option_default(name)
        if isinstance(default, tuple):
            assert action.default == [], name  # repeatable: each flag adds one
        elif default is not MISSING and default is not False:
            assert action.default == default, name
    declared = {name for name, _ in run_options()}
    cli_only = {"help", "quiet", "progress"}
    assert set(actions) - declared == cli_only, "a run flag that is not a declared option"


def test_every_run_option_is_a_flow_parameter_with_its_default_description_and_limits():
    for model in (BatchParameters, FanoutParameters):
        fields = model.model_fields
        for name, how in run_options():
            if model is FanoutParameters and name == "shard":
                continue  # the fan-out chooses each shard run's shard
            assert name in fields, f"{name} is a run option but not a {model.__name__} parameter"
            assert fields[name].description == how.help, name
            default = option_default(name)
            expected = how.flow_default if default is MISSING else default
            assert fields[name].default == (list(expected) if isinstance(expected, tuple) else expected), name
    batch = BatchParameters.model_json_schema()["properties"]
    assert batch["memory_mode"]["enum"] == list(MEMORY_MODES)
    assert batch["batch_size"]["anyOf"][0]["minimum"] == 1
    assert {"compile", "compile_cache"} <= set(batch), "the flow takes every run option"
    assert set(BatchParameters.model_fields) - {name for name, _ in run_options()} == FLOW_ONLY


def test_the_cli_and_a_flow_make_the_same_engine_config():
    args = ["run", "m.parquet", "-o", "out", "--batch-size", "2", "--memory-mode", "fp8", "--compile", "off"]
    args += ["--lora", "style.safetensors:0.5", "--shard", "1/3", "--task", "edit", "--allow-inputs", "s3://b/in/"]
    args += ["--step-cache", "first-block:0.10", "--s3-region", "eu-west-1", "--compile-cache", "/tmp/cc"]
    parsed = build_parser().parse_args(args)
    from qwen_batch.cli import _option_value

    from_cli = RunConfig(**{name: _option_value(how, getattr(parsed, name)) for name, how in run_options()})
    from_flow = BatchParameters(
        manifest="m.parquet",
        output="out",
        batch_size=2,
        memory_mode="fp8",
        compile="off",
        loras=[{"path": "style.safetensors", "scale": 0.5}],
        shard="1/3",
        task="edit",
        allow_inputs=["s3://b/in/"],
        step_cache="first-block:0.10",
        s3_region="eu-west-1",
        compile_cache="/tmp/cc",
    ).run_config()
    assert from_cli == from_flow
    assert from_cli.step_cache == "first-block:0.1" and from_cli.shard_index == 1 and from_cli.shard_count == 3
    assert from_cli.storage_options == {"s3": {"client_kwargs": {"region_name": "eu-west-1"}}}


@pytest.mark.parametrize(
    ("flag", "value", "parameter", "bad"),
    [
        ("--batch-size", "0", "batch_size", 0),
        ("--encode-batch-size", "0", "encode_batch_size", 0),
        ("--scheduler-shift", "0", "scheduler_shift", 0.0),
        ("--step-cache", "first-block:many", "step_cache", "first-block:many"),
        ("--shard", "2/2", "shard", "2/2"),
        ("--device", "gpu", "device", "gpu"),
    ],
)
def test_a_bad_value_is_refused_the_same_way_everywhere(tmp_path, capsys, flag, value, parameter, bad):
    assert main(["run", "m.parquet", "-o", str(tmp_path), flag, value]) == 2
    assert flag in capsys.readouterr().err, "the error names the flag"
    with pytest.raises(ValidationError, match=parameter):
        BatchParameters(**{parameter: bad})
    with pytest.raises(ConfigError, match=re.escape(flag)):
        RunConfig("m.parquet", str(tmp_path), **{parameter: bad})


def test_memory_modes_are_named_once():
    """Only qwen_batch/memory/modes.py spells the modes out; everything else uses its names."""
    spelled = re.compile(r"""["'](fp8-offload|sequential|offload)["']""")
    places = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("qwen_batch", "flows")
        for path in (REPO / folder).rglob("*.py")
        if path.name != "modes.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if spelled.search(line.split("#")[0])
    ]
    assert not places, places
