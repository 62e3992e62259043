"""Two CPU processes end to end (issue #6): DDP parity with one process, DDP resume with dropout (issue 11), FSDP2
(full and sharded checkpoints) and DeepSpeed ZeRO-2/3 train-save-resume-export, ZeRO-1 and the offload presets
train and export, DPO under DDP / FSDP / ZeRO-3 against one process, a rank that dies or stalls, and the clear
refusals (sharded resume with another world size, tensor parallelism).

Every run is a real `ironcore train` subprocess on the tiny fp32 model, launched with torchrun or
`accelerate launch --multi_gpu --num_processes 2` (helpers_dist); each is launched once and read by several tests.
The single-process reference (6 steps of 4 rows x 2 accumulation steps) is shared with test_resume.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import datasets
import pytest
import torch
from helpers_dist import (
    DROPOUT, EVAL, PRETRAIN, STEPS, TINY, assert_bitwise_equal, assert_continued, baseline_run, checkpoints, child_env,
    copy_stopped_at, eval_losses, interrupted_run, latest, losses, read_jsonl, run, samples,
)
from helpers_train import assert_plain_transformers_generates_as_ironcore
from safetensors.torch import load_file

from ironcore.checkpoint import verify_checkpoint
from ironcore.data.loader import TrainLoader

TOL = 1e-5
STEPS_OF = f"operation.train_steps={STEPS}"
# Global batch 8 everywhere, as the single-process baseline's 4 rows x 2 accumulation steps.
DDP = [*PRETRAIN, *EVAL, STEPS_OF, "trainer.micro_batch_size=2", "trainer.gradient_accumulation_steps=2",
       "trainer.save_checkpoint_steps=2", "trainer.keep_last_checkpoints=2"]
DS = [*PRETRAIN, *EVAL, STEPS_OF, "trainer.micro_batch_size=4", "trainer.gradient_accumulation_steps=1",
      "trainer.save_checkpoint_steps=3"]
# FSDP with gradient accumulation (no gradient reduce-scatter until the last micro-batch of a step).
FSDP = [*PRETRAIN, *EVAL, STEPS_OF, "trainer.micro_batch_size=2", "trainer.gradient_accumulation_steps=2",
        "trainer.save_checkpoint_steps=3", "parallel.use_fsdp=true"]
FAULT = [*PRETRAIN, STEPS_OF, "trainer.micro_batch_size=4", "trainer.gradient_accumulation_steps=1",
         "trainer.save_checkpoint_steps=2"]


def max_diff(a: dict[int, float], b: dict[int, float], steps: tuple[int, ...] = tuple(range(1, STEPS + 1))) -> float:
    assert sorted(a) == sorted(b) == list(steps)
    return max(abs(a[k] - b[k]) for k in a)


def eval_diff(a: Path, b: Path) -> float:
    """Largest difference of the eval losses at steps 3 and 6 (EVAL) between two runs."""
    return max_diff(eval_losses(a), eval_losses(b), steps=(3, STEPS))


def weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    shared = set(a) & set(b)
    assert shared, (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in shared)


def error_lines(output: str) -> list[str]:
    return sorted({line for line in output.splitlines() if line.startswith("error:")})


# ---------------------------------------------------------------- the global batch does not depend on the layout


def step_sets(micro: int, world: int, accumulation: int, steps: int, rows: int = 30) -> list[set[int]]:
    """The rows each optimizer step trains on, over all ranks, for one layout of the same 8-row global batch."""
    data = datasets.Dataset.from_dict({"x": list(range(rows))})

    def collate(batch):
        return {"sample_ids": torch.tensor([r["sample_id"] for r in batch])}

    loaders = [iter(TrainLoader(data, collate, micro_batch_size=micro, rank=r, world_size=world, seed=7,
                                samples_per_step=micro * world * accumulation)) for r in range(world)]
    return [{i for it in loaders for _ in range(accumulation) for i in next(it)["sample_ids"].tolist()}
            for _ in range(steps)]


def test_each_step_trains_on_the_same_rows_whatever_the_layout():
    # 30 rows hold 3 whole steps of 8: the 6 left over are skipped in every layout, so epochs line up.
    one_process = step_sets(micro=4, world=1, accumulation=2, steps=10)
    assert step_sets(micro=4, world=2, accumulation=1, steps=10) == one_process
    assert step_sets(micro=2, world=2, accumulation=2, steps=10) == one_process
    assert all(len(s) == 8 for s in one_process)
    assert len(set().union(*one_process[:3])) == 24 and one_process[3] != one_process[0]  # epoch 2 reshuffles


# ---------------------------------------------------------------- DDP: 2 processes = 1 process at the same global batch


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    return baseline_run(tmp_path_factory)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    """2 ranks x 2 rows x 2 accumulation steps (global batch 8, as the baseline's 1 x 4 x 2), via accelerate launch."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    run(run_dir, DDP, nproc=2, launcher="accelerate", fresh=True)
    return run_dir


def test_two_processes_train_on_the_same_global_batches(ddp, baseline):
    one, two = samples(baseline), samples(ddp)
    assert sorted(two) == list(range(1, STEPS + 1))
    assert all(sorted(two[k]) == sorted(one[k]) for k in one)
    assert any(two[k] != one[k] for k in one)  # same sets, gathered in another order: the ranks really split them


def test_two_processes_match_one_process_losses(ddp, baseline):
    assert max_diff(losses(ddp), losses(baseline)) <= TOL
    assert eval_diff(ddp, baseline) <= TOL  # each rank evaluates half the rows; the reduced loss is the same


def test_ddp_export_is_the_trained_weights(ddp, baseline):
    exported = load_file(ddp / "export" / "model.safetensors")
    assert weight_diff(exported, load_file(ddp / "checkpoints" / "step_6" / "model.safetensors")) == 0
    assert weight_diff(exported, load_file(baseline / "export" / "model.safetensors")) <= 1e-4
    assert checkpoints(ddp) == ["step_4", "step_6"]



# ---------------------------------------------------------------- DDP resume with dropout (the spec's default)

# Each rank draws its own dropout masks, so these runs are compared with themselves, not with one process.
DDP_DROPOUT = [*DDP, *DROPOUT]


@pytest.fixture(scope="module")
def ddp_dropout(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """DDP with dropout: uninterrupted (accelerate launch), and stopped every way a run stops (torchrun:
    exit_interval, SIGKILL of every rank inside a save and inside a step; helpers_dist.interrupted_run)."""
    base = tmp_path_factory.mktemp("ddp-dropout")
    reference, interrupted = base / "reference", base / "interrupted"
    run(reference, DDP_DROPOUT, nproc=2, launcher="accelerate", fresh=True)
    return reference, interrupted, interrupted_run(interrupted, DDP_DROPOUT, nproc=2)


def test_two_ranks_with_dropout_resume_bitwise_however_they_stopped(ddp_dropout):
    reference, interrupted, launches = ddp_dropout
    assert [launch["steps"] for launch in launches] == [[1, 2, 3], [4], [4], [5, 6]]
    assert launches[1]["latest"] == "step_3" and launches[1]["tmp"] == [".tmp-step_4"]
    assert_bitwise_equal(interrupted, reference)


def test_two_ranks_resume_from_the_checkpoint_the_main_process_found(ddp_dropout, tmp_path):
    """Only the main process searches (and checksums) the checkpoints; both ranks fall back to its pick."""
    reference = ddp_dropout[0]
    run_dir = shutil.copytree(reference, tmp_path / "run")
    weights = run_dir / "checkpoints" / "step_6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = len(read_jsonl(run_dir / "metrics.jsonl"))
    result = run(run_dir, DDP_DROPOUT, nproc=2, launcher="accelerate")
    assert result.output.count("names step_6, which is not usable") == 1, result.output[-3000:]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")[before:] if "loss" in r] == [5, 6]
    assert_bitwise_equal(run_dir, reference)


# ---------------------------------------------------------------- FSDP2 on 2 CPU processes (Accelerate's path, on gloo)

FSDP_CHECKPOINTS = {"full": [], "sharded": ["operation.save_dist_ckpt=true"]}


@pytest.fixture(scope="module", params=sorted(FSDP_CHECKPOINTS))
def fsdp(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """As `deepspeed` (2 rows x 2 accumulation steps per rank), with FSDP2 saving full (rank 0 gathers) or sharded
    (torch DCP, one file per rank) state."""
    kind = request.param
    base = tmp_path_factory.mktemp(f"fsdp-{kind}")
    overrides = [*FSDP, *FSDP_CHECKPOINTS[kind]]
    full = base / "full"
    run(full, overrides, nproc=2, fresh=True)
    resumed = copy_stopped_at(full, base / "resumed", 3)
    run(resumed, overrides, nproc=2)
    return kind, full, resumed


def fsdp_gathered_weights(checkpoint: Path, kind: str, scratch: Path) -> dict[str, torch.Tensor]:
    """The full training weights of an FSDP checkpoint: rank 0's gathered file, or the DCP shards merged offline."""
    if kind == "full":
        return torch.load(checkpoint / "pytorch_model_fsdp.bin", weights_only=True)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", scratch / "gathered.pt")
    return torch.load(scratch / "gathered.pt", weights_only=True)["model"]


def test_fsdp_resume_equals_the_uninterrupted_run(fsdp):
    kind, full, resumed = fsdp
    assert_continued(resumed)
    assert max_diff(losses(resumed), losses(full)) <= TOL
    assert eval_diff(resumed, full) <= TOL
    assert samples(resumed) == samples(full)
    step_6 = full / "checkpoints" / "step_6"
    manifest = json.loads((step_6 / "COMPLETE").read_text())["files"]
    if kind == "full":
        assert {"pytorch_model_fsdp.bin", "optimizer.bin"} <= set(manifest)
    else:
        for state in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert {f"{state}/.metadata", f"{state}/__0_0.distcp", f"{state}/__1_0.distcp"} <= set(manifest)
    assert json.loads((step_6 / "train_state.json").read_text())["distributed_type"] == "FSDP"
    verify_checkpoint(step_6)


def test_fsdp_matches_the_single_process_run(fsdp, baseline):
    _, full, _ = fsdp
    assert max_diff(losses(full), losses(baseline)) <= TOL
    assert eval_diff(full, baseline) <= TOL


def test_fsdp_export_equals_the_gathered_training_weights(fsdp, tmp_path):
    kind, full, resumed = fsdp
    gathered = fsdp_gathered_weights(full / "checkpoints" / "step_6", kind, tmp_path)
    exported = load_file(full / "export" / "model.safetensors")
    assert set(exported) <= set(gathered) and set(gathered) - set(exported) <= {"lm_head.weight"}  # tied
    assert all(exported[k].shape == gathered[k].shape for k in exported)
    assert weight_diff(exported, gathered) == 0
    assert weight_diff(load_file(resumed / "export" / "model.safetensors"), exported) <= 1e-5


@pytest.mark.parametrize("fsdp", ["sharded"], indirect=True)
def test_fsdp_sharded_resume_with_another_world_size_is_refused(fsdp, tmp_path):
    kind, full, _ = fsdp
    run_dir = shutil.copytree(full, tmp_path / "run")
    result = run(run_dir, [*FSDP, *FSDP_CHECKPOINTS[kind]], check=False)
    assert result.returncode == 2, result.output[-2000:]
    [line] = error_lines(result.output)
    assert "sharded over 2 processes" in line and "this run has 1" in line


# ---------------------------------------------------------------- DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU processes


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def deepspeed(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """6 uninterrupted steps (checkpoints at 3 and 6), and the same run stopped after step 3 and relaunched."""
    stage = request.param
    base = tmp_path_factory.mktemp(stage)
    overrides = [*DS, f"parallel.deepspeed_config={stage}"]
    full = base / "full"
    run(full, overrides, nproc=2, fresh=True)
    resumed = copy_stopped_at(full, base / "resumed", 3)
    run(resumed, overrides, nproc=2)
    return stage, full, resumed


def test_deepspeed_resume_equals_the_uninterrupted_run(deepspeed):
    _, full, resumed = deepspeed
    assert_continued(resumed)
    assert max_diff(losses(resumed), losses(full)) <= TOL
    assert eval_diff(resumed, full) <= TOL
    assert samples(resumed) == samples(full)
    manifest_files = (full / "checkpoints" / "step_6" / "COMPLETE").read_text()
    assert "pytorch_model/" in manifest_files and "random_states_1.pkl" in manifest_files  # the DeepSpeed layout
    verify_checkpoint(full / "checkpoints" / "step_6")


def test_deepspeed_matches_the_single_process_run(deepspeed, baseline):
    _, full, _ = deepspeed
    assert max_diff(losses(full), losses(baseline)) <= TOL
    assert eval_diff(full, baseline) <= TOL


def test_deepspeed_export_equals_the_gathered_training_weights(deepspeed):
    _, full, resumed = deepspeed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        gathered = get_fp32_state_dict_from_zero_checkpoint(str(full / "checkpoints" / "step_6"))
    exported = load_file(full / "export" / "model.safetensors")
    assert set(exported) <= set(gathered) and set(gathered) - set(exported) <= {"lm_head.weight"}  # tied
    assert all(exported[k].shape == gathered[k].shape for k in exported)
    assert weight_diff(exported, gathered) == 0
    assert weight_diff(load_file(resumed / "export" / "model.safetensors"), exported) <= 1e-5


def test_deepspeed_resume_with_another_world_size_is_refused(deepspeed, tmp_path):
    stage, full, _ = deepspeed
    run_dir = shutil.copytree(full, tmp_path / "run")
    result = run(run_dir, [*DS, f"parallel.deepspeed_config={stage}"], check=False)
    assert result.returncode == 2, result.output[-2000:]
    [line] = error_lines(result.output)
    assert "sharded over 2 processes" in line and "this run has 1" in line



# The other ds_configs/ presets: (ZeRO stage, what is offloaded to CPU memory) as DeepSpeed saved its config.
OTHER_DS_PRESETS = {"zero1": (1, set()), "zero2_offload": (2, {"offload_optimizer"}),
                    "zero3_offload": (3, {"offload_optimizer", "offload_param"})}


@pytest.mark.parametrize("preset", sorted(OTHER_DS_PRESETS))
def test_other_deepspeed_presets_train_like_one_process_and_export_their_weights(preset, baseline, tmp_path):
    """ZeRO-1 and the offload presets on 2 processes: the engine runs the preset's stage and offload (read back from
    the config DeepSpeed stores in its checkpoint), the losses equal one process's, the export the gathered weights."""
    run_dir = tmp_path / "run"
    run(run_dir, [*DS, f"parallel.deepspeed_config={preset}"], nproc=2, fresh=True)
    ckpt = run_dir / "checkpoints" / "step_6"
    states = torch.load(sorted((ckpt / "pytorch_model").glob("*model_states.pt"))[0], weights_only=False)
    zero = states["ds_config"]["zero_optimization"]
    stage, offloaded = OTHER_DS_PRESETS[preset]
    assert zero["stage"] == stage and {k for k in zero if k.startswith("offload_")} == offloaded
    assert all(zero[k]["device"] == "cpu" for k in offloaded)
    assert max_diff(losses(run_dir), losses(baseline)) <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        gathered = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    assert weight_diff(load_file(run_dir / "export" / "model.safetensors"), gathered) == 0

def test_an_eval_split_smaller_than_the_world_is_skipped_with_a_warning(tmp_path):
    """One eval row cannot be split over 2 ranks (each evaluates an equal share): said once, and training goes on."""
    overrides = [*FAULT, "operation.train_steps=2", "trainer.do_eval=true", "operation.eval_interval=1",
                 "operation.eval_samples=1"]
    result = run(tmp_path / "run", overrides, nproc=2, fresh=True)
    assert result.output.count("eval: too few rows (1) to give each of 2 processes one; skipped") == 2  # steps 1, 2
    assert sorted(losses(tmp_path / "run")) == [1, 2]


# ---------------------------------------------------------------- DPO on 2 CPU processes

DPO = ["data.config_path=builtin_dpo", *TINY, STEPS_OF, "trainer.gradient_accumulation_steps=1"]
DPO_LAYOUTS = {
    "ddp": [],
    "fsdp": ["parallel.use_fsdp=true"],
    "zero3": ["parallel.deepspeed_config=zero3"],
    "fsdp-precomputed": ["parallel.use_fsdp=true", "optim.dpo_precompute_ref=true"],
}
UNSHARDED_REFERENCE = "the live reference model is a full, unsharded copy on every rank"


@pytest.fixture(scope="module")
def dpo_baseline(tmp_path_factory) -> Path:
    """One process, 4 pairs per step: the global batch of 2 ranks x 2 pairs."""
    run_dir = tmp_path_factory.mktemp("dpo") / "one"
    run(run_dir, [*DPO, "trainer.micro_batch_size=4"], fresh=True)
    return run_dir


@pytest.mark.parametrize("layout", sorted(DPO_LAYOUTS))
def test_dpo_on_two_ranks_matches_one_process(layout, dpo_baseline, tmp_path):
    run_dir = tmp_path / "run"
    result = run(run_dir, [*DPO, "trainer.micro_batch_size=2", *DPO_LAYOUTS[layout]], nproc=2, fresh=True)
    assert max_diff(losses(run_dir), losses(dpo_baseline)) <= TOL
    assert abs(losses(run_dir)[STEPS] - losses(run_dir)[1]) > 1e-4  # the policy moved away from the reference
    sharded_live_reference = layout in ("fsdp", "zero3")
    assert result.output.count(UNSHARDED_REFERENCE) == int(sharded_live_reference)


# ---------------------------------------------------------------- a rank that dies or stalls


def test_a_dead_rank_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    env_hooks = {"IRONCORE_TEST_EXIT_RANK": "1", "IRONCORE_TEST_EXIT_AT_STEP": "3"}
    result = run_with_hooks(run_dir, [*FAULT, "parallel.timeout_minute=0.5"], env_hooks)
    assert result.returncode != 0
    assert result.seconds < 90, f"the launcher took {result.seconds:.0f} s to give up"
    assert sorted(losses(run_dir)) == [1, 2]
    assert checkpoints(run_dir) == ["step_2"] and latest(run_dir) == "step_2"
    verify_checkpoint(run_dir / "checkpoints" / "step_2")


def test_a_stalled_rank_times_out_within_timeout_minute(tmp_path):
    run_dir = tmp_path / "run"
    env_hooks = {"IRONCORE_TEST_STALL_RANK": "1", "IRONCORE_TEST_EXIT_AT_STEP": "3"}
    result = run_with_hooks(run_dir, [*FAULT, "parallel.timeout_minute=0.1"], env_hooks)
    assert result.returncode != 0
    assert "Timed out waiting 6000ms" in result.output  # rank 0's collective gave up after timeout_minute
    assert result.seconds < 90
    assert checkpoints(run_dir) == ["step_2"] and latest(run_dir) == "step_2"
    verify_checkpoint(run_dir / "checkpoints" / "step_2")


def run_with_hooks(run_dir: Path, overrides: list[str], hooks: dict[str, str]):
    env = child_env(IRONCORE_TEST_SIGNAL=str(run_dir.parent / "signal"), **hooks)
    return run(run_dir, overrides, nproc=2, hooks=True, env=env, fresh=True, check=False)


# ---------------------------------------------------------------- what cannot run here says so, in one line


def test_tensor_parallelism_is_refused_naming_the_field_and_why(tmp_path):
    result = run(tmp_path / "run", [*FAULT, "trainer.tensor_model_parallel_size=2"], nproc=2, check=False)
    assert result.returncode != 0
    [line] = error_lines(result.output)
    assert "trainer.tensor_model_parallel_size=2" in line and "tp_plan" in line and "MULTI_CPU" in line


# ---------------------------------------------------------------- from a pretrained checkpoint: rank-0 loading

# Global batch 8 as the single-process reference (4 rows x 2 accumulation steps); 2 steps from the baseline's export.
FROM_PRETRAINED = [*PRETRAIN, "operation.train_steps=2"]
PRETRAINED_LAYOUTS = {
    "fsdp": ["trainer.micro_batch_size=2", "trainer.gradient_accumulation_steps=2", "parallel.use_fsdp=true"],
    "zero3": ["trainer.micro_batch_size=4", "trainer.gradient_accumulation_steps=1",
              "parallel.deepspeed_config=zero3"],
}


@pytest.fixture(scope="module")
def from_pretrained_single(baseline, tmp_path_factory) -> Path:
    """One process fine-tuning the baseline's export for 2 steps: the reference the 2-rank layouts must match."""
    run_dir = tmp_path_factory.mktemp("from-pretrained") / "single"
    run(run_dir, [*FROM_PRETRAINED, f"init.from_pretrained={baseline / 'export'}", "trainer.micro_batch_size=4",
                  "trainer.gradient_accumulation_steps=2"], fresh=True)
    return run_dir


@pytest.mark.parametrize("layout", sorted(PRETRAINED_LAYOUTS))
def test_two_ranks_from_a_pretrained_checkpoint_start_from_its_weights(layout, baseline, from_pretrained_single,
                                                                       tmp_path):
    """FSDP2 (rank 0 loads, rank 1 builds on meta, the weights are broadcast while sharding) and ZeRO-3 (the model
    is built partitioned, rank 0 reads each tensor and scatters its slices into the ranks' partitions): the first
    step's loss, computed on the initial weights, equals one process's, and is well below the baseline's first
    loss, so they are the pretrained weights. The run's export then generates in plain transformers what IronCore's
    own loader of that export generates."""
    run_dir = tmp_path / layout
    run(run_dir, [*FROM_PRETRAINED, f"init.from_pretrained={baseline / 'export'}", *PRETRAINED_LAYOUTS[layout]],
        nproc=2, fresh=True)
    single, two = losses(from_pretrained_single), losses(run_dir)
    assert abs(two[1] - single[1]) <= TOL, (two, single)
    assert single[1] < losses(baseline)[1] - 0.2

    assert_plain_transformers_generates_as_ironcore(run_dir / "export")
