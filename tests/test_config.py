"""The config spine: loading, presets, overrides, precedence, derived values, docs, and every bad input."""

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from ironcore.cli import main
from ironcore.config import GROUPS, config_to_dict, load_config
from ironcore.config.docs import README, updated
from ironcore.config.load import read_yaml
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
        if (yaml.safe_load(example.read_text()).get("init") or {}).get("from_pretrained"):
            continue  # starts from a Hub checkpoint: tests/test_examples.py loads it from a local Hub cache
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
    assert set(printed) == {*GROUPS, "derived"}
    for group, cls in GROUPS.items():
        assert set(printed[group]) == {f.name for f in dataclasses.fields(cls)}


def cli_output(capsys, *argv: str) -> dict:
    """Run `ironcore config ...` in-process and parse what it printed (YAML or JSON)."""
    assert main(["config", *argv]) == 0
    out = capsys.readouterr().out
    return json.loads(out) if "json" in argv else yaml.safe_load(out)


def test_cli_yaml_explain_shows_every_group_and_what_a_deepspeed_launch_uses(cfg, capsys):
    from ironcore.models import IronCoreConfig, IronCoreForCausalLM

    overrides = ["parallel.deepspeed_config=zero2", "optim.clip_grad=0.3"]
    argv = [str(cfg), "--world-size", "2", "--explain", *overrides]
    printed = cli_output(capsys, *argv, "--format", "yaml")
    assert set(printed) == {*GROUPS, "derived", "explain"}
    for group, cls in GROUPS.items():
        assert set(printed[group]) == {f.name for f in dataclasses.fields(cls)}, group
    assert printed["parallel"]["world_size"] == 2 and printed["trainer"]["train_batch_size"] == 8  # 4 x 1 x 2
    explained = printed["explain"]
    assert explained["batch"]["formula"].startswith("4 micro x 1 accumulation x 2 data-parallel = 8")
    accelerator = explained["accelerator"]
    assert (accelerator["distributed_type"], accelerator["num_processes"]) == ("DEEPSPEED", 2)
    assert (accelerator["mixed_precision"], accelerator["gradient_accumulation_steps"]) == ("bf16", 1)
    ds = explained["deepspeed"]
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 4, 1)
    assert ds["gradient_clipping"] == 0.3 and ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]
    assert explained["fsdp"] is None
    estimate = explained["estimate"]
    with torch.device("meta"):
        model = IronCoreForCausalLM(IronCoreConfig.from_run_config(load_config(cfg, overrides, world_size=2)))
    assert estimate["parameters"]["total"] == model.num_parameters()
    assert estimate["flops_per_token"] > 6 * estimate["parameters"]["non_embedding"]
    memory = estimate["memory_bytes"]
    parts = ("weights", "gradients", "optimizer", "activations", "logits")
    assert all(memory[part] > 0 for part in parts)
    assert memory["device_total"] == sum(memory[part] for part in parts) - memory["offloaded_to_host"]
    assert estimate["sharding"]["zero_stage"] == 2 and estimate["sharding"]["shard_size"] == 2
    assert cli_output(capsys, *argv, "--format", "json") == printed  # both formats print the same report


def test_cli_json_explain_shows_fsdp_settings(cfg, capsys):
    printed = cli_output(capsys, str(cfg), "--format", "json", "--world-size", "2", "--explain", "parallel.use_fsdp=true",
                         "parallel.fsdp_state_dict_type=sharded")
    assert set(printed) == {*GROUPS, "derived", "explain"}
    explained = printed["explain"]
    assert explained["accelerator"]["distributed_type"] == "FSDP" and explained["deepspeed"] is None
    fsdp = explained["fsdp"]
    assert fsdp["state_dict_type"] == "SHARDED_STATE_DICT" and fsdp["cpu_offload"] is False
    assert fsdp["reshard_after_forward"] is True and fsdp["hsdp"] is None
    assert explained["estimate"]["sharding"]["engine"] == "fsdp"
    assert "explain" not in cli_output(capsys, str(cfg), "--format", "json")  # only with --explain


def test_cli_writes_an_accelerate_config_file(cfg, tmp_path, capsys, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU launch on any machine
    out = tmp_path / "launch" / "accelerate.yaml"
    printed = cli_output(capsys, str(cfg), "--world-size", "2", "--write-accelerate-config", str(out))
    assert set(printed) == {*GROUPS, "derived"}  # the resolved config is still printed
    written = yaml.safe_load(out.read_text())
    assert written["compute_environment"] == "LOCAL_MACHINE"
    assert (written["distributed_type"], written["num_processes"], written["num_machines"]) == ("MULTI_GPU", 2, 1)
    assert (written["mixed_precision"], written["use_cpu"]) == ("bf16", True)
    assert "deepspeed_config" not in written and "fsdp_config" not in written
    launch = load_config_from_file(str(out))  # what `accelerate launch --config_file` reads
    assert (launch.distributed_type.value, launch.num_processes, launch.use_cpu) == ("MULTI_GPU", 2, True)

    ds_out = tmp_path / "ds.yaml"
    cli_output(capsys, str(cfg), "--world-size", "2", "--write-accelerate-config", str(ds_out),
               "parallel.deepspeed_config=zero3")
    written = yaml.safe_load(ds_out.read_text())
    assert written["distributed_type"] == "DEEPSPEED" and "mixed_precision" not in written
    ds_file = Path(written["deepspeed_config"]["deepspeed_config_file"])
    assert ds_file == (tmp_path / "ds.deepspeed.json").resolve() and written["deepspeed_config"]["zero3_init_flag"]
    assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == 3
    assert load_config_from_file(str(ds_out)).distributed_type.value == "DEEPSPEED"


def test_preset_lookup_order_file_tree_then_cwd_then_packaged(tmp_path, monkeypatch):
    """`model: NAME` is looked up in the run file's own configs/ tree, then ./configs, then the packaged presets."""
    cwd = tmp_path / "cwd"
    write(cwd / "configs/model/gpt2-small.yaml", "d_model: 96\n")
    write(cwd / "configs/model/cwd-only.yaml", "d_model: 80\n")
    project = tmp_path / "project/configs"
    write(project / "model/gpt2-small.yaml", "d_model: 112\n")
    write(project / "model/other.yaml", "d_model: 48\n")  # a tree of its own, without cwd-only
    in_tree = write(project / "run.yaml", "model: gpt2-small\n")
    tree_miss = write(project / "run_cwd.yaml", "model: cwd-only\n")
    loose = write(tmp_path / "loose/run.yaml", "model: gpt2-small\n")  # no configs/ tree above it

    monkeypatch.chdir(cwd)
    assert load_config(tree_miss).model.d_model == 80  # not in the file's tree: the cwd's
    assert load_config(loose).model.d_model == 96  # the cwd's shadows the packaged preset
    assert load_config(None, ["model=gpt2-small"]).model.d_model == 96
    assert load_config(in_tree).model.d_model == 112  # the file's own tree shadows the cwd's
    with pytest.raises(ConfigError, match="no preset named 'other'"):  # another tree's presets are never seen
        load_config(loose, ["model=other"])

    monkeypatch.chdir(tmp_path / "loose")
    assert load_config(loose).model.d_model == 768  # nothing local: the packaged preset
    assert load_config(in_tree).model.d_model == 112
    with pytest.raises(ConfigError, match="no preset named 'cwd-only'"):
        load_config(loose, ["model=cwd-only"])


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
    ("duplicate field", "trainer:\n  micro_batch_size: 2\n  log_interval: 5\n  micro_batch_size: 4\n", [],
     r"run.yaml:4: key 'micro_batch_size' is given twice in one mapping \(first on line 2\)"),
    ("duplicate group", "model: gpt2-small\ntrainer:\n  micro_batch_size: 2\nmodel: tiny-gpt2\n", [],
     r"run.yaml:4: key 'model' is given twice in one mapping \(first on line 1\)"),
    ("duplicate nested key", "model:\n  positional_embedding: {type: rope, type: absolute}\n", [],
     r"run.yaml:2: key 'type' is given twice"),
    ("duplicate key in override", "", ["model.positional_embedding={type: rope, type: absolute}"],
     r"override 'model.positional_embedding=.*': key 'type' is given twice"),
    ("control character", "trainer:\n  model_name: a\x01b\n", [], r"run.yaml: character U\+0001 at offset 24 is not allowed"),
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


@pytest.mark.parametrize("content,message", [
    (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), r"run.yaml: a binary file \(NUL byte at offset 7\)"),
    ("trainer:\n  model_name: caf\xe9\n".encode("latin-1"), r"run.yaml: not UTF-8 text \(byte 0xe9 at offset 26\)"),
], ids=["binary", "latin-1"])
def test_binary_or_non_utf8_config_is_one_line(tmp_path, capsys, content, message):
    import re

    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    assert main(["config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}") and re.search(message, err), err


@pytest.mark.parametrize("where", ["preset", "data config"])
def test_duplicate_key_in_a_preset_or_data_config_names_that_file(cfg, tmp_path, where):
    """Every YAML file a run reads is strict, not only the run file: the error names the file and the line."""
    if where == "preset":
        bad = write(tmp_path / "configs/model/twice.yaml", "d_model: 64\nnum_layers: 2\nd_model: 128\n")
        run_file = write(tmp_path / "configs/r.yaml", "model: twice\n")
    else:
        bad = write(tmp_path / "configs/data/twice.yaml", "seq_length: 32\ntask_type: sft\nseq_length: 64\n")
        run_file = write(tmp_path / "configs/r.yaml", "model: mini\ndata:\n  config_path: twice\n")
    with pytest.raises(ConfigError) as caught:
        load_config(run_file)
    assert str(caught.value).startswith(f"{bad}:3: key ") and "given twice" in str(caught.value)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    """The strict loader compares a mapping's own keys only: a key that `<<: *base` brought in may be given again."""
    path = write(tmp_path / "run.yaml", "a: &b {p: 1, q: 2}\nb:\n  <<: *b\n  p: 3\n")
    assert read_yaml(path) == {"a": {"p": 1, "q": 2}, "b": {"p": 3, "q": 2}}


def test_bad_input_real_process_exit_code(tmp_path):
    path = write(tmp_path / "run.yaml", "trainer:\n  micro_batch_size: four\n")
    proc = subprocess.run([sys.executable, "-m", "ironcore.cli", "config", str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- derived values: computed once, by resolution


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_an_entry_level_task_type_is_the_runs_task(task, tmp_path):
    entries = f'data.train_datasets=[{{dataset_path: "builtin:{task}", task_type: {task}}}]'
    run = load_config(None, [entries, f"data.eval_datasets=[{{dataset_path: 'builtin:{task}'}}]"])
    assert run.data.task_type == task


def test_entries_of_several_tasks_are_refused_naming_them():
    entries = 'data.train_datasets=[{dataset_path: "builtin:sft", task_type: sft}, {dataset_path: a.jsonl, task_type: dpo}]'
    with pytest.raises(ConfigError, match=r"data.train_datasets\[0\].task_type=sft, data.train_datasets\[1\].task_type=dpo"):
        load_config(None, [entries])
    with pytest.raises(ConfigError, match=r"data.task_type=pretrain, data.train_datasets\[0\].task_type=sft"):
        load_config(None, ["data.task_type=pretrain", 'data.train_datasets=[{dataset_path: "builtin:sft", task_type: sft}]'])


def test_config_json_shows_every_derived_value(cfg, capsys):
    """One place computes them; `ironcore config` shows them next to the fields they come from."""
    printed = cli_output(capsys, str(cfg), "--format", "json", "--world-size", "2", "data.vocab_size=1000",
                         "trainer.vocab_padding_unit=128", "model.max_seq_len=256", 'data.train_datasets=[{dataset_path: '
                         '"builtin:dpo", task_type: dpo}]', "data.vocab_name_or_path=builtin")
    assert printed["data"]["task_type"] == "dpo" and printed["data"]["seq_length"] == 256
    assert printed["trainer"]["eval_batch_size"] == printed["trainer"]["micro_batch_size"] == 4
    assert printed["parallel"]["world_size"] == 2 and printed["model"]["vocab_name_or_path"] == "builtin"
    assert printed["derived"] == {"data_parallel_size": 2, "padded_vocab_size": 1024, "tokens_per_step": 8 * 256,
                                  "tokenizer_field": "data.vocab_name_or_path", "zero_stage": 0, "model_sources": None}


def test_resolving_a_saved_config_gives_the_same_derived_values(cfg):
    from ironcore.config import config_from_dict

    run = load_config(cfg, ["data.vocab_name_or_path=builtin"])
    again = config_from_dict(config_to_dict(run))
    assert again.derived == run.derived and again.derived.tokenizer_field == "data.vocab_name_or_path"


def test_derived_values_cannot_be_set():
    with pytest.raises(ConfigError, match="unknown group 'derived'"):
        load_config(None, ["derived.padded_vocab_size=64"])


def test_a_pad_id_outside_the_vocabulary_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"data.pad_token_id: 2048 is outside the vocabulary \(data.vocab_size 2048\)"):
        load_config(None, ["data.vocab_size=2048", "data.pad_token_id=2048"])
