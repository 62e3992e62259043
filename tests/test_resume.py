"""Exact resume end to end through `ironcore train` on one CPU process (issue #6).

Every run is a real subprocess on the tiny fp32 model (helpers_dist) with dropout 0.1 in every dropout field
(the spec's default), so a resume must also continue the RNG stream exactly (issue 11). The uninterrupted
reference trains 6 optimizer steps of 4 rows x 2 accumulation steps; the interrupted runs are stopped by
operation.exit_interval, by SIGKILL inside a checkpoint save and inside an optimizer step (test-only hooks in
the helpers_dist wrapper), then relaunched on the same run directory. Every logged loss (metrics.jsonl, also
the records a relaunch logs again), eval loss and per-step sample ids (trainer.log_sample_ids) must equal the
reference bitwise. Runs are launched once per module and read by several tests.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
import torch
from helpers_dist import (
    BASELINE, DROPOUT, SFT, STEPS, assert_bitwise_equal, assert_continued, checkpoints, interrupted_run, latest, losses,
    read_jsonl, run, samples, shared_run, stub_config,
)
from helpers_train import reset_accelerate, restored_environ

from ironcore.checkpoint import check_compatible
from ironcore.config import load_config
from ironcore.config.resolve import resolve
from ironcore.config.schema import DataConfig, ModelConfig, RunConfig, TrainerConfig
from ironcore.errors import CheckpointError
from ironcore.loop import RESUME_IGNORED_MODEL_FIELDS, build_loop, checkpoint_model_config, resume

RESUME = [*BASELINE, *DROPOUT]
SFT_RUN = [*SFT, *DROPOUT, f"operation.train_steps={STEPS}", "trainer.micro_batch_size=4",
           "trainer.gradient_accumulation_steps=2", "trainer.save_checkpoint_steps=2"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """The uninterrupted pretrain run with dropout, the newest 2 checkpoints kept."""
    return shared_run(tmp_path_factory, "pretrain-dropout",
                      lambda d: run(d, [*RESUME, "trainer.keep_last_checkpoints=2"], fresh=True))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict:
    """Stopped by exit_interval after step 3, killed inside the save of step 4, killed inside step 5, finished."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    stopped, save_killed, step_killed, finished = interrupted_run(run_dir, RESUME)
    return {"run_dir": run_dir, "stopped": stopped, "save_killed": save_killed, "step_killed": step_killed,
            "finished": finished}


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "export")
    return dst


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_exit_interval_stops_after_saving_that_step(interrupted):
    state = interrupted["stopped"]
    assert state["steps"] == [1, 2, 3]
    assert state["checkpoints"] == ["step_2", "step_3"] and state["latest"] == "step_3"


def test_sigkill_inside_a_save_leaves_the_previous_checkpoint_latest(interrupted):
    state = interrupted["save_killed"]
    assert state["steps"] == [4]  # resumed after step 3
    assert state["checkpoints"] == ["step_2", "step_3"] and state["latest"] == "step_3"
    assert state["tmp"] == [".tmp-step_4"]  # the killed save never got a step_* name


def test_relaunch_after_a_killed_save_resumes_from_the_last_complete_checkpoint(interrupted):
    state = interrupted["step_killed"]
    assert state["steps"] == [4]  # step 3's checkpoint again, not a fresh start
    assert state["checkpoints"] == ["step_2", "step_3", "step_4"] and state["latest"] == "step_4"
    assert state["tmp"] == []  # the next save removed what the killed one left
    assert interrupted["finished"]["steps"] == [5, 6]  # the kill inside step 5 lost only that step


def test_interrupted_three_ways_with_dropout_equals_the_uninterrupted_run_bitwise(interrupted, baseline):
    assert_bitwise_equal(interrupted["run_dir"], baseline)


def test_sample_ids_are_the_global_batch_of_each_step(baseline):
    steps = samples(baseline)
    assert sorted(steps) == list(range(1, STEPS + 1))
    ids = [i for step in steps.values() for i in step]
    assert all(len(step) == 8 for step in steps.values())  # 4 rows x 2 accumulation steps x 1 process
    assert len(set(ids)) == len(ids)  # no row twice within the first epoch


def test_retention_keeps_exactly_k_checkpoints(baseline):
    assert checkpoints(baseline) == ["step_4", "step_6"] and latest(baseline) == "step_6"


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(baseline, tmp_path):
    run_dir = copy_of(baseline, tmp_path / "run")
    weights = run_dir / "checkpoints" / "step_6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = len(read_jsonl(run_dir / "metrics.jsonl"))
    result = run(run_dir, RESUME)
    assert "step_6" in result.output and "truncated" in result.output  # the skipped checkpoint is named
    resumed = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")[before:] if "loss" in r]
    assert resumed == [5, 6]
    assert losses(run_dir) == losses(baseline)


def test_no_usable_checkpoint_is_one_clear_error(baseline, tmp_path):
    run_dir = copy_of(baseline, tmp_path / "run")
    for name in ("step_4", "step_6"):
        weights = run_dir / "checkpoints" / name / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    result = run(run_dir, RESUME, check=False)
    assert result.returncode == 2, result.output[-2000:]
    assert "Traceback" not in result.output
    [line] = error_lines(result.output)
    assert "none is usable" in line and "step_4" in line and "step_6" in line


def test_resume_with_another_model_is_refused_naming_the_field(baseline, tmp_path):
    run_dir = copy_of(baseline, tmp_path / "run")
    result = run(run_dir, [*RESUME, "model.d_model=96", "model.dropout_attn=0.2"], check=False)
    assert result.returncode == 2, result.output[-2000:]
    assert "Traceback" not in result.output
    [line] = error_lines(result.output)
    assert "d_model (checkpoint 64, run 96)" in line
    assert "dropout" not in line  # dropout changes no weight: never a reason to refuse


@pytest.mark.parametrize("load_optim", [True, False])
def test_resume_loads_the_optimizer_state_as_configured(baseline, tmp_path, load_optim):
    """optim.load_checkpoint_optim_state reaches the resume: the latest checkpoint's Adam moments, or none at all
    (the weights and the step are resumed either way)."""
    run_dir = copy_of(baseline, tmp_path / "run")
    cfg = load_config(stub_config(tmp_path), [*RESUME, f"trainer.model_path={run_dir}",
                                              f"optim.load_checkpoint_optim_state={str(load_optim).lower()}"])
    reset_accelerate()
    with restored_environ():
        loop, loader = build_loop(cfg, run_dir)
        step = resume(cfg, run_dir, loop.accelerator, loader, loop.model)
    saved = torch.load(run_dir / "checkpoints" / "step_6" / "optimizer.bin", weights_only=True)["state"]
    state = loop.optimizer.state_dict()["state"]
    assert step == STEPS and saved
    if load_optim:
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[k]["exp_avg_sq"], saved[k]["exp_avg_sq"]) for k in saved)
    else:
        assert state == {}


def test_saved_model_config_holds_the_padded_vocab_and_ignores_dropout():
    run_cfg = resolve(RunConfig(model=ModelConfig(d_model=64), data=DataConfig(vocab_size=2000),
                                trainer=TrainerConfig(vocab_padding_unit=64)))
    saved = {"step": 4, "model_config": checkpoint_model_config(run_cfg)}
    assert saved["model_config"]["vocab_size"] == 2048
    other_dropout = replace(run_cfg, model=replace(run_cfg.model, dropout_attn=0.3, dropout_mlp=0.0, dropout_embd=0.2))
    check_compatible(saved, checkpoint_model_config(other_dropout), 1, ignore=RESUME_IGNORED_MODEL_FIELDS)
    other_vocab = resolve(replace(run_cfg, data=replace(run_cfg.data, vocab_size=2100)))
    with pytest.raises(CheckpointError, match=r"vocab_size \(checkpoint 2048, run 2112\)"):
        check_compatible(saved, checkpoint_model_config(other_vocab), 1, ignore=RESUME_IGNORED_MODEL_FIELDS)


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory) -> tuple[Path, Path]:
    """SFT with packing and dropout: uninterrupted, and interrupted the three ways (`interrupted_run`)."""
    base = tmp_path_factory.mktemp("sft")
    reference, interrupted_dir = base / "reference", base / "interrupted"
    run(reference, SFT_RUN, fresh=True)
    launches = interrupted_run(interrupted_dir, SFT_RUN)
    assert [launch["steps"] for launch in launches] == [[1, 2, 3], [4], [4], [5, 6]]
    return reference, interrupted_dir


def test_sft_with_packing_resumes_bitwise(sft_runs):
    reference, stopped = sft_runs
    config = yaml.safe_load((stopped / "config.yaml").read_text())
    assert config["data"]["task_type"] == "sft" and config["data"]["pack_sequences"] is True
    assert config["trainer"]["gradient_accumulation_steps"] == 2
    assert config["model"]["dropout_attn"] == 0.1
    assert_bitwise_equal(stopped, reference)
