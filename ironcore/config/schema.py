"""The typed run configuration: one frozen dataclass per group of the spec.

Field names, types and defaults are the spec's (`shared/spec/configuration.md`). Fields that IronCore
adds carry ``added=True`` in their metadata so `configs/README.md` can mark them. Every constraint a
field has (choices, ranges) lives next to the field, so validation and documentation read one source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


def option(
    default: Any = None,
    help: str = "",
    *,
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    added: bool = False,
    factory: Any = None,
) -> Any:
    """A dataclass field with the metadata the validator and the docs generator read."""
    metadata = {"help": help, "choices": choices, "ge": ge, "gt": gt, "lt": lt, "le": le, "added": added}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


NormCadence = Literal["log", "checkpoint"]
TaskType = Literal["pretrain", "sft", "dpo"]


@dataclass(frozen=True)
class TrainerConfig:
    """Training process settings: batch sizes, parallelism sizes, checkpointing, logging cadence."""

    model_name: str = option("model", "Model name (tracker run name, export name)")
    model_path: str = option("", "Run directory: resolved config, metrics, checkpoints, export. Empty: `runs/<model_name>`")
    micro_batch_size: int = option(2, "Micro batch size per device", ge=1)
    train_batch_size: int | None = option(None, "Global training batch size (derived when omitted)", ge=1)
    gradient_accumulation_steps: int | None = option(None, "Gradient accumulation steps (derived when omitted)", ge=1)
    tensor_model_parallel_size: int = option(1, "Tensor parallelism size", ge=1)
    pipeline_model_parallel_size: int = option(1, "Pipeline parallelism size (only 1 is supported)", ge=1)
    save_checkpoint_steps: int = option(1000, "Checkpoint save interval in optimizer steps", ge=1)
    log_interval: int = option(20, "Progress print interval in optimizer steps", ge=1)
    grad_norm_log_interval: NormCadence | None = option(None, "Gradient norm logging cadence (`log`, `checkpoint`, or None)")
    param_norm_log_interval: NormCadence | None = option(None, "Parameter norm logging cadence (`log`, `checkpoint`, or None)")
    use_flash_attn: bool = option(True, "Use flash-attn when installed and on CUDA, else torch SDPA (logged once)")
    vocab_padding_unit: int = option(128, "Pad the model vocabulary to a multiple of this", ge=1)
    num_workers: int = option(8, "DataLoader workers", ge=0)
    do_eval: bool = option(False, "Enable evaluation")
    eval_batch_size: int | None = option(None, "Evaluation batch size (None: micro_batch_size)", ge=1)
    keep_last_checkpoints: int | None = option(
        None, "Keep only the newest K checkpoints (None: keep all)", ge=1, added=True
    )
    resume: bool = option(True, "Resume from the run directory's latest complete checkpoint when there is one", added=True)
    torch_compile: bool = option(False, "Compile each decoder layer in place (TorchInductor, regional compilation)", added=True)
    max_nonfinite_steps: int = option(
        3, "Stop after this many consecutive NaN/Inf losses (each such step is skipped)", ge=1, added=True
    )
    peak_tflops: float | None = option(
        None, "Peak device TFLOP/s used as the MFU denominator (None: looked up or measured)", gt=0, added=True
    )
    log_sample_ids: bool = option(
        False,
        "Data-order audit: append each optimizer step's global sample ids (gathered across ranks) to "
        "`<run dir>/samples.jsonl`",
        added=True,
    )


@dataclass(frozen=True)
class OperationConfig:
    """Training operation controls: how long, how often to evaluate, recompute, saving."""

    train_steps: int = option(1000, "Total optimizer steps", ge=1)
    eval_interval: int = option(100, "Evaluate every N optimizer steps", ge=1)
    eval_samples: int = option(100, "Number of evaluation samples", ge=0)
    test_samples: int = option(100, "Number of test samples evaluated at the end", ge=0)
    activation_recompute: bool = option(False, "Enable activation checkpointing")
    recompute_strategy: Literal["default", "optimized"] = option("default", "Recompute strategy")
    no_save: bool = option(False, "Disable checkpoint saving")
    save_dist_ckpt: bool = option(
        False,
        "Save sharded (distributed) checkpoints: under FSDP the sharded state dict (as "
        "parallel.fsdp_state_dict_type: sharded); DeepSpeed always saves its native shards; refused without either",
    )
    exit_interval: int | None = option(None, "Exit cleanly after N optimizer steps (saves first)", ge=1)
    benchmark_tasks: tuple[str, ...] = option(
        (), "lm-evaluation-harness tasks (hellaswag, arc_easy, ...) run on the export at the end of training; scores "
        "go to the trackers and eval_results.json (needs ironcore[eval])", added=True,
    )
    benchmark_limit: int | None = option(None, "Evaluate at most N documents per benchmark task (None: all)", ge=1, added=True)
    benchmark_include_path: str | None = option(
        None, "Directory of extra lm-evaluation-harness task YAMLs (local tasks), as `ironcore eval --include-path`",
        added=True,
    )
    sample_prompts: tuple[str, ...] | str | None = option(
        None, "Prompts the model completes every eval_interval (also without trainer.do_eval), with the export's "
        "sampling settings, to show what it learned: a list of prompts, or a string naming a file with one prompt per "
        "line; appended to samples_text.jsonl and the trackers. Not with FSDP / ZeRO-3", added=True,
    )


@dataclass(frozen=True)
class PositionalEmbeddingConfig:
    """Positional embedding: learned absolute, rotary, or none."""

    type: Literal["absolute", "rope", "none"] = option("absolute", "PE type")
    base: float = option(10000, "RoPE base frequency", gt=0)
    scaling_factor: float = option(
        1.0, "RoPE scaling factor: positions are divided by this (scaling_type linear; llama3: low frequencies)", gt=0
    )
    offset: int = option(0, "RoPE position offset added to every position", ge=0)
    scaling_type: Literal["linear", "llama3"] = option(
        "linear",
        "RoPE scaling: `linear` divides every position by scaling_factor; `llama3` divides only the low "
        "frequencies by it, blending the middle band (Llama 3.1+ checkpoints need it)",
        added=True,
    )
    low_freq_factor: float = option(1.0, "llama3 scaling: wavelengths above original_max_seq_len / this are scaled", gt=0, added=True)
    high_freq_factor: float = option(4.0, "llama3 scaling: wavelengths below original_max_seq_len / this are kept", gt=0, added=True)
    original_max_seq_len: int = option(8192, "llama3 scaling: the context length the model was pretrained with", ge=1, added=True)


@dataclass(frozen=True)
class ModelConfig:
    """Model architecture. Usually a preset name (`model: gpt2-small`) or an inline mapping."""

    d_model: int = option(512, "Hidden dimension size", ge=1)
    d_ffn: int = option(2048, "Feed-forward dimension size", ge=1)
    num_layers: int = option(2, "Number of transformer layers", ge=1)
    num_attention_heads: int = option(8, "Number of attention heads", ge=1)
    num_attention_groups: int | None = option(None, "KV groups for GQA (None = MHA, 1 = MQA)", ge=1)
    head_dim: int = option(128, "Attention head dimension", ge=1)
    max_seq_len: int = option(512, "Maximum sequence length", ge=1)
    precision: Literal["bfloat16", "float16", "float32"] = option("bfloat16", "Model precision")
    ln_type: Literal["layernorm", "rmsnorm"] = option("layernorm", "Layer norm type")
    ln_eps: float = option(1e-5, "Layer norm epsilon", gt=0)
    post_ln: bool = option(False, "Use post-LN (vs pre-LN)")
    activation_type: Literal["gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"] = option(
        "gelu", "Activation function (`gelu_tanh` is GPT-2's approximation)"
    )
    dropout_embd: float = option(0.1, "Embedding dropout", ge=0, lt=1)
    dropout_attn: float = option(0.1, "Attention dropout", ge=0, lt=1)
    dropout_mlp: float = option(0.1, "MLP dropout", ge=0, lt=1)
    no_bias: bool = option(False, "Disable bias in layers")
    untie_embed: bool = option(False, "Untie input/output embeddings")
    qkv_bias: bool | None = option(
        None,
        "Bias on the q/k/v projections (None: as no_bias says); true with no_bias=true is Qwen2's layout, whose "
        "o_proj, MLP and norms have none",
        added=True,
    )
    tokenizer_type: str = option("gpt2", "Tokenizer type (`gpt2`, `llama`, `auto`, `builtin`)")
    vocab_name_or_path: str = option("gpt2", "Tokenizer hub name or local directory")
    positional_embedding: PositionalEmbeddingConfig = option(
        factory=PositionalEmbeddingConfig, help="Positional embedding (nested group)"
    )


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset entry of `train_datasets` / `eval_datasets` / `test_datasets`."""

    name: str = option("", "Name used in logs and statistics (default: derived from dataset_path)")
    dataset_path: str = option("", "Hub name, local file, folder or glob (json, jsonl, parquet, csv, txt, arrow), or `builtin`")
    task_type: TaskType | None = option(None, "Task of this dataset (None: the data group's task_type)")
    ratio: float = option(1.0, "Relative share of training samples drawn from this dataset", ge=0)
    split: str = option("train", "Split to read")
    subset: str | None = option(None, "Hub subset (configuration) name")
    text_column: str = option("text", "Pretrain text column")
    messages_column: str = option("messages", "SFT/DPO conversation column (role/content lists)")
    prompt_column: str = option("prompt", "SFT/DPO prompt column, used when there is no messages column", added=True)
    response_column: str = option("response", "SFT response column, used with prompt_column", added=True)
    chosen_column: str = option("chosen", "DPO chosen column")
    rejected_column: str = option("rejected", "DPO rejected column")
    max_samples: int | None = option(None, "Read at most this many rows", ge=1)
    streaming: bool | None = option(
        None, "Read the entry as a stream, tokenized on the fly in the loader workers, never cached (None: data.streaming); "
        "for corpora larger than the disk", added=True
    )


@dataclass(frozen=True)
class DataConfig:
    """Data loading. Usually `config_path` to a data config file plus `task_type`."""

    config_path: str | None = option(None, "Path to data config YAML (its fields fill this group)")
    task_type: TaskType | None = option(None, "Task type")
    splits: tuple[float, ...] = option((0.97, 0.029, 0.001), "Train/eval/test split ratios of the train datasets")
    train_datasets: tuple[DatasetSpec, ...] | None = option(None, "Training dataset entries")
    eval_datasets: tuple[DatasetSpec, ...] | None = option(None, "Evaluation dataset entries (instead of the eval split)")
    test_datasets: tuple[DatasetSpec, ...] | None = option(None, "Test dataset entries (instead of the test split)")
    vocab_size: int = option(51200, "Vocabulary size (padded by vocab_padding_unit; at least the tokenizer's)", ge=1)
    pad_to_max_length: bool = option(False, "Pad sequences to seq_length")
    pad_token_id: int = option(-1, "Pad token ID (-1: EOS)", ge=-1)
    tokenizer_type: str | None = option(None, "Tokenizer type from a data config file (overrides the model's)", added=True)
    vocab_name_or_path: str | None = option(
        None, "Tokenizer from a data config file (overrides the model's)", added=True
    )
    seq_length: int | None = option(None, "Tokens per training row (None: model.max_seq_len)", ge=1, added=True)
    preprocessed_dir: str | None = option(None, "Tokenized cache root (None: `<cache_dir>/preprocessed`)", added=True)
    cache_dir: str | None = option(
        None,
        "Cache root: built-in tokenizer, preprocessed data, and `datasets` downloads under `<cache_dir>/datasets` "
        "(None: $IRONCORE_CACHE, else ~/.cache/ironcore; downloads then use the HF default)",
        added=True,
    )
    num_workers: int = option(
        1, "Processes used to tokenize (pretrain: one core each, the tokenizer's own threads off; the blocks are the same)",
        ge=1, added=True,
    )
    pack_sequences: bool = option(
        False, "SFT: pack several samples per row, positions restart per sample (pretrain rows are always packed)", added=True
    )
    reset_position_ids: bool = option(False, "Pretrain: restart position ids at each document", added=True)
    truncation: Literal["truncate", "drop"] = option(
        "truncate", "SFT/DPO samples longer than seq_length are truncated or dropped (counted either way)", added=True
    )
    chat_template: str | None = option(
        None, "Jinja chat template (None: the tokenizer's, else IronCore's default)", added=True
    )
    streaming: bool = option(
        False, "Stream every dataset entry that does not set its own `streaming` (corpora larger than the disk)", added=True
    )


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    optimizer: Literal["adam", "adamw"] = option("adam", "Optimizer type (AdamW with decoupled weight decay)")
    lr_scheduler: Literal["cosine", "linear", "constant"] = option("cosine", "LR scheduler type")
    max_lr: float = option(5e-4, "Maximum learning rate", ge=0)
    min_lr: float = option(0.0, "Minimum learning rate", ge=0)
    warmup_steps: int = option(0, "LR warmup steps", ge=0)
    annealing_steps: int = option(0, "Step at which decay reaches min_lr (0: train_steps)", ge=0)
    weight_decay: float = option(0.01, "Weight decay", ge=0)
    no_decay_on_embedding: bool = option(True, "Skip weight decay on embeddings")
    adam_beta1: float = option(0.9, "Adam beta1", ge=0, lt=1)
    adam_beta2: float = option(0.95, "Adam beta2", ge=0, lt=1)
    adam_eps: float = option(1e-8, "Adam epsilon", gt=0)
    clip_grad: float = option(1.0, "Gradient clipping max norm (0: off)", ge=0)
    load_checkpoint_optim_state: bool = option(True, "Load optimizer state from checkpoint")
    load_checkpoint_lr_scheduler: bool = option(True, "Load LR scheduler from checkpoint")
    dpo_beta: float = option(0.1, "DPO beta (sigmoid loss)", gt=0, added=True)
    dpo_precompute_ref: bool = option(
        False, "DPO: compute reference log-probs in a first pass instead of keeping a reference model", added=True
    )


@dataclass(frozen=True)
class InitConfig:
    """Weight initialisation."""

    seed: int = option(1337, "Random seed", ge=0)
    init_std: float = option(0.006, "Initialization std dev", gt=0)
    xavier_init: bool = option(False, "Use Xavier initialization")
    data_parallel_random_init: bool = option(False, "Each data-parallel rank draws its own initial weights")
    from_pretrained: str | None = option(
        None,
        "Fine-tune from a checkpoint: a local dir or a Hub name (`org/name`, `org/name@revision`; safetensors, "
        "cached, offline once cached) of type ironcore, gpt2, llama, mistral or qwen2. The model fields, "
        "data.vocab_size and (unless set) the tokenizer it leaves out come from its config.json",
        added=True,
    )


@dataclass(frozen=True)
class ParallelConfig:
    """Distributed training; rank and sizes are read from the launch environment."""

    rank: int = option(-1, "Global rank (auto)", ge=-1)
    local_rank: int = option(0, "Local rank (auto)", ge=-1)
    world_size: int = option(1, "World size (auto)", ge=1)
    dist_backend: Literal["nccl", "gloo"] = option("nccl", "Distributed backend (nccl without CUDA becomes gloo)")
    timeout_minute: float = option(10.0, "Distributed timeout in minutes", gt=0)
    use_fsdp: bool = option(False, "Enable FSDP2")
    fsdp_offload_params: bool = option(False, "FSDP CPU offload")
    fsdp_mixed_precision: Literal["mixed", "fp16", "bf16", "fp32"] = option("mixed", "FSDP precision")
    fsdp_sharding_strategy: Literal["full", "hybrid", "no_shard"] = option("full", "Sharding strategy")
    fsdp_state_dict_type: Literal["full", "local", "sharded"] = option("full", "State dict type")
    deepspeed_config: str | None = option(
        None, "DeepSpeed preset name in ds_configs/ (zero1, zero2, zero2_offload, zero3, zero3_offload) or a JSON path",
        added=True,
    )


@dataclass(frozen=True)
class UtilsConfig:
    """Logging, trackers and profiling."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = option("INFO", "Log level")
    tensorboard_dir: str | None = option(None, "TensorBoard log directory (enables TensorBoard)")
    mlflow_tracking_uri: str | None = option(None, "MLflow tracking URI (enables MLflow; e.g. sqlite:///mlflow.db)")
    mlflow_experiment_name: str | None = option(None, "MLflow experiment name")
    profile_nsys: bool = option(False, "Enable Nsight Systems profiling (CUDA only)")
    profile_torch: bool = option(False, "Enable PyTorch profiler")
    profile_step_start: int = option(10, "Profile start step", ge=0)
    profile_step_end: int = option(12, "Profile end step", ge=0)
    profile_ranks: tuple[int, ...] = option((0,), "Ranks to profile")
    deterministic: bool = option(False, "Enable deterministic algorithms")
    report_memory_usage: bool = option(True, "Report memory usage")
    trackers: tuple[Literal["tensorboard", "mlflow", "wandb"], ...] = option(
        (), "Extra trackers to enable (tensorboard/mlflow are also enabled by their fields)", added=True
    )
    wandb_project: str | None = option(None, "W&B project (enables W&B; WANDB_MODE=offline works)", added=True)


@dataclass(frozen=True)
class Derived:
    """Values no spec field holds, computed once by config resolution (`ironcore.config.resolve`) and read
    everywhere else. Derived values that do have a field (data.task_type, data.seq_length,
    trainer.eval_batch_size, trainer.gradient_accumulation_steps, parallel.world_size, the tokenizer) are
    filled in their own groups."""

    data_parallel_size: int  # world_size / (tensor x pipeline parallel sizes)
    padded_vocab_size: int  # data.vocab_size rounded up to trainer.vocab_padding_unit: the embedding rows
    tokens_per_step: int  # train_batch_size x seq_length
    tokenizer_field: str  # the field the tokenizer came from, for error messages (a data config's wins)
    zero_stage: int  # the ZeRO stage of parallel.deepspeed_config, 0 without DeepSpeed
    # with init.from_pretrained: dotted field -> "config" or the checkpoint and config.json key its value came from
    model_sources: dict[str, str] | None = None


@dataclass(frozen=True)
class RunConfig:
    """The whole run: every group; after resolution also `derived` (None before)."""

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    operation: OperationConfig = field(default_factory=OperationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    init: InitConfig = field(default_factory=InitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    utils: UtilsConfig = field(default_factory=UtilsConfig)
    derived: Derived | None = field(default=None, metadata={"derived": True})

    @property
    def run_dir(self) -> Path:
        """Where the run writes: `trainer.model_path`, or `runs/<model_name>` when it is empty."""
        return Path(self.trainer.model_path) if self.trainer.model_path else Path("runs") / self.trainer.model_name


GROUPS: dict[str, type] = {
    "trainer": TrainerConfig,
    "operation": OperationConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "init": InitConfig,
    "parallel": ParallelConfig,
    "utils": UtilsConfig,
}
