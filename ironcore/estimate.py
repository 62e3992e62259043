"""Back-of-the-envelope numbers for a run: parameter count, FLOPs per token, memory per device.

Everything here is computed from the config alone (no model is built), so `ironcore config --explain`
can show it instantly for a 70B config on a laptop. The formulas are the published ones, named where
they are used; they are estimates, and each function says what it assumes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from ironcore import metrics
from ironcore.config.schema import ModelConfig, RunConfig

GATED_ACTIVATIONS = frozenset({"swiglu", "geglu"})
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_GIB = 1024**3


@dataclass(frozen=True)
class ParamCount:
    """Parameter count by component. `total` is what `sum(p.numel() for p in model.parameters())` reports."""

    embedding: int
    position: int
    attention: int
    mlp: int
    norms: int
    lm_head: int
    total: int
    non_embedding: int


def count_parameters(model: ModelConfig, vocab_size: int) -> ParamCount:
    """Count parameters analytically, following IronCore's decoder layout (nanoGPT / HF GPT-2 / LLaMA).

    Per layer: attention Q and O of width `num_attention_heads * head_dim`, K and V of width
    `num_attention_groups * head_dim` (GQA; None = MHA); an MLP with 2 matrices, or 3 for gated
    activations (swiglu/geglu: gate, up, down); two norms. Pre-LN adds a final norm after the last layer
    (post-LN already ends each layer with one).
    `no_bias` removes every linear bias and the LayerNorm bias (RMSNorm has none anyway).
    Tied embeddings share the LM head with the token embedding; untied ones add a bias-free head.
    `vocab_size` is the embedding's row count: the padded vocabulary (`run.derived.padded_vocab_size`).
    """
    d, f, layers = model.d_model, model.d_ffn, model.num_layers
    q_width = model.num_attention_heads * model.head_dim
    kv_width = (model.num_attention_groups or model.num_attention_heads) * model.head_dim
    bias = not model.no_bias
    embedding = vocab_size * d
    position = model.max_seq_len * d if model.positional_embedding.type == "absolute" else 0
    attention = d * q_width + 2 * d * kv_width + q_width * d + (q_width + 2 * kv_width + d if bias else 0)
    mlp_matrices = 3 if model.activation_type in GATED_ACTIVATIONS else 2
    mlp = mlp_matrices * d * f + ((mlp_matrices - 1) * f + d if bias else 0)
    norm = d * (2 if model.ln_type == "layernorm" and bias else 1)
    lm_head = vocab_size * d if model.untie_embed else 0

    attention_total, mlp_total = layers * attention, layers * mlp
    norms = (2 * layers + (0 if model.post_ln else 1)) * norm
    total = embedding + position + attention_total + mlp_total + norms + lm_head
    return ParamCount(
        embedding=embedding,
        position=position,
        attention=attention_total,
        mlp=mlp_total,
        norms=norms,
        lm_head=lm_head,
        total=total,
        non_embedding=total - embedding - position - lm_head,
    )


def flops_per_token(model: ModelConfig, params: ParamCount, seq_len: int) -> float:
    """Training FLOPs per token from the config alone: `ironcore.metrics.flops_per_token` (PaLM's 6N + 12LHQT).

    N counts every weight matrix a token passes through: non-embedding parameters plus the LM-head
    projection (vocab x d_model, tied or not); embedding and position lookups do no matmul.
    """
    vocab_rows = params.embedding // model.d_model
    matmul_params = params.non_embedding + vocab_rows * model.d_model
    return metrics.flops_per_token(matmul_params, model.num_layers, seq_len, model.num_attention_heads * model.head_dim)


@dataclass(frozen=True)
class Sharding:
    """How the training state is split across the data-parallel ranks (filled in by the translator)."""

    engine: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    shard_size: int = 1
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False


def state_bytes_per_param(precision: str, engine: str) -> dict[str, int]:
    """Bytes per parameter for weights, gradients and AdamW state (Rajbhandari et al. 2020, ZeRO section 3).

    DDP (Accelerate autocast) and FSDP2 keep fp32 parameters and gradients and run the matmuls in the
    autocast dtype: 4 + 4 + 8 (exp_avg, exp_avg_sq in fp32). DeepSpeed with bf16/fp16 keeps 16-bit weights
    and gradients plus an fp32 master copy in the optimizer: 2 + 2 + (4 + 8); in fp32 it is 4 + 4 + 8.
    """
    if engine == "deepspeed" and precision != "float32":
        return {"weights": 2, "gradients": 2, "optimizer": 12}
    return {"weights": 4, "gradients": 4, "optimizer": 8}


def activation_bytes(run: RunConfig, seq_len: int) -> dict[str, int]:
    """Activation memory of one micro batch, Korthikanti et al. 2022 ("Reducing Activation Recomputation").

    Per layer, no tensor/sequence parallelism, 16-bit activations: `s b h (34 + 5 a s / h)` bytes
    (s sequence, b micro batch, h d_model, a heads; 34 s b h for the linear/norm/dropout inputs,
    5 a s^2 b for the attention scores, softmax and its dropout). The paper derives it for d_ffn = 4 h and
    full multi-head attention; it is an approximation for other shapes, and an upper bound when
    SDPA/flash attention does not materialise the scores. fp32 activations double it.
    Recompute: `default` (full) keeps only each layer's 16-bit input, 2 s b h; `optimized` (selective)
    recomputes the attention core and keeps 34 s b h. The fp32 logits for the loss add 4 s b V.
    """
    model = run.model
    s, b, h, a = seq_len, run.trainer.micro_batch_size, model.d_model, model.num_attention_heads
    scale = _DTYPE_BYTES[model.precision] / 2
    if not run.operation.activation_recompute:
        per_layer = s * b * h * (34 + 5 * a * s / h)
    elif run.operation.recompute_strategy == "optimized":
        per_layer = 34 * s * b * h
    else:
        per_layer = 2 * s * b * h
    return {"layers": int(model.num_layers * per_layer * scale), "logits": 4 * s * b * run.derived.padded_vocab_size}


def estimate_memory(run: RunConfig, params: ParamCount, sharding: Sharding, seq_len: int) -> dict[str, int]:
    """Bytes per device (and in host memory, for offload) for weights, gradients, optimizer, activations."""
    per_param = state_bytes_per_param(run.model.precision, sharding.engine)
    n, shards = params.total, sharding.shard_size
    if sharding.engine == "deepspeed":
        stage = sharding.zero_stage
        weights = n * per_param["weights"] // (shards if stage >= 3 else 1)
        gradients = n * per_param["gradients"] // (shards if stage >= 2 else 1)
        optimizer = n * per_param["optimizer"] // (shards if stage >= 1 else 1)
    elif sharding.engine == "fsdp":
        weights, gradients, optimizer = (n * per_param[k] // shards for k in ("weights", "gradients", "optimizer"))
    else:
        weights, gradients, optimizer = (n * per_param[k] for k in ("weights", "gradients", "optimizer"))
    offloaded = {"optimizer": sharding.offload_optimizer, "weights": sharding.offload_params}
    if sharding.engine == "fsdp" and sharding.offload_params:
        offloaded = {"optimizer": True, "weights": True, "gradients": True}
    state = {"weights": weights, "gradients": gradients, "optimizer": optimizer}
    host = sum(v for k, v in state.items() if offloaded.get(k))
    device_state = sum(v for k, v in state.items() if not offloaded.get(k))
    activations = activation_bytes(run, seq_len)
    device = device_state + sum(activations.values())
    return {
        **state,
        "activations": activations["layers"],
        "logits": activations["logits"],
        "offloaded_to_host": host,
        "device_total": device,
    }


def estimate(run: RunConfig, sharding: Sharding = Sharding()) -> dict:
    """Parameter count, FLOPs per token and memory for `run`, as a JSON-able dict (bytes and GiB)."""
    seq_len = run.data.seq_length
    params = count_parameters(run.model, run.derived.padded_vocab_size)
    memory = estimate_memory(run, params, sharding, seq_len)
    return {
        "parameters": asdict(params),
        "seq_len": seq_len,
        "flops_per_token": flops_per_token(run.model, params, seq_len),
        "sharding": asdict(sharding),
        "memory_bytes": memory,
        "memory_gib": {k: round(v / _GIB, 3) for k, v in memory.items()},
    }
