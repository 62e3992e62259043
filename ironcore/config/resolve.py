"""Cross-field rules: derived values (batch arithmetic, launch environment, tokenizer) and contradictions.

Runs once, after every field has been type-checked, and returns the final frozen RunConfig.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from ironcore.errors import ConfigError
from ironcore.models.configuration_ironcore import padded_vocab_size, validate_model_config
from ironcore.optim import validate_schedule
from ironcore.profiling import validate_profiling

from .schema import DataConfig, Derived, ModelConfig, ParallelConfig, RunConfig, TaskType, TrainerConfig


def resolve(run: RunConfig, world_size: int | None = None) -> RunConfig:
    """Fill what is derived and reject what contradicts itself.

    Each derived value is computed here, once, and every stage reads the resolved field: the task type,
    seq_length, eval batch size and gradient accumulation in their own groups, the rest in `run.derived`.
    """
    check_parallel(run)
    parallel = launch_environment(run.parallel, world_size)
    model, tokenizer_field = fold_tokenizer(run.model, run.data)
    trainer, dp_size = batch_arithmetic(run.trainer, parallel.world_size)
    data = resolve_data(run.data, model)
    derived = Derived(
        data_parallel_size=dp_size,
        padded_vocab_size=padded_vocab_size(data.vocab_size, trainer.vocab_padding_unit),
        tokens_per_step=trainer.train_batch_size * data.seq_length,
        tokenizer_field=tokenizer_field,
    )
    run = replace(run, parallel=parallel, model=model, trainer=trainer, data=data, derived=derived)
    validate_model_config(run.model)
    validate_schedule(run.optim, run.operation.train_steps)
    validate_profiling(run.utils)
    if run.init.data_parallel_random_init and parallel.world_size > 1:
        raise ConfigError(
            "init.data_parallel_random_init: not supported with more than one process: DDP, FSDP and DeepSpeed "
            "start every rank from rank 0's weights; leave it false"
        )
    return run


def launch_environment(parallel: ParallelConfig, world_size: int | None) -> ParallelConfig:
    """rank / local_rank / world_size are 'auto' fields: the launcher's environment decides them."""
    env = os.environ
    return replace(
        parallel,
        world_size=world_size or int(env.get("WORLD_SIZE", parallel.world_size)),
        rank=int(env.get("RANK", parallel.rank)),
        local_rank=int(env.get("LOCAL_RANK", parallel.local_rank)),
    )


def batch_arithmetic(trainer: TrainerConfig, world_size: int) -> tuple[TrainerConfig, int]:
    """train_batch_size = micro_batch_size * gradient_accumulation_steps * dp_size; derive the missing one.

    Returns the trainer group with both filled (and eval_batch_size, which defaults to micro_batch_size) and
    the data-parallel size."""
    model_parallel = trainer.tensor_model_parallel_size * trainer.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ConfigError(
            f"trainer: world size {world_size} is not divisible by tensor_model_parallel_size x "
            f"pipeline_model_parallel_size = {model_parallel}"
        )
    dp = world_size // model_parallel
    micro, gas, total = trainer.micro_batch_size, trainer.gradient_accumulation_steps, trainer.train_batch_size
    per_step = micro * dp
    if gas is None and total is None:
        gas = 1
    if gas is None:
        if total % per_step:
            raise ConfigError(
                f"trainer.train_batch_size: {total} is not a multiple of micro_batch_size {micro} x dp_size {dp} "
                f"= {per_step}, so gradient_accumulation_steps cannot be derived"
            )
        gas = total // per_step
    expected = per_step * gas
    if total is not None and total != expected:
        raise ConfigError(
            f"trainer.train_batch_size: {total} != micro_batch_size {micro} x gradient_accumulation_steps {gas} "
            f"x dp_size {dp} (world_size {world_size} / (tp {trainer.tensor_model_parallel_size} x "
            f"pp {trainer.pipeline_model_parallel_size})) = {expected}"
        )
    filled = replace(
        trainer,
        train_batch_size=expected,
        gradient_accumulation_steps=gas,
        eval_batch_size=trainer.eval_batch_size or micro,
    )
    return filled, dp


def fold_tokenizer(model: ModelConfig, data: DataConfig) -> tuple[ModelConfig, str]:
    """A data config file may name the tokenizer its data was prepared with; it wins over the model's.

    Returns the model group with the winning tokenizer and the field it came from (for error messages). The
    data group keeps what the user wrote, so resolving a resolved (saved) config gives the same answer."""
    field = "data.vocab_name_or_path" if data.vocab_name_or_path else "model.vocab_name_or_path"
    folded = replace(
        model,
        vocab_name_or_path=data.vocab_name_or_path or model.vocab_name_or_path,
        tokenizer_type=data.tokenizer_type or model.tokenizer_type,
    )
    return folded, field


def resolve_data(data: DataConfig, model: ModelConfig) -> DataConfig:
    """The task (from the data group or its entries) and seq_length (default: the model's context); the split
    ratios must describe the whole dataset and an explicit pad id must be in the vocabulary."""
    seq_length = data.seq_length or model.max_seq_len
    if seq_length > model.max_seq_len:
        raise ConfigError(f"data.seq_length: {seq_length} exceeds model.max_seq_len {model.max_seq_len}")
    if len(data.splits) != 3:
        raise ConfigError(f"data.splits: expected 3 ratios (train, eval, test), got {len(data.splits)}")
    if any(s < 0 for s in data.splits) or abs(sum(data.splits) - 1.0) > 1e-6:
        raise ConfigError(f"data.splits: {list(data.splits)} must be non-negative and sum to 1 (sum is {sum(data.splits):g})")
    if data.pad_token_id >= data.vocab_size:
        raise ConfigError(f"data.pad_token_id: {data.pad_token_id} is outside the vocabulary (data.vocab_size "
                          f"{data.vocab_size}); use an id below it, or -1 for the EOS token")
    return replace(data, task_type=task_type(data), seq_length=seq_length)


def task_type(data: DataConfig) -> TaskType | None:
    """The run's one task: `data.task_type`, else the one its dataset entries name (None: no task given yet)."""
    named = {f"data.{group}[{i}].task_type": spec.task_type
             for group in ("train_datasets", "eval_datasets", "test_datasets")
             for i, spec in enumerate(getattr(data, group) or ()) if spec.task_type}
    tasks = set(named.values()) | ({data.task_type} if data.task_type else set())
    if len(tasks) > 1:
        where = ", ".join(f"{k}={v}" for k, v in named.items())
        top = f"data.task_type={data.task_type}, " if data.task_type else ""
        raise ConfigError(f"data: dataset entries of several tasks ({top}{where}); one run trains one task")
    return tasks.pop() if tasks else None


def check_parallel(run: RunConfig) -> None:
    """Parallelism settings no launch can honour, refused before anything starts."""
    t, p = run.trainer, run.parallel
    if t.pipeline_model_parallel_size > 1:
        raise ConfigError(
            f"trainer.pipeline_model_parallel_size={t.pipeline_model_parallel_size}: pipeline parallelism is not "
            "supported (Accelerate has no pipeline engine for custom models) - use 1 and shard the model with "
            "FSDP (parallel.use_fsdp: true) or DeepSpeed ZeRO-3 (parallel.deepspeed_config: zero3)"
        )
    if t.tensor_model_parallel_size > 1:
        where = "" if torch.cuda.is_available() else (
            "; and with no CUDA here Accelerate 1.x refuses ParallelismConfig for multi-process CPU (MULTI_CPU) runs"
        )
        raise ConfigError(
            f"trainer.tensor_model_parallel_size={t.tensor_model_parallel_size}: tensor parallelism is not supported "
            "(Accelerate's ParallelismConfig(tp_size) only prepares a model already sharded by transformers' "
            f"from_pretrained(tp_plan=...) and IronCore's model defines no tp_plan{where}) - use 1 with "
            "parallel.use_fsdp or parallel.deepspeed_config: zero3"
        )
    if p.use_fsdp and p.deepspeed_config:
        raise ConfigError(
            f"parallel.use_fsdp and parallel.deepspeed_config={p.deepspeed_config!r} are both set: FSDP and DeepSpeed "
            "cannot be combined - pick one engine"
        )
    if p.use_fsdp and p.fsdp_sharding_strategy == "no_shard":
        raise ConfigError(
            "parallel.fsdp_sharding_strategy=no_shard: FSDP2 has no NO_SHARD mode (it is plain data parallelism) "
            "- set parallel.use_fsdp: false for DDP, or use full / hybrid"
        )
    if run.operation.save_dist_ckpt and not (p.use_fsdp or p.deepspeed_config):
        raise ConfigError(
            "operation.save_dist_ckpt=true: only FSDP and DeepSpeed have sharded state to save (under DDP every rank "
            "holds the full state) - set parallel.use_fsdp: true or a parallel.deepspeed_config, or save_dist_ckpt: false"
        )
    if p.use_fsdp and p.fsdp_state_dict_type == "local":
        raise ConfigError("parallel.fsdp_state_dict_type=local: FSDP2 has no LOCAL_STATE_DICT - use full or sharded")
