"""The CPU quickstarts (examples/*.yaml) run as a user runs them (`ironcore train examples/X.yaml`), at their real
model size, with fewer steps to keep CI short, and learn: the loss falls clearly, and DPO prefers the chosen answer
on held-out pairs. The full-length runs are timed by hand (see the PR); only the step counts differ here.
"""

from __future__ import annotations

import pytest

from helpers_train import CACHE, REPO, read_metrics, reset_accelerate, restored_environ, series
from ironcore import cli


def quickstart(name: str, run_dir, *overrides: str) -> list[dict]:
    """`ironcore train examples/<name>.yaml --fresh` in process, into `run_dir`, with the repo's cache."""
    args = ["train", str(REPO / "examples" / f"{name}.yaml"), f"trainer.model_path={run_dir}",
            f"data.cache_dir={CACHE}", *overrides, "--fresh"]
    reset_accelerate()
    with restored_environ():
        assert cli.main(args) == 0
    assert (run_dir / "export" / "model.safetensors").is_file()
    return read_metrics(run_dir)


def test_pretrain_quickstart_loss_falls(tmp_path):
    records = quickstart("pretrain", tmp_path / "run", "operation.train_steps=60", "trainer.log_interval=5",
                         "operation.eval_interval=60", "trainer.save_checkpoint_steps=60")
    losses = series(records, "loss")
    assert losses[5] > 7.0 and losses[60] < losses[5] - 1.0
    assert series(records, "eval/loss")[60] < 6.5


def test_sft_quickstart_loss_falls(tmp_path):
    records = quickstart("sft", tmp_path / "run", "operation.train_steps=40", "trainer.log_interval=5",
                         "operation.eval_interval=40", "trainer.save_checkpoint_steps=40")
    losses = series(records, "loss")
    assert losses[40] < losses[5] - 1.0
    assert 0 < series(records, "eval/token_accuracy")[40] <= 1


def test_dpo_quickstart_prefers_chosen_on_held_out_pairs(tmp_path):
    records = quickstart("dpo", tmp_path / "run", "operation.train_steps=40", "trainer.log_interval=5",
                         "operation.eval_interval=40", "trainer.save_checkpoint_steps=40")
    losses = series(records, "loss")
    assert losses[5] == pytest.approx(0.69, abs=0.05) and losses[40] < losses[5]
    assert series(records, "eval/reward_accuracy")[40] > 0.5
