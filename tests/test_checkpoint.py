"""Checkpoints: exact resume, optional optimizer/scheduler loading, retention, corruption fallback, a real
SIGKILL mid-save, compatibility refusals, and a 2-process DDP round trip, all with a real Accelerator on CPU."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from helpers_checkpoint import MODEL_CONFIG, build, flat_params, train, train_state
from helpers_train import cli_errors, example_overrides, read_metrics

from ironcore.checkpoint import (
    COMPLETE_MARKER,
    LATEST_FILE,
    TRAIN_STATE_FILE,
    check_compatible,
    find_resume_checkpoint,
    load_checkpoint,
    read_train_state,
    save_checkpoint,
    set_aside,
    verify_checkpoint,
)
from ironcore.errors import CheckpointError

HELPER = Path(__file__).resolve().parent / "helpers_checkpoint.py"
ROOT = HELPER.parent.parent


@pytest.fixture(autouse=True)
def isolated_accelerate_state():
    """accelerate keeps one process-wide state; reset it so these tests neither see nor leak another test's."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def fresh(seed: int):
    """A new Accelerator with a model/optimizer/scheduler prepared on it (weights from `seed`)."""
    accelerator = Accelerator(cpu=True)
    return (accelerator, *build(accelerator, seed))


def saved_run(run_dir: Path, steps: list[int], keep_last: int | None = None) -> None:
    """Train one step between saves, saving at each of `steps`."""
    accelerator, model, optimizer, scheduler = fresh(0)
    for step in steps:
        train(accelerator, model, optimizer, scheduler, 1)
        save_checkpoint(accelerator, run_dir, step, train_state(step), keep_last=keep_last)


def ckpts(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / LATEST_FILE).read_text().strip()


def rng_probe() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_resume_is_bitwise_identical(tmp_path):
    accelerator, model, optimizer, scheduler = fresh(0)
    train(accelerator, model, optimizer, scheduler, 3)
    ckpt = save_checkpoint(accelerator, tmp_path, 3, train_state(3), keep_last=None)
    reference_probe = rng_probe()
    reference = train(accelerator, model, optimizer, scheduler, 3)
    reference_params = flat_params(model)

    accelerator, model, optimizer, scheduler = fresh(1)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    assert flat_params(model) != reference_params
    state = load_checkpoint(accelerator, ckpt, load_optim_state=True, load_lr_scheduler=True, model_config=MODEL_CONFIG)
    assert rng_probe() == reference_probe
    assert train(accelerator, model, optimizer, scheduler, 3) == reference
    assert flat_params(model) == reference_params
    assert state == {**train_state(3), "step": 3, "world_size": 1, "distributed_type": "NO"}


def test_layout_manifest_and_latest(tmp_path):
    saved_run(tmp_path, [1, 2])
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == [LATEST_FILE, "step_1", "step_2"]  # no .tmp-* left behind
    assert latest(tmp_path) == "step_2"
    manifest = json.loads((root / "step_2" / COMPLETE_MARKER).read_text())
    assert manifest["step"] == 2
    assert set(manifest["files"]) == {
        "model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", TRAIN_STATE_FILE
    }
    for rel, entry in manifest["files"].items():
        assert (root / "step_2" / rel).stat().st_size == entry["size"]
        assert len(entry["sha256"]) == 64
    assert read_train_state(root / "step_2")["data_loader"] == {"epoch": 0, "samples_consumed": 8}
    assert find_resume_checkpoint(tmp_path) == root / "step_2"


def test_load_without_optimizer_state_keeps_it_fresh(tmp_path):
    accelerator, model, optimizer, scheduler = fresh(0)
    train(accelerator, model, optimizer, scheduler, 3)
    ckpt = save_checkpoint(accelerator, tmp_path, 3, train_state(3), keep_last=None)
    saved_params, saved_lr = flat_params(model), scheduler.get_last_lr()

    accelerator, model, optimizer, scheduler = fresh(1)
    fresh_groups = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.state_dict()["param_groups"]]
    load_checkpoint(accelerator, ckpt, load_optim_state=False, load_lr_scheduler=True)
    assert optimizer.state_dict()["state"] == {}  # no Adam moments, no step count
    assert [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.state_dict()["param_groups"]] == fresh_groups
    assert flat_params(model) == saved_params
    assert scheduler.scheduler.last_epoch == 3
    assert [g["lr"] for g in optimizer.param_groups] == saved_lr  # the first step uses the resumed schedule


def test_load_without_lr_scheduler_restarts_the_schedule(tmp_path):
    accelerator, model, optimizer, scheduler = fresh(0)
    train(accelerator, model, optimizer, scheduler, 3)
    ckpt = save_checkpoint(accelerator, tmp_path, 3, train_state(3), keep_last=None)
    saved_moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()

    accelerator, model, optimizer, scheduler = fresh(1)
    fresh_lr = scheduler.get_last_lr()
    load_checkpoint(accelerator, ckpt, load_optim_state=True, load_lr_scheduler=False)
    assert scheduler.scheduler.last_epoch == 0
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved_moments)
    assert [g["lr"] for g in optimizer.param_groups] == fresh_lr


def test_retention_keeps_exactly_the_last_k(tmp_path):
    saved_run(tmp_path, [1, 2, 3, 4, 5], keep_last=2)
    assert ckpts(tmp_path) == ["step_4", "step_5"]
    assert latest(tmp_path) == "step_5"


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path):
    saved_run(tmp_path, [5])
    saved_run(tmp_path, [3], keep_last=1)  # e.g. resumed from an older step: the new one wins
    assert ckpts(tmp_path) == ["step_3"]
    assert latest(tmp_path) == "step_3"


def test_saving_an_existing_step_replaces_it(tmp_path):
    saved_run(tmp_path, [1, 2])
    saved_run(tmp_path, [2])
    assert ckpts(tmp_path) == ["step_1", "step_2"]
    verify_checkpoint(tmp_path / "checkpoints" / "step_2")


def test_incomplete_and_truncated_checkpoints_fall_back(tmp_path, caplog):
    saved_run(tmp_path, [1, 2, 3])
    root = tmp_path / "checkpoints"
    (root / "step_3" / COMPLETE_MARKER).unlink()
    weights = root / "step_2" / "optimizer.bin"
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="ironcore.checkpoint"):
        assert find_resume_checkpoint(tmp_path) == root / "step_1"
    assert "step_3" in caplog.text and "no COMPLETE marker" in caplog.text
    assert "step_2" in caplog.text and "optimizer.bin is 100 bytes" in caplog.text


def test_same_size_corruption_is_caught_by_checksum(tmp_path):
    saved_run(tmp_path, [1, 2])
    weights = tmp_path / "checkpoints" / "step_2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert find_resume_checkpoint(tmp_path, verify_checksums=False).name == "step_2"
    assert find_resume_checkpoint(tmp_path).name == "step_1"
    with pytest.raises(CheckpointError, match="model.safetensors does not match its sha256"):
        verify_checkpoint(weights.parent)


def test_all_checkpoints_corrupt_is_a_clear_error(tmp_path):
    saved_run(tmp_path, [1, 2])
    for step in (1, 2):
        (tmp_path / "checkpoints" / f"step_{step}" / "random_states_0.pkl").unlink()
    with pytest.raises(CheckpointError, match=r"has 2 checkpoint\(s\) but none is usable.*step_2: random_states_0.pkl is missing.*step_1"):
        find_resume_checkpoint(tmp_path)


def test_no_checkpoint_yet_means_fresh_start(tmp_path):
    assert find_resume_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints" / ".tmp-step_1").mkdir(parents=True)  # the very first save was killed
    assert find_resume_checkpoint(tmp_path) is None


def test_latest_naming_a_deleted_checkpoint_with_none_left_is_refused(tmp_path):
    """Someone deleted the checkpoints but not the pointer: resuming from scratch silently would retrain and
    overwrite the run, so the search refuses, naming the pointer and what it names."""
    saved_run(tmp_path, [1, 2])
    for name in ckpts(tmp_path):
        shutil.rmtree(tmp_path / "checkpoints" / name)
    with pytest.raises(CheckpointError) as caught:
        find_resume_checkpoint(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'checkpoints' / LATEST_FILE} names step_2") and "--fresh" in message


def test_set_aside_never_overwrites_an_earlier_one(tmp_path):
    """Two fresh starts in the same second each keep what they moved aside."""
    path = tmp_path / "metrics.jsonl"
    moved = []
    for text in ("first\n", "second\n"):
        path.write_text(text)
        moved.append(set_aside(path))
    assert not path.exists() and len(set(moved)) == 2
    assert [p.read_text() for p in moved] == ["first\n", "second\n"]
    assert all(p.name.startswith("metrics.old-") and p.suffix == ".jsonl" for p in moved)


def test_train_refuses_a_dangling_latest_and_a_fresh_start_keeps_the_metrics(tmp_path, capsys, caplog):
    """Through `ironcore train`: a relaunch whose `checkpoints/latest` names a deleted checkpoint (none left) is one
    line and changes nothing; `--fresh` then starts over and moves the earlier metrics.jsonl aside, with a warning."""
    run_dir, config = tmp_path / "run", str(ROOT / "examples" / "pretrain.yaml")
    overrides = example_overrides(run_dir, "operation.train_steps=2", "trainer.save_checkpoint_steps=2",
                                  "optim.warmup_steps=1", "trainer.do_eval=false", "operation.test_samples=0")
    assert cli_errors(["train", config, *overrides], capsys) == (0, [])
    earlier = (run_dir / "metrics.jsonl").read_bytes()
    shutil.rmtree(run_dir / "checkpoints" / "step_2")

    code, errors = cli_errors(["train", config, *overrides, "trainer.resume=true"], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert f"{run_dir / 'checkpoints' / LATEST_FILE} names step_2" in errors[0]
    assert (run_dir / "metrics.jsonl").read_bytes() == earlier  # nothing trained, nothing dropped

    with caplog.at_level(logging.WARNING):
        assert cli_errors(["train", "--fresh", config, *overrides, "trainer.resume=true"], capsys) == (0, [])
    (aside,) = run_dir.glob("metrics.old-*.jsonl")
    assert aside.read_bytes() == earlier
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2]
    assert any(f"moved the earlier metrics.jsonl to {aside}" in r.getMessage() for r in caplog.records)
    assert (run_dir / "checkpoints" / "step_2").is_dir() and len(list(run_dir.glob("checkpoints.old-*"))) == 1


def test_sigkill_mid_save_leaves_the_previous_checkpoint(tmp_path):
    run_dir, signal_file = tmp_path / "run", tmp_path / "mid-save"
    child = subprocess.Popen([sys.executable, str(HELPER), "kill-child", str(run_dir), str(signal_file)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not signal_file.exists():
            assert child.poll() is None, f"child exited with {child.returncode} before reaching the middle of the save"
            assert time.monotonic() < deadline, "child never reached the middle of the save"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
    root = run_dir / "checkpoints"
    assert (root / ".tmp-step_2" / "model.safetensors").is_file()  # killed mid-save, for real
    assert not (root / ".tmp-step_2" / "optimizer.bin").exists()
    assert ckpts(run_dir) == ["step_1"] and latest(run_dir) == "step_1"
    assert find_resume_checkpoint(run_dir) == root / "step_1"

    accelerator, model, optimizer, scheduler = fresh(1)
    assert load_checkpoint(accelerator, root / "step_1", load_optim_state=True, load_lr_scheduler=True)["step"] == 1
    save_checkpoint(accelerator, run_dir, 3, train_state(3), keep_last=None)
    assert sorted(os.listdir(root)) == [LATEST_FILE, "step_1", "step_3"]  # the stale .tmp-step_2 is gone


def test_model_config_mismatch_names_the_fields(tmp_path):
    saved_run(tmp_path, [1])
    ckpt = tmp_path / "checkpoints" / "step_1"
    changed = {**MODEL_CONFIG, "d_hidden": 64, "positional_embedding": {"type": "rope", "base": 10000.0}}
    accelerator, model, optimizer, scheduler = fresh(1)
    before = flat_params(model)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(accelerator, ckpt, load_optim_state=True, load_lr_scheduler=True, model_config=changed)
    message = str(err.value)
    assert "d_hidden (checkpoint 32, run 64)" in message
    assert "positional_embedding.type (checkpoint 'none', run 'rope')" in message
    assert "\n" not in message
    assert flat_params(model) == before  # refused before anything was loaded
    check_compatible(read_train_state(ckpt), changed, 1, ignore=["d_hidden", "positional_embedding.type"])
    check_compatible({"model_config": {"sizes": [1, 2]}}, {"sizes": (1, 2)}, 1)  # compared as JSON reads back


def test_world_size_and_engine_rules(caplog):
    state = {"step": 7, "world_size": 4, "distributed_type": "DEEPSPEED", "model_config": MODEL_CONFIG}
    with pytest.raises(CheckpointError, match="sharded over 4 processes; this run has 2"):
        check_compatible(state, MODEL_CONFIG, 2, distributed_type="DEEPSPEED")
    check_compatible(state, MODEL_CONFIG, 4, distributed_type="DEEPSPEED")
    with pytest.raises(CheckpointError, match="saved with DEEPSPEED; this run uses MULTI_GPU"):
        check_compatible(state, MODEL_CONFIG, 4, distributed_type="MULTI_GPU")
    ddp = {**state, "distributed_type": "MULTI_GPU"}
    with caplog.at_level(logging.WARNING, logger="ironcore.checkpoint"):
        check_compatible(ddp, MODEL_CONFIG, 2, distributed_type="MULTI_GPU")
    assert "saved by 4 process(es) with 2" in caplog.text
    with pytest.raises(CheckpointError, match="has no 'model_config'"):
        check_compatible({"step": 1}, MODEL_CONFIG, 1)


def test_bad_train_state_fails_before_writing(tmp_path):
    accelerator, model, optimizer, scheduler = fresh(0)
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_checkpoint(accelerator, tmp_path, 1, {"loader": torch.tensor(1)}, keep_last=None)
    with pytest.raises(ValueError, match="train_state\\['step'\\] is 2"):
        save_checkpoint(accelerator, tmp_path, 1, {"step": 2}, keep_last=None)
    assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One `torchrun --nproc_per_node 2` save/load round trip; every DDP assertion reads its results."""
    run_dir = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(run_dir)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HELPER), "ddp", str(run_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    written = all((run_dir / f"result_{rank}.json").is_file() for rank in (0, 1))
    if proc.returncode != 0 and written and "terminate called without an active exception" in proc.stderr:
        # gloo's teardown at interpreter exit occasionally aborts a rank after all work is done (see
        # shared/ENVIRONMENT.md); the results were written before it, so only that exact case is tolerated.
        warnings.warn("a DDP rank aborted at interpreter exit after writing its results")
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((run_dir / f"result_{rank}.json").read_text()) for rank in (0, 1)]
    return run_dir, results


def test_ddp_two_ranks_resume_exactly_and_agree(ddp_run):
    run_dir, results = ddp_run
    for r in results:
        assert (r["world_size"], r["distributed_type"]) == (2, "MULTI_CPU")
        assert r["resumed_probe"] == r["reference_probe"]  # this rank's own RNG stream came back
        assert r["resumed_losses"] == r["reference_losses"]
        assert r["resumed_params"] == r["reference_params"]
        assert r["train_state"]["world_size"] == 2 and r["train_state"]["step"] == 3
    rank0, rank1 = results
    assert rank0["loaded_params"] == rank1["loaded_params"]
    assert rank0["resumed_params"] == rank1["resumed_params"]
    assert rank0["reference_probe"] != rank1["reference_probe"]  # per-rank RNG states, not one copied
    manifest = json.loads((run_dir / "checkpoints" / "step_3" / COMPLETE_MARKER).read_text())
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(manifest["files"])
    assert find_resume_checkpoint(run_dir) == run_dir / "checkpoints" / "step_3"


def test_ddp_checkpoint_resumes_on_one_process(ddp_run, caplog):
    run_dir, results = ddp_run
    accelerator, model, optimizer, scheduler = fresh(1)
    with caplog.at_level(logging.WARNING, logger="ironcore.checkpoint"):
        state = load_checkpoint(
            accelerator, run_dir / "checkpoints" / "step_3", load_optim_state=True, load_lr_scheduler=True, model_config=MODEL_CONFIG
        )
    assert "saved by 2 process(es) with 1" in caplog.text
    assert state["world_size"] == 2
    assert flat_params(model) == results[0]["loaded_params"]


def test_tied_weights_save_without_the_shared_tensor_warning_and_reload_tied(tmp_path, caplog):
    """A real IronCore model with a tied lm_head: the checkpoint stores the tensor once, under the embedding's name
    (as save_pretrained does), accelerate logs no "Removed shared tensor", and a reload keeps the two tied."""
    from safetensors import safe_open
    from helpers_model import tiny_config

    from ironcore.models import IronCoreForCausalLM

    def tied_model(seed: int):
        torch.manual_seed(seed)
        accelerator = Accelerator(cpu=True)
        model = IronCoreForCausalLM(tiny_config())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return accelerator, *accelerator.prepare(model, optimizer)

    accelerator, model, _ = tied_model(0)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with caplog.at_level(logging.WARNING):
        ckpt = save_checkpoint(accelerator, tmp_path, 1, train_state(1), keep_last=None)
    assert not [r for r in caplog.records if "shared tensor" in r.getMessage()]
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and len(keys) == len(dict(model.named_parameters()))
    saved = model.lm_head.weight.detach().clone()

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator, reloaded, _ = tied_model(1)
    load_checkpoint(accelerator, ckpt, load_optim_state=True, load_lr_scheduler=True, model_config=MODEL_CONFIG)
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    assert torch.equal(reloaded.lm_head.weight, saved)
