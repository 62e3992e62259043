"""`ironcore export` and `ironcore generate` given a broken model directory, checkpoint or `--out`: one `error:` line
naming the file, exit code 2, and nothing written.

One tiny pretrain run (2 steps, a checkpoint at step 2) gives the real export directory and checkpoint; each test
copies what it breaks. The export and generate paths that work are tested in test_train.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers_train import REPO, cli_errors, load_example, train_in_process


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The run directory of a finished 2-step tiny run: config.yaml, checkpoints/step_2, export/."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    train_in_process(load_example("pretrain", run_dir, "operation.train_steps=2", "trainer.save_checkpoint_steps=2",
                                  "optim.warmup_steps=1", "trainer.do_eval=false", "operation.test_samples=0"))
    return run_dir


def model_copy(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished / "export", tmp_path / "model"))


def command(name: str, model: Path, out: Path) -> list[str]:
    if name == "export":
        return ["export", str(model), "--out", str(out)]
    return ["generate", str(model), "--prompt", "def ", "--max-new-tokens", "4"]


def damage(file: Path, how: str) -> None:
    """Break a weight file the ways a disk, a copy or a download does."""
    if how == "truncated":
        os.truncate(file, file.stat().st_size // 2)
    elif how == "garbage":
        file.write_bytes(os.urandom(4096))
    else:
        file.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("name", ["export", "generate"])
def test_corrupt_weights_are_one_line(finished, tmp_path, capsys, name, how):
    model = model_copy(finished, tmp_path)
    damage(model / "model.safetensors", how)
    code, errors = cli_errors(command(name, model, tmp_path / "out"), capsys)
    assert code == 2 and len(errors) == 1, errors
    assert str(model / "model.safetensors") in errors[0] and "truncated or corrupt" in errors[0]
    assert not (tmp_path / "out").exists()


def test_generate_on_corrupt_weights_real_process(finished, tmp_path):
    """The installed entry point, as a user runs it: exit code 2, one line, no prompt waiting on stdin."""
    model = model_copy(finished, tmp_path)
    damage(model / "model.safetensors", "truncated")
    proc = subprocess.run([sys.executable, "-m", "ironcore.cli", *command("generate", model, tmp_path)],
                          capture_output=True, text=True, cwd=REPO, stdin=subprocess.DEVNULL, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.safetensors" in errors[0] and proc.stdout == ""


@pytest.mark.parametrize("removed", [("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"),
                                     ("tokenizer.json",)], ids=["all", "tokenizer.json"])
@pytest.mark.parametrize("name", ["export", "generate"])
def test_missing_tokenizer_files_are_one_line(finished, tmp_path, capsys, name, removed):
    model = model_copy(finished, tmp_path)
    for file in removed:
        (model / file).unlink()
    code, errors = cli_errors(command(name, model, tmp_path / "out"), capsys)
    assert code == 2 and len(errors) == 1, errors
    assert str(model) in errors[0] and "tokenizer" in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["is a file", "is under a file"])
def test_out_naming_a_file_is_one_line(finished, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("mine")
    out = blocker if where == "is a file" else blocker / "export"
    code, errors = cli_errors(["export", str(finished), "--out", str(out)], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert f"--out {out}" in errors[0] and where.split()[-1] in errors[0]
    assert blocker.read_text() == "mine"


def test_checkpoint_exports_with_its_run_config(finished, tmp_path, capsys):
    """The control for the broken-config cases below: the same copied checkpoint exports as is."""
    run_dir = Path(shutil.copytree(finished, tmp_path / "run"))
    code, errors = cli_errors(["export", str(run_dir / "checkpoints" / "step_2"), "--out", str(tmp_path / "out")],
                              capsys)
    assert code == 0 and not errors
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()


def break_config(config: Path, how: str) -> None:
    text = config.read_text()
    if how == "syntax":
        config.write_text(text + "trainer: [1\n")
    elif how == "duplicate key":
        config.write_text(text + "model:\n  d_model: 8\n")  # a second `model` group: today the later one wins
    elif how == "binary":
        config.write_bytes(b"\x00\x01" + os.urandom(64))
    elif how == "invalid value":
        raw = yaml.safe_load(text)
        raw["trainer"]["micro_batch_size"] = "four"
        config.write_text(yaml.safe_dump(raw))
    else:
        raw = yaml.safe_load(text)
        del raw["parallel"]["world_size"]
        config.write_text(yaml.safe_dump(raw))


@pytest.mark.parametrize("how,reason", [
    ("syntax", r"config.yaml:\d+: YAML syntax error"),
    ("duplicate key", r"config.yaml:\d+: key 'model' is given twice"),
    ("binary", r"config.yaml: a binary file"),
    ("invalid value", r"config.yaml: trainer.micro_batch_size: expected an integer"),
    ("no world size", r"config.yaml: parallel.world_size: missing"),
], ids=["syntax", "duplicate key", "binary", "invalid value", "no world size"])
def test_checkpoint_whose_run_config_is_broken(finished, tmp_path, capsys, how, reason):
    run_dir = Path(shutil.copytree(finished, tmp_path / "run"))
    break_config(run_dir / "config.yaml", how)
    code, errors = cli_errors(["export", str(run_dir / "checkpoints" / "step_2"), "--out", str(tmp_path / "out")],
                              capsys)
    assert code == 2 and len(errors) == 1, errors
    assert str(run_dir / "config.yaml") in errors[0] and re.search(reason, errors[0]), errors[0]
    assert not (tmp_path / "out").exists()


def test_generating_past_the_models_context_is_one_line(finished, capsys):
    """The tiny model has 64 positions (absolute embeddings): 4 prompt tokens + 64 new ones would index past them."""
    code, errors = cli_errors(["generate", str(finished / "export"), "--prompt", "def ", "--max-new-tokens", "64"], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert "--max-new-tokens 64" in errors[0] and "context of 64 positions" in errors[0]
    assert cli_errors(["generate", str(finished / "export"), "--prompt", "def ", "--max-new-tokens", "8"], capsys) == (0, [])


def test_arch_source_of_a_run_from_scratch_and_arch_the_model_cannot_be(finished, tmp_path, capsys):
    """`--arch source` needs a run fine-tuned from a checkpoint; a GPT-2-shaped run is no Mistral or Qwen2. One line
    each, nothing written. (Runs from a checkpoint export as its source: tests/test_models_hub.py.)"""
    out = tmp_path / "out"
    code, errors = cli_errors(["export", str(finished), "--out", str(out), "--arch", "source"], capsys)
    assert code == 2 and len(errors) == 1 and "--arch source needs the run's init.from_pretrained" in errors[0], errors
    for arch, target in (("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM")):
        code, errors = cli_errors(["export", str(finished), "--out", str(out), "--arch", arch], capsys)
        assert code == 2 and len(errors) == 1, errors
        assert f"cannot convert to {target}: model.positional_embedding.type=absolute (needs rope)" in errors[0]
    assert not out.exists()
