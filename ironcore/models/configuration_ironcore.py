"""IronCore model configuration: the `model` group of a run, in transformers' vocabulary.

`IronCoreConfig` uses transformers' standard attribute names, because Accelerate, DeepSpeed, `generate()`
and `DynamicCache` read them (`hidden_size`, `num_hidden_layers`, ...). The spec's field names map as:

| spec field                                  | IronCoreConfig attribute        | note                                 |
|---------------------------------------------|---------------------------------|--------------------------------------|
| `data.vocab_size`                           | `unpadded_vocab_size`           | real ids; the rest is padding        |
| + `trainer.vocab_padding_unit`              | `vocab_size`                    | rounded up to a multiple of the unit |
| `model.d_model`                             | `hidden_size`                   |                                      |
| `model.d_ffn`                               | `intermediate_size`             |                                      |
| `model.num_layers`                          | `num_hidden_layers`             |                                      |
| `model.num_attention_heads`                 | `num_attention_heads`           |                                      |
| `model.num_attention_groups`                | `num_key_value_heads`           | None -> num_attention_heads; 1 = MQA |
| `model.head_dim`                            | `head_dim`                      | independent of `hidden_size`         |
| `model.max_seq_len`                         | `max_position_embeddings`       |                                      |
| `model.precision`                           | `precision`                     | a hint only, see below               |
| `model.ln_type`                             | `norm_type`                     | `layernorm` / `rmsnorm`              |
| `model.ln_eps`                              | `norm_eps`                      |                                      |
| `model.post_ln`                             | `post_norm`                     |                                      |
| `model.activation_type`                     | `hidden_act` + `gated_mlp`      | see `ACTIVATIONS`                    |
| `model.dropout_embd`                        | `embedding_dropout`             | after token (+ position) embeddings  |
| `model.dropout_attn`                        | `attention_dropout`             | on attention probabilities           |
| `model.dropout_mlp`                         | `hidden_dropout`                | attn and MLP outputs (resid_pdrop)   |
| `model.no_bias`                             | `bias` (negated)                | linear layers and LayerNorm          |
| `model.untie_embed`                         | `tie_word_embeddings` (negated) |                                      |
| `model.qkv_bias`                            | `qkv_bias`                      | None -> `bias`; q/k/v projections    |
| `model.positional_embedding.type`           | `position_embedding_type`       | `absolute` / `rope` / `none`         |
| `model.positional_embedding.base`           | `rope_theta`                    |                                      |
| `model.positional_embedding.scaling_factor` | `rope_scaling_factor`           | positions / it (HF "linear")         |
| `model.positional_embedding.offset`         | `rope_offset`                   | added to every position              |
| `model.positional_embedding.scaling_type`   | `rope_scaling_type`             | `linear` / `llama3` (HF rope_type)   |
| `model.positional_embedding.low_freq_factor`| `rope_low_freq_factor`          | llama3 only                          |
| `model.positional_embedding.high_freq_factor`| `rope_high_freq_factor`        | llama3 only                          |
| `model.positional_embedding.original_max_seq_len` | `rope_original_max_position_embeddings` | llama3 only          |
| `init.init_std`                             | `initializer_range`             |                                      |
| `init.xavier_init`                          | `xavier_init`                   |                                      |
| `operation.activation_recompute`            | `activation_recompute`          |                                      |
| `operation.recompute_strategy`              | `recompute_strategy`            | `default` / `optimized`              |
| `trainer.use_flash_attn`                    | `_attn_implementation`          | flash_attention_2, else sdpa         |

`precision` is stored as a hint and is never applied by the model: weights are built in float32 and training
runs under Accelerate's mixed precision (autocast), which needs float32 master weights. An export that wants
it casts first (`model.to(getattr(torch, config.precision))`). It is kept apart from transformers' own
`dtype`, which `save_pretrained` overwrites with the dtype the weights actually have (and which
`from_pretrained(dtype="auto")` then loads in).

Self-contained on purpose: besides the standard library this file imports only torch and transformers (and
IronCore's error class when IronCore is installed), because exported model directories ship it for `trust_remote_code`.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.utils import is_flash_attn_2_available

try:  # IronCore's user-error type; an exported model directory loads without IronCore installed
    from ironcore.errors import ConfigError
except ImportError:
    ConfigError = ValueError

logger = logging.getLogger(__name__)

# spec activation_type -> (transformers ACT2FN name, gated MLP). gelu_tanh is GPT-2's tanh approximation.
ACTIVATIONS: dict[str, tuple[str, bool]] = {
    "gelu": ("gelu", False),
    "gelu_tanh": ("gelu_pytorch_tanh", False),
    "relu": ("relu", False),
    "silu": ("silu", False),
    "swiglu": ("silu", True),
    "geglu": ("gelu", True),
}
POSITION_EMBEDDINGS = ("absolute", "rope", "none")
NORMS = ("layernorm", "rmsnorm")
RECOMPUTE_STRATEGIES = ("default", "optimized")
ROPE_SCALING_TYPES = ("linear", "llama3")


def padded_vocab_size(vocab_size: int, unit: int) -> int:
    """Round up to a multiple of `unit` so the embedding and LM-head GEMMs hit tensor-core friendly shapes."""
    return math.ceil(vocab_size / unit) * unit


def validate_model_config(model: Any) -> None:
    """Reject `model` group settings no model can be built from, as one ConfigError line naming the fields.

    Pure: reads a `ModelConfig` and raises; the config loader calls it before anything is allocated.
    """
    problems = []
    groups = model.num_attention_groups
    if groups is not None and model.num_attention_heads % groups:
        problems.append(
            f"model.num_attention_groups={groups} must divide model.num_attention_heads={model.num_attention_heads}"
        )
    if model.positional_embedding.type == "rope" and model.head_dim % 2:
        problems.append(f"model.head_dim={model.head_dim} must be even for model.positional_embedding.type=rope")
    if model.activation_type not in ACTIVATIONS:
        problems.append(f"model.activation_type={model.activation_type!r} is not one of {sorted(ACTIVATIONS)}")
    pe = model.positional_embedding
    if pe.scaling_type == "llama3" and not pe.low_freq_factor < pe.high_freq_factor:
        problems.append(
            f"model.positional_embedding.low_freq_factor={pe.low_freq_factor} must be below "
            f"model.positional_embedding.high_freq_factor={pe.high_freq_factor}"
        )
    if problems:
        raise ConfigError("; ".join(problems))


@functools.cache
def resolve_attn_implementation(use_flash_attn: bool) -> str:
    """`trainer.use_flash_attn` -> transformers attention implementation; logged once per process.

    flash-attn needs both the package and a CUDA device; anything else gets PyTorch SDPA, which is as exact
    as eager attention and picks the fastest kernel the device has.
    """
    if not use_flash_attn:
        logger.info("Attention: sdpa (trainer.use_flash_attn is false)")
        return "sdpa"
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA device")
    if not is_flash_attn_2_available():  # the flash-attn package, at a version transformers supports, on CUDA
        missing.append("a usable flash-attn 2 package")
    if missing:
        logger.info("Attention: sdpa (trainer.use_flash_attn is true but %s is missing)", " and ".join(missing))
        return "sdpa"
    logger.info("Attention: flash_attention_2 (flash-attn on CUDA)")
    return "flash_attention_2"


class IronCoreConfig(PretrainedConfig):
    """Architecture of an IronCore decoder-only LM: GPT-2 and LLaMA shapes and everything in between.

    Build it from a run with `IronCoreConfig.from_run_config(run)`; the table in the module docstring maps
    each attribute to its spec field. Invalid combinations raise ConfigError here, before any tensor exists.
    """

    model_type = "ironcore"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 51200
    unpadded_vocab_size: int | None = None
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int = 128
    max_position_embeddings: int = 512
    precision: str = "bfloat16"
    norm_type: str = "layernorm"
    norm_eps: float = 1e-5
    post_norm: bool = False
    hidden_act: str = "gelu"
    gated_mlp: bool = False
    embedding_dropout: float = 0.1
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    bias: bool = True
    qkv_bias: bool | None = None
    tie_word_embeddings: bool = True
    position_embedding_type: str = "absolute"
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0
    rope_offset: int = 0
    rope_scaling_type: str = "linear"
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    initializer_range: float = 0.006
    xavier_init: bool = False
    activation_recompute: bool = False
    recompute_strategy: str = "default"
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.unpadded_vocab_size is None:
            self.unpadded_vocab_size = self.vocab_size
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        self._check()
        super().__post_init__(**kwargs)

    def _check(self) -> None:
        """The rules `validate_model_config` applies to the spec fields, on this config's own attributes."""
        problems = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_key_value_heads={self.num_key_value_heads} (model.num_attention_groups) must divide "
                f"num_attention_heads={self.num_attention_heads} (model.num_attention_heads)"
            )
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} (model.head_dim) must be even for rope")
        for name, value, allowed in (
            ("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDINGS),
            ("norm_type", self.norm_type, NORMS),
            ("hidden_act", self.hidden_act, {act for act, _ in ACTIVATIONS.values()}),
            ("recompute_strategy", self.recompute_strategy, RECOMPUTE_STRATEGIES),
            ("rope_scaling_type", self.rope_scaling_type, ROPE_SCALING_TYPES),
        ):
            if value not in allowed:
                problems.append(f"{name}={value!r} is not one of {sorted(allowed)}")
        if not self.unpadded_vocab_size <= self.vocab_size:
            problems.append(f"unpadded_vocab_size={self.unpadded_vocab_size} exceeds vocab_size={self.vocab_size}")
        if self.rope_scaling_factor <= 0:
            problems.append(
                f"rope_scaling_factor={self.rope_scaling_factor} "
                "(model.positional_embedding.scaling_factor) must be positive"
            )
        if self.rope_scaling_type == "llama3" and not self.rope_low_freq_factor < self.rope_high_freq_factor:
            problems.append(
                f"rope_low_freq_factor={self.rope_low_freq_factor} must be below rope_high_freq_factor="
                f"{self.rope_high_freq_factor} (model.positional_embedding.low_freq_factor / high_freq_factor)"
            )
        if problems:
            raise ConfigError("IronCoreConfig: " + "; ".join(problems))

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor-parallel styles of the layers this architecture has: `gate_proj` exists only in a gated MLP."""
        plan = {
            "layers.*.self_attn.q_proj": "colwise",
            "layers.*.self_attn.k_proj": "colwise",
            "layers.*.self_attn.v_proj": "colwise",
            "layers.*.self_attn.o_proj": "rowwise",
            "layers.*.mlp.gate_proj": "colwise",
            "layers.*.mlp.up_proj": "colwise",
            "layers.*.mlp.down_proj": "rowwise",
        }
        if not self.gated_mlp:
            del plan["layers.*.mlp.gate_proj"]
        return plan

    @property
    def activation_type(self) -> str:
        """The spec's name for this (hidden_act, gated_mlp) pair."""
        return next(name for name, pair in ACTIVATIONS.items() if pair == (self.hidden_act, self.gated_mlp))

    @classmethod
    def from_run_config(cls, run: Any) -> IronCoreConfig:
        """The model of a `RunConfig`: its `model` group plus vocab (data), init, recompute and attention choices."""
        model = run.model
        pe = model.positional_embedding
        hidden_act, gated_mlp = ACTIVATIONS[model.activation_type]
        return cls(
            vocab_size=run.derived.padded_vocab_size,
            unpadded_vocab_size=run.data.vocab_size,
            hidden_size=model.d_model,
            intermediate_size=model.d_ffn,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_attention_heads,
            num_key_value_heads=model.num_attention_groups or model.num_attention_heads,
            head_dim=model.head_dim,
            max_position_embeddings=model.max_seq_len,
            precision=model.precision,
            norm_type=model.ln_type,
            norm_eps=model.ln_eps,
            post_norm=model.post_ln,
            hidden_act=hidden_act,
            gated_mlp=gated_mlp,
            embedding_dropout=model.dropout_embd,
            attention_dropout=model.dropout_attn,
            hidden_dropout=model.dropout_mlp,
            bias=not model.no_bias,
            qkv_bias=model.qkv_bias,
            tie_word_embeddings=not model.untie_embed,
            position_embedding_type=pe.type,
            rope_theta=float(pe.base),
            rope_scaling_factor=float(pe.scaling_factor),
            rope_offset=pe.offset,
            rope_scaling_type=pe.scaling_type,
            rope_low_freq_factor=float(pe.low_freq_factor),
            rope_high_freq_factor=float(pe.high_freq_factor),
            rope_original_max_position_embeddings=pe.original_max_seq_len,
            initializer_range=run.init.init_std,
            xavier_init=run.init.xavier_init,
            activation_recompute=run.operation.activation_recompute,
            recompute_strategy=run.operation.recompute_strategy,
            attn_implementation=resolve_attn_implementation(run.trainer.use_flash_attn),
        )

    def spec_fields(self) -> dict[str, Any]:
        """This architecture under the spec's field names (what error messages and config comparisons show)."""
        return {
            "data.vocab_size": self.unpadded_vocab_size,
            "model.d_model": self.hidden_size,
            "model.d_ffn": self.intermediate_size,
            "model.num_layers": self.num_hidden_layers,
            "model.num_attention_heads": self.num_attention_heads,
            "model.num_attention_groups": self.num_key_value_heads,
            "model.head_dim": self.head_dim,
            "model.max_seq_len": self.max_position_embeddings,
            "model.ln_type": self.norm_type,
            "model.ln_eps": self.norm_eps,
            "model.post_ln": self.post_norm,
            "model.activation_type": self.activation_type,
            "model.no_bias": not self.bias,
            "model.untie_embed": not self.tie_word_embeddings,
            "model.qkv_bias": self.qkv_bias,
            "model.positional_embedding.type": self.position_embedding_type,
            "model.positional_embedding.base": self.rope_theta,
            "model.positional_embedding.scaling_factor": self.rope_scaling_factor,
            "model.positional_embedding.offset": self.rope_offset,
            "model.positional_embedding.scaling_type": self.rope_scaling_type,
            "model.positional_embedding.low_freq_factor": self.rope_low_freq_factor,
            "model.positional_embedding.high_freq_factor": self.rope_high_freq_factor,
            "model.positional_embedding.original_max_seq_len": self.rope_original_max_position_embeddings,
        }


__all__ = ["ACTIVATIONS", "IronCoreConfig", "padded_vocab_size", "resolve_attn_implementation", "validate_model_config"]
