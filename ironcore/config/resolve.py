"""Cross-field rules: derived values (batch arithmetic, launch environment, tokenizer) and contradictions.

Runs once, after every field has been type-checked, and returns the final frozen RunConfig.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

import torch

from ironcore.errors import ConfigError
from ironcore.models.configuration_ironcore import padded_vocab_size, validate_model_config
from ironcore.optim import validate_schedule
from ironcore.profiling import validate_profiling

from .schema import (
    DataConfig,
    Derived,
    ModelConfig,
    ParallelConfig,
    PositionalEmbeddingConfig,
    RunConfig,
    TaskType,
    TrainerConfig,
)


def resolve(run: RunConfig, world_size: int | None = None, given: Mapping[str, Any] | None = None) -> RunConfig:
    """Fill what is derived and reject what contradicts itself.

    Each derived value is computed here, once, and every stage reads the resolved field: the task type,
    seq_length, eval batch size and gradient accumulation in their own groups, the model group of a pretrained
    checkpoint, the rest in `run.derived`. `given` is the raw `{group: {field: value}}` the user wrote (None: every
    field counts as given); with `init.from_pretrained`, the model fields it leaves out come from the checkpoint.
    """
    check_parallel(run)
    parallel = launch_environment(run.parallel, world_size)
    run, model_sources = model_from_checkpoint(run, given)
    model, tokenizer_field = fold_tokenizer(run.model, run.data)
    trainer, dp_size = batch_arithmetic(run.trainer, parallel.world_size)
    data = resolve_data(run.data, model)
    derived = Derived(
        data_parallel_size=dp_size,
        padded_vocab_size=padded_vocab_size(data.vocab_size, trainer.vocab_padding_unit),
        tokens_per_step=trainer.train_batch_size * data.seq_length,
        tokenizer_field=tokenizer_field,
        zero_stage=zero_stage(run.parallel),
        model_sources=model_sources,
    )
    run = replace(run, parallel=parallel, model=model, trainer=trainer, data=data, derived=derived)
    validate_model_config(run.model)
    validate_schedule(run.optim, run.operation.train_steps)
    validate_profiling(run.utils)
    validate_streaming(run)
    validate_samples_and_benchmarks(run)
    if run.init.data_parallel_random_init and parallel.world_size > 1:
        raise ConfigError(
            "init.data_parallel_random_init: not supported with more than one process: DDP, FSDP and DeepSpeed "
            "start every rank from rank 0's weights; leave it false"
        )
    return run


# model fields a fine-tuning run may set freely: they change training, not what the checkpoint computes
TRAINING_ONLY_MODEL_FIELDS = frozenset({"model.precision", "model.dropout_embd", "model.dropout_attn",
                                        "model.dropout_mlp", "model.tokenizer_type", "model.vocab_name_or_path"})
TOKENIZER_FIELDS = ("model.vocab_name_or_path", "data.vocab_name_or_path")


def given_fields(given: Mapping[str, Any]) -> set[str]:
    """Dotted names of the model and data fields the user wrote (nested groups flattened)."""
    names = set()
    for group in ("model", "data"):
        for key, value in (given.get(group) or {}).items():
            if isinstance(value, Mapping) and key == "positional_embedding":
                names |= {f"{group}.{key}.{sub}" for sub in value}
            else:
                names.add(f"{group}.{key}")
    return names


def _same(a: Any, b: Any) -> bool:
    return math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) or isinstance(b, float) else a == b


def model_from_checkpoint(run: RunConfig, given: Mapping[str, Any] | None) -> tuple[RunConfig, dict | None]:
    """With `init.from_pretrained`: every architecture field, the dropout rates, `data.vocab_size` and (unless
    set) the tokenizer that the config leaves out, taken from the checkpoint's config.json; a given field that
    contradicts it is refused naming both values. Returns the run and, per field, where its value came from.

    Nothing is read when the config gives every field (a saved, resolved config does), so re-resolving a run's
    config.yaml never needs the checkpoint. The rope context (model.max_seq_len of a rope model) is the
    training context and may be set below the checkpoint's; a learned position table may not."""
    if not run.init.from_pretrained or given is None:
        return run, None
    from ironcore.models.conversion import checkpoint_fields

    written = given_fields(given)
    if run.model.qkv_bias is None:
        written.discard("model.qkv_bias")  # null: "as no_bias says", which the checkpoint then says
    model_fields = {f"model.{f.name}" for f in fields(ModelConfig) if f.name != "positional_embedding"}
    model_fields |= {f"model.positional_embedding.{f.name}" for f in fields(PositionalEmbeddingConfig)}
    wanted = (model_fields - TRAINING_ONLY_MODEL_FIELDS) | {"data.vocab_size"}
    if wanted <= written and any(name in written for name in TOKENIZER_FIELDS):
        return run, None
    source = run.init.from_pretrained
    seq_len = run.model.max_seq_len if "model.max_seq_len" in written else None
    path, found = checkpoint_fields(source, seq_len)
    contradictions, values, sources = [], {}, {}
    free = unchecked_fields(found["model.positional_embedding.type"][0],
                            found["model.positional_embedding.scaling_type"][0])
    for name, (value, key) in found.items():
        where = key if key.startswith("(") else f"(config.json: {key})"
        origin = f"{source} {where}"
        if name in written:
            mine = _normalised(run.model, name, _get(run, name))
            if name in wanted and name not in free and not _same(mine, value):
                contradictions.append(f"{name} is {value} there but {mine} in the config {where}")
            sources[name] = "config"
        else:
            values[name] = value
            sources[name] = origin
    if contradictions:
        raise ConfigError(f"init.from_pretrained={source}: the pretrained model does not match the run's model: "
                          + "; ".join(contradictions))
    if not any(name in written for name in TOKENIZER_FIELDS):
        values |= {"model.vocab_name_or_path": str(path), "model.tokenizer_type": "auto"}
        sources |= {"model.vocab_name_or_path": f"{source} (its tokenizer files)",
                    "model.tokenizer_type": f"{source} (AutoTokenizer reads its tokenizer files)"}
    return _with_values(run, values), sources


def unchecked_fields(pe_type: str, scaling_type: str) -> set[str]:
    """Fields a checkpoint does not pin (as `check_same_architecture` skips them): the context of a rope model
    (model.max_seq_len only sizes a learned position table), rope settings without rope, llama3's without it."""
    llama3 = {f"model.positional_embedding.{k}"
              for k in ("low_freq_factor", "high_freq_factor", "original_max_seq_len")}
    if pe_type != "rope":
        return {f"model.positional_embedding.{f.name}" for f in fields(PositionalEmbeddingConfig)} - {
            "model.positional_embedding.type"}
    return {"model.max_seq_len"} | (llama3 if scaling_type != "llama3" else set())


def _normalised(model: ModelConfig, name: str, value: Any) -> Any:
    """A given value as the checkpoint states it: no KV groups is MHA, an unset qkv_bias follows no_bias."""
    if name == "model.num_attention_groups" and value is None:
        return model.num_attention_heads
    if name == "model.qkv_bias" and value is None:
        return not model.no_bias
    return value


def _get(run: RunConfig, name: str) -> Any:
    value: Any = run
    for part in name.split("."):
        value = getattr(value, part)
    return value


def _with_values(run: RunConfig, values: dict[str, Any]) -> RunConfig:
    """`run` with dotted `model.*` / `data.*` fields replaced (spec field values: qkv_bias and the rest)."""
    model = {k.removeprefix("model."): v for k, v in values.items()
             if k.startswith("model.") and not k.startswith("model.positional_embedding.")}
    pe = {k.removeprefix("model.positional_embedding."): v for k, v in values.items()
          if k.startswith("model.positional_embedding.")}
    data = {k.removeprefix("data."): v for k, v in values.items() if k.startswith("data.")}
    return replace(
        run,
        model=replace(run.model, **model, positional_embedding=replace(run.model.positional_embedding, **pe)),
        data=replace(run.data, **data),
    )


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
    streams = {group: tuple(replace(spec, streaming=data.streaming) if spec.streaming is None else spec
                            for spec in getattr(data, group))
               for group in ("train_datasets", "eval_datasets", "test_datasets") if getattr(data, group)}
    return replace(data, task_type=task_type(data), seq_length=seq_length, **streams)


def validate_streaming(run: RunConfig) -> None:
    """What a stream cannot honour, refused at load: rows held out of it by `data.splits`, SFT packing, a DPO
    reference table indexed by row, and an eval/test stream with no end (a Hub stream without `max_samples`)."""
    data = run.data
    train_streams = [i for i, spec in enumerate(data.train_datasets or ()) if spec.streaming]
    if train_streams:
        where = f"data.train_datasets[{train_streams[0]}] streams"
        held = {"eval": data.splits[1] > 0 and not data.eval_datasets, "test": data.splits[2] > 0 and not data.test_datasets}
        if any(held.values()):
            role = next(r for r, h in held.items() if h)
            raise ConfigError(f"{where}: data.splits {list(data.splits)} holds {role} rows out, which a stream cannot; "
                              f"give data.{role}_datasets or set data.splits to [1, 0, 0]")
        if data.task_type == "sft" and data.pack_sequences:
            raise ConfigError(f"{where}: data.pack_sequences packs a cached split; set it false for a streaming run")
        if data.task_type == "dpo" and run.optim.dpo_precompute_ref:
            raise ConfigError(f"{where}: optim.dpo_precompute_ref scores every training row up front, which a stream "
                              "has no end for; set it false")
    from ironcore.data.sources import builtin_kind, local_files  # reads no data: names and file existence only

    for role in ("eval", "test"):
        for i, spec in enumerate(getattr(data, f"{role}_datasets") or ()):
            if not spec.streaming or spec.max_samples is not None:
                continue
            if builtin_kind(spec, data.task_type or "pretrain") is None and local_files(spec.dataset_path) is None:
                raise ConfigError(f"data.{role}_datasets[{i}].max_samples: a streaming {role} entry from the Hub "
                                  f"('{spec.dataset_path}') has no end; set max_samples (its first N documents)")


def validate_samples_and_benchmarks(run: RunConfig) -> None:
    """operation.sample_prompts readable and generated where the model is whole (not sharded by FSDP or ZeRO-3,
    whose generation would need every rank); operation.benchmark_tasks with lm_eval installed and its task dir."""
    import importlib.util

    from ironcore.samples import read_prompts

    operation, p = run.operation, run.parallel
    if read_prompts(operation.sample_prompts):
        if p.use_fsdp or run.derived.zero_stage == 3:
            sharding = "parallel.use_fsdp" if p.use_fsdp else f"parallel.deepspeed_config={p.deepspeed_config}"
            raise ConfigError(f"operation.sample_prompts: not supported with {sharding} (the model is sharded, and "
                              "samples are generated on the main process); generate from the export after training")
    if operation.benchmark_tasks and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("operation.benchmark_tasks: lm-evaluation-harness is not installed: pip install -e '.[eval]'")
    include = operation.benchmark_include_path
    if include is not None and not os.path.isdir(include):
        raise ConfigError(f"operation.benchmark_include_path: {include} is not a directory of task YAMLs")


def zero_stage(parallel: ParallelConfig) -> int:
    """The ZeRO stage of `parallel.deepspeed_config` (0 without DeepSpeed)."""
    from ironcore.translate import deepspeed_stage

    return deepspeed_stage(parallel.deepspeed_config) if parallel.deepspeed_config else 0


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
