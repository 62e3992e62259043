"""The config spine: loading, presets, overrides, precedence, derived values, docs, and every bad input."""

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ironcore.cli import main
from ironcore.config import GROUPS, config_to_dict, load_config
from ironcore.config.docs import README, updated
from ironcore.config.schema import ModelConfig, RunConfig
from ironcore.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def cfg(tmp_path):
    """A minimal run file inside its own configs/ tree, with a tiny model preset next to it."""
    write(tmp_path / "configs/model/mini.yaml", "d_model: 64\nnum_attention_heads: 4\nhead_dim: 16\nd_ffn: 128\n")
    write(tmp_path / "configs/data/mini_data.yaml", "task_type: sft\nseq_length: 32\nvocab_size: 1000\n")
    return write(tmp_path / "configs/run.yaml", "model: mini\ntrainer:\n  micro_batch_size: 4\n")


def test_defaults_are_the_specs():
    """Spot-check every group against the spec's table (names and defaults are a requirement)."""
    run = RunConfig()
    assert run.trainer.micro_batch_size == 2 and run.trainer.train_batch_size is None
    assert run.trainer.vocab_padding_unit == 128 and run.trainer.use_flash_attn is True
    assert run.operation.train_steps == 1000 and run.operation.recompute_strategy == "default"
    assert run.model.d_model == 512 and run.model.head_dim == 128 and run.model.ln_eps == 1e-5
    assert run.model.positional_embedding.base == 10000 and run.model.positional_embedding.type == "absolute"
    assert run.data.splits == (0.97, 0.029, 0.001) and run.data.vocab_size == 51200 and run.data.pad_token_id == -1
    assert run.optim.max_lr == 5e-4 and run.optim.adam_beta2 == 0.95 and run.optim.clip_grad == 1.0
    assert run.init.seed == 1337 and run.init.init_std == 0.006
    assert run.parallel.dist_backend == "nccl" and run.parallel.timeout_minute == 10.0
    assert run.utils.profile_ranks == (0,) and run.utils.report_memory_usage is True


def test_spec_fields_all_present():
    """Every field name in the spec's tables exists in the schema group it is listed under."""
    spec = (ROOT.parent / "shared/spec/configuration.md")
    if not spec.exists():
        pytest.skip("shared/spec is not beside this checkout")
    group = None
    for line in spec.read_text().splitlines():
        if line.startswith("### "):
            group = line[4:].strip()
        elif line.startswith("#### positional_embedding"):
            group = "positional_embedding"
        elif line.startswith("| `") and group:
            name = line.split("`")[1]
            cls = ModelConfig.__dataclass_fields__["positional_embedding"].default_factory if group == "positional_embedding" else GROUPS[group]
            assert name in {f.name for f in dataclasses.fields(cls)}, f"{group}.{name} missing"


def test_preset_and_overrides(cfg):
    run = load_config(cfg, ["trainer.micro_batch_size=8", "model.positional_embedding.type=rope", "optim.max_lr=3e-4"])
    assert run.model.d_model == 64  # from the preset
    assert run.trainer.micro_batch_size == 8  # override beats the file
    assert run.model.positional_embedding.type == "rope"
    assert run.optim.max_lr == 3e-4  # `3e-4` is a YAML string; float fields accept it


def test_override_switches_preset_from_shipped_configs(cfg):
    run = load_config(cfg, ["model=gpt2-medium"])
    assert (run.model.d_model, run.model.num_layers) == (1024, 24)


def test_precedence_preset_file_override(cfg, tmp_path):
    run_file = write(tmp_path / "configs/run2.yaml", "data:\n  config_path: mini_data\n  seq_length: 16\n")
    run = load_config(run_file, ["model=mini"])
    assert run.data.task_type == "sft" and run.data.vocab_size == 1000  # from the data config file
    assert run.data.seq_length == 16  # the file beats its data config
    assert load_config(run_file, ["model=mini", "data.seq_length=8"]).data.seq_length == 8


def test_data_config_path_relative_to_cwd_and_file(cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel_cwd = write(tmp_path / "a.yaml", "model: mini\ndata:\n  config_path: configs/data/mini_data.yaml\n")
    assert load_config(rel_cwd).data.task_type == "sft"
    rel_file = write(tmp_path / "configs/b.yaml", "model: mini\ndata:\n  config_path: data/mini_data.yaml\n")
    monkeypatch.chdir("/")
    assert load_config(rel_file).data.task_type == "sft"


def test_env_expansion(cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("IC_RUNS", "/scratch/runs")
    monkeypatch.delenv("IC_UNSET", raising=False)
    f = write(tmp_path / "configs/env.yaml", "trainer:\n  model_path: ${IC_RUNS}/x\n  model_name: ${IC_UNSET:-fallback}\n")
    run = load_config(f)
    assert run.trainer.model_path == "/scratch/runs/x" and run.trainer.model_name == "fallback"
    with pytest.raises(ConfigError, match=r"trainer.model_path: environment variable IC_UNSET is not set"):
        load_config(f, ["trainer.model_path=${IC_UNSET}"])


@pytest.mark.parametrize(
    "fields,world,expected",
    [
        ({"micro_batch_size": 4, "train_batch_size": 32}, 2, (32, 4)),
        ({"micro_batch_size": 4, "gradient_accumulation_steps": 3}, 2, (24, 3)),
        ({"micro_batch_size": 4}, 4, (16, 1)),
        ({"micro_batch_size": 4, "train_batch_size": 480, "gradient_accumulation_steps": 60}, 2, (480, 60)),
    ],
)
def test_batch_arithmetic(fields, world, expected):
    run = load_config(None, [f"trainer.{k}={v}" for k, v in fields.items()], world_size=world)
    assert (run.trainer.train_batch_size, run.trainer.gradient_accumulation_steps) == expected
    assert run.parallel.world_size == world


def test_world_size_from_launch_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    run = load_config(None, ["trainer.micro_batch_size=2", "trainer.train_batch_size=8"])
    assert (run.parallel.world_size, run.parallel.rank, run.trainer.gradient_accumulation_steps) == (2, 1, 2)


def test_every_shipped_yaml_loads():
    """Each preset and example validates; the spec example is a 2-rank config (4 x 60 x 2 = 480)."""
    for preset in sorted((ROOT / "configs/model").glob("*.yaml")):
        load_config(None, [f"model={preset.stem}"])
    for data in sorted((ROOT / "configs/data").glob("*.yaml")):
        load_config(None, [f"data.config_path={data}"])
    run = load_config(ROOT / "configs/example.yaml", world_size=2)
    assert run.model.d_model == 768 and run.trainer.train_batch_size == 480
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        load_config(example)


def test_resolved_config_round_trips(cfg):
    from ironcore.config import config_from_dict

    run = load_config(cfg)
    assert config_from_dict(config_to_dict(run)) == run


def test_config_reference_is_generated_from_schema():
    assert README.read_text() == updated(README.read_text()), "run: python -m ironcore.config.docs"


def test_cli_prints_every_field_as_json(cfg, capsys):
    assert main(["config", str(cfg), "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == set(GROUPS)
    for group, cls in GROUPS.items():
        assert set(printed[group]) == {f.name for f in dataclasses.fields(cls)}


def test_installed_package_finds_shipped_presets(tmp_path):
    """A non-editable install run from an unrelated directory still resolves `model: gpt2-small`."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "--target", str(target), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere / "run.yaml", "model: gpt2-small\ndata: builtin_pretrain\n")
    code = "from ironcore.config import load_config; r = load_config('run.yaml'); print(r.model.d_model, r.data.task_type)"
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env={"PYTHONPATH": str(target), "PATH": "/usr/bin"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["768", "pretrain"], out.stderr


BAD_INPUTS = [
    ("unknown group", "trainr:\n  micro_batch_size: 2\n", [], r"unknown group 'trainr'; did you mean 'trainer'"),
    ("unknown field", "trainer:\n  micro_batch_sise: 2\n", [], r"trainer: unknown field 'micro_batch_sise'; did you mean 'micro_batch_size'"),
    ("wrong type int", "trainer:\n  micro_batch_size: four\n", [], r"trainer.micro_batch_size: expected an integer, got str 'four'"),
    ("wrong type bool", 'trainer:\n  use_flash_attn: "maybe"\n', [], r"trainer.use_flash_attn: expected true or false"),
    ("negative steps", "operation:\n  train_steps: -5\n", [], r"operation.train_steps: -5 is out of range; expected >= 1"),
    ("negative size", "trainer:\n  micro_batch_size: 0\n", [], r"trainer.micro_batch_size: 0 is out of range"),
    ("dropout >= 1", "model:\n  dropout_attn: 1.0\n", [], r"model.dropout_attn: 1.0 is out of range; expected < 1"),
    ("splits sum", "data:\n  splits: [0.5, 0.2, 0.1]\n", [], r"data.splits: .* must be non-negative and sum to 1"),
    ("negative ratio", "data:\n  train_datasets:\n    - dataset_path: x.jsonl\n      ratio: -1\n", [], r"data.train_datasets\[0\].ratio: -1.0 is out of range"),
    ("precision typo", "model:\n  precision: bf17\n", [], r"model.precision: 'bf17' is not one of .*did you mean 'bfloat16'"),
    ("ln_type typo", "model:\n  ln_type: rmsnrom\n", [], r"model.ln_type: 'rmsnrom' is not one of .*did you mean 'rmsnorm'"),
    ("pe type typo", "model:\n  positional_embedding:\n    type: rotary\n", [], r"model.positional_embedding.type: 'rotary' is not one of"),
    ("scheduler typo", "optim:\n  lr_scheduler: cosin\n", [], r"optim.lr_scheduler: 'cosin' is not one of .*did you mean 'cosine'"),
    ("fsdp strategy typo", "parallel:\n  fsdp_sharding_strategy: fulll\n", [], r"parallel.fsdp_sharding_strategy: 'fulll' is not one of"),
    ("heads vs groups", "model:\n  num_attention_heads: 8\n  num_attention_groups: 3\n", [], r"model.num_attention_groups=3 must divide model.num_attention_heads=8"),
    ("rope odd head_dim", "model:\n  head_dim: 33\n  positional_embedding:\n    type: rope\n", [], r"model.head_dim=33 must be even for model.positional_embedding.type=rope"),
    ("missing preset", "model: gpt5-huge\n", [], r"model: no preset named 'gpt5-huge'; available: .*gpt2-small"),
    ("missing config_path", "data:\n  config_path: nowhere/data.yaml\n", [], r"data.config_path: file 'nowhere/data.yaml' not found"),
    ("yaml syntax", "trainer:\n  micro_batch_size: [2\n", [], r"run.yaml:\d+: YAML syntax error"),
    ("empty file", "", [], r"run.yaml: the file is empty"),
    ("python tag", "trainer: !!python/object:os.system {}\n", [], r"run.yaml:1: tag not allowed"),
    ("batch arithmetic", "trainer:\n  micro_batch_size: 4\n  train_batch_size: 480\n  gradient_accumulation_steps: 60\n", [],
     r"trainer.train_batch_size: 480 != micro_batch_size 4 x gradient_accumulation_steps 60 x dp_size 1 .* = 240"),
    ("fsdp + deepspeed", "parallel:\n  use_fsdp: true\n  deepspeed_config: zero2\n", [], r"parallel.use_fsdp and parallel.deepspeed_config='zero2' are both set: FSDP and DeepSpeed cannot be combined"),
    ("pipeline parallel", "trainer:\n  pipeline_model_parallel_size: 2\n", [], r"trainer.pipeline_model_parallel_size=2: pipeline parallelism is not supported .* FSDP .* ZeRO-3"),
    ("malformed override", "", ["trainer.micro_batch_size"], r"override 'trainer.micro_batch_size': expected GROUP.FIELD=VALUE"),
    ("override unknown group", "", ["trainr.x=1"], r"unknown group 'trainr'"),
]


@pytest.mark.parametrize("name,text,overrides,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, name, text, overrides, message):
    path = tmp_path / "run.yaml"
    path.write_text(text if text or name == "empty file" else "trainer:\n  micro_batch_size: 2\n")
    assert main(["config", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: ")
    import re

    assert re.search(message, err), err


def test_bad_input_real_process_exit_code(tmp_path):
    path = write(tmp_path / "run.yaml", "trainer:\n  micro_batch_size: four\n")
    proc = subprocess.run([sys.executable, "-m", "ironcore.cli", "config", str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
