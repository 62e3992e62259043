"""Moving weights between IronCore and transformers' native architectures, and building the model of a run.

Native targets and what they can express (anything else is refused with a ConfigError naming the fields):

- `GPT2LMHeadModel`: learned absolute positions, LayerNorm, pre-LN, biases, a non-gated MLP (gelu, gelu_tanh,
  relu, silu), multi-head attention with `head_dim * num_attention_heads == d_model`; tied or untied head.
- `LlamaForCausalLM`: RoPE (no offset; "linear" or "llama3" rope scaling), RMSNorm, pre-LN, a gated MLP (swiglu,
  geglu), MHA / GQA / MQA, any `head_dim` with `d_model` divisible by the heads (LlamaConfig's rule), biases on
  every projection or none; tied or untied head. Covers LLaMA 1/2/3.x, SmolLM and TinyLlama.
- `MistralForCausalLM`: as LLaMA without biases. Its sliding window is accepted only when it is at least every
  sequence the model sees (then it changes nothing); exports attend to the whole sequence (`sliding_window=null`).
- `Qwen2ForCausalLM`: as LLaMA with biases on q/k/v only (`model.no_bias=true, model.qkv_bias=true`), no
  sliding-window layers (`use_sliding_window`) unless the window covers every sequence.

Other model types (MoE: mixtral, qwen2_moe; q/k norms: qwen3, olmo2; ...) are refused with the supported list,
and within a supported type every setting IronCore cannot compute (other rope types, partial rotary, a mixed
bias layout) is refused naming its config.json field.

Dropout rates are carried where the target has a field for them and are otherwise dropped: they do not change
what a model computes at inference. Exports never contain vocabulary padding rows; converting back pads again
only when the IronCore config asks for it. Converted models keep the source's dtype and train/eval mode.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.initialization import no_init_weights

from ironcore.errors import CheckpointError, ConfigError

from .configuration_ironcore import IronCoreConfig
from .modeling_ironcore import IronCoreForCausalLM

GPT2_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
FROM_GPT2_ACTIVATIONS = {
    "gelu_new": ("gelu_pytorch_tanh", False),
    "gelu_pytorch_tanh": ("gelu_pytorch_tanh", False),
    "gelu": ("gelu", False),
    "relu": ("relu", False),
    "silu": ("silu", False),
    "swish": ("silu", False),
}
LLAMA_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu"}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


# --------------------------------------------------------------------------------------------- IronCore -> native


def _refuse(target: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"cannot convert to {target}: " + "; ".join(problems))


def gpt2_problems(config: IronCoreConfig) -> list[str]:
    """Why `config` cannot be a GPT2LMHeadModel (empty when it can), in spec field names."""
    f = config.spec_fields()
    problems = []
    if f["model.positional_embedding.type"] != "absolute":
        problems.append(f"model.positional_embedding.type={f['model.positional_embedding.type']} (needs absolute)")
    if f["model.ln_type"] != "layernorm":
        problems.append(f"model.ln_type={f['model.ln_type']} (needs layernorm)")
    if f["model.post_ln"]:
        problems.append("model.post_ln=true (needs false)")
    if f["model.activation_type"] not in GPT2_ACTIVATIONS:
        problems.append(
            f"model.activation_type={f['model.activation_type']} (needs one of {', '.join(GPT2_ACTIVATIONS)})"
        )
    if f["model.no_bias"]:
        problems.append("model.no_bias=true (needs false)")
    if not config.qkv_bias:
        problems.append("model.qkv_bias=false (needs true)")
    if config.num_key_value_heads != config.num_attention_heads:
        problems.append(
            f"model.num_attention_groups={config.num_key_value_heads} (needs MHA: {config.num_attention_heads})"
        )
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(
            f"model.head_dim={config.head_dim} (needs model.d_model / model.num_attention_heads = "
            f"{config.hidden_size / config.num_attention_heads:g})"
        )
    return problems


def llama_problems(config: IronCoreConfig) -> list[str]:
    """Why `config` cannot be a LlamaForCausalLM (empty when it can), in spec field names.

    The bias layout is not checked here: each family of the LLaMA architecture has its own (`BIAS_LAYOUTS`).
    """
    f = config.spec_fields()
    problems = []
    if f["model.positional_embedding.type"] != "rope":
        problems.append(f"model.positional_embedding.type={f['model.positional_embedding.type']} (needs rope)")
    elif config.rope_offset:
        problems.append(f"model.positional_embedding.offset={config.rope_offset} (needs 0)")
    if f["model.ln_type"] != "rmsnorm":
        problems.append(f"model.ln_type={f['model.ln_type']} (needs rmsnorm)")
    if f["model.post_ln"]:
        problems.append("model.post_ln=true (needs false)")
    if f["model.activation_type"] not in LLAMA_ACTIVATIONS:
        problems.append(
            f"model.activation_type={f['model.activation_type']} (needs one of {', '.join(LLAMA_ACTIVATIONS)})"
        )
    if config.hidden_size % config.num_attention_heads:
        problems.append(
            f"model.d_model={config.hidden_size} (LlamaConfig needs a multiple of model.num_attention_heads="
            f"{config.num_attention_heads})"
        )
    return problems


def _t(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear (out, in) <-> GPT-2 Conv1D (in, out)."""
    return weight.t().contiguous()


def ironcore_to_gpt2(model: IronCoreForCausalLM) -> GPT2LMHeadModel:
    """The same network as a GPT2LMHeadModel (padding rows trimmed); ConfigError if the config cannot be one."""
    config = model.config
    _refuse("GPT2LMHeadModel", gpt2_problems(config))
    vocab = config.unpadded_vocab_size
    gpt2_config = GPT2Config(
        vocab_size=vocab,
        n_positions=config.max_position_embeddings,
        n_embd=config.hidden_size,
        n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads,
        n_inner=config.intermediate_size,
        activation_function=GPT2_ACTIVATIONS[config.activation_type],
        resid_pdrop=config.hidden_dropout,
        embd_pdrop=config.embedding_dropout,
        attn_pdrop=config.attention_dropout,
        layer_norm_epsilon=config.norm_eps,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    sd = model.state_dict()
    state = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"][:vocab],
        "transformer.wpe.weight": sd["model.embed_positions.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "transformer.ln_f.bias": sd["model.norm.bias"],
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            state[f"{dst}ln_1.{kind}"] = sd[f"{src}attn_norm.{kind}"]
            state[f"{dst}ln_2.{kind}"] = sd[f"{src}mlp_norm.{kind}"]
        qkv = [sd[f"{src}self_attn.{p}_proj.weight"] for p in "qkv"]
        state[f"{dst}attn.c_attn.weight"] = _t(torch.cat(qkv))
        state[f"{dst}attn.c_attn.bias"] = torch.cat([sd[f"{src}self_attn.{p}_proj.bias"] for p in "qkv"])
        state[f"{dst}attn.c_proj.weight"] = _t(sd[f"{src}self_attn.o_proj.weight"])
        state[f"{dst}attn.c_proj.bias"] = sd[f"{src}self_attn.o_proj.bias"]
        state[f"{dst}mlp.c_fc.weight"] = _t(sd[f"{src}mlp.up_proj.weight"])
        state[f"{dst}mlp.c_fc.bias"] = sd[f"{src}mlp.up_proj.bias"]
        state[f"{dst}mlp.c_proj.weight"] = _t(sd[f"{src}mlp.down_proj.weight"])
        state[f"{dst}mlp.c_proj.bias"] = sd[f"{src}mlp.down_proj.bias"]
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = sd["lm_head.weight"][:vocab]
    return _build(GPT2LMHeadModel, gpt2_config, state, like=model)


def _ironcore_to_llama_names(name: str) -> str:
    return name.replace(".attn_norm.", ".input_layernorm.").replace(".mlp_norm.", ".post_attention_layernorm.")


# model_type -> (config class, model class, bias layouts it has as (bias, qkv_bias) -> its config's bias fields)
LLAMA_FAMILY: dict[str, tuple[type, type, dict[tuple[bool, bool], dict[str, Any]]]] = {
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        {(True, True): {"attention_bias": True, "mlp_bias": True}, (False, False): {}},
    ),
    "mistral": (MistralConfig, MistralForCausalLM, {(False, False): {}}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {(False, True): {}}),
}
BIAS_NAMES = {(True, True): "model.no_bias=false", (False, False): "model.no_bias=true with model.qkv_bias unset",
              (False, True): "model.no_bias=true, model.qkv_bias=true"}


def rope_parameters(config: IronCoreConfig) -> dict[str, Any]:
    """transformers' `rope_parameters` for this config's rotary embedding."""
    if config.rope_scaling_type == "llama3":
        return {
            "rope_type": "llama3",
            "rope_theta": config.rope_theta,
            "factor": config.rope_scaling_factor,
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_max_position_embeddings,
        }
    if config.rope_scaling_factor != 1.0:
        return {"rope_type": "linear", "rope_theta": config.rope_theta, "factor": config.rope_scaling_factor}
    return {"rope_type": "default", "rope_theta": config.rope_theta}


def ironcore_to_llama_family(model: IronCoreForCausalLM, model_type: str, **extra: Any) -> PreTrainedModel:
    """The same network as a LLaMA-architecture model of `model_type` (padding rows trimmed); ConfigError if the
    config cannot be one. `extra` goes to the target's config (e.g. `sliding_window` for Mistral)."""
    config = model.config
    config_cls, model_cls, layouts = LLAMA_FAMILY[model_type]
    problems = llama_problems(config)
    layout = (config.bias, config.qkv_bias)
    if layout not in layouts:
        problems.append(f"{BIAS_NAMES[layout] if layout in BIAS_NAMES else layout} (needs " +
                        " or ".join(BIAS_NAMES[k] for k in layouts) + ")")
    _refuse(model_cls.__name__, problems)
    native_config = config_cls(
        vocab_size=config.unpadded_vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act=LLAMA_ACTIVATIONS[config.activation_type],
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=rope_parameters(config),
        attention_dropout=config.attention_dropout,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        **layouts[layout],
        **({"sliding_window": None} if model_type == "mistral" else {}),
        **extra,
    )
    state = {_ironcore_to_llama_names(k): v for k, v in model.state_dict().items()}
    for name in VOCAB_TENSORS:
        state[name] = state[name][: config.unpadded_vocab_size]
    return _build(model_cls, native_config, state, like=model)


def ironcore_to_llama(model: IronCoreForCausalLM) -> LlamaForCausalLM:
    """The same network as a LlamaForCausalLM (padding rows trimmed); ConfigError if the config cannot be one."""
    return ironcore_to_llama_family(model, "llama")


def ironcore_to_mistral(model: IronCoreForCausalLM) -> MistralForCausalLM:
    """The same network as a MistralForCausalLM attending to the whole sequence (no sliding window)."""
    return ironcore_to_llama_family(model, "mistral")


def ironcore_to_qwen2(model: IronCoreForCausalLM) -> Qwen2ForCausalLM:
    """The same network as a Qwen2ForCausalLM (biases on q/k/v only) without sliding-window layers."""
    return ironcore_to_llama_family(model, "qwen2")


# --------------------------------------------------------------------------------------------- native -> IronCore


def from_gpt2_problems(c: GPT2Config) -> list[str]:
    """The GPT2Config fields that IronCore cannot compute (empty when it can)."""
    problems = []
    if c.activation_function not in FROM_GPT2_ACTIVATIONS:
        problems.append(f"activation_function={c.activation_function}")
    if not c.scale_attn_weights:
        problems.append("scale_attn_weights=false")
    if c.scale_attn_by_inverse_layer_idx:
        problems.append("scale_attn_by_inverse_layer_idx=true")
    if c.add_cross_attention:
        problems.append("add_cross_attention=true")
    return problems


def gpt2_ironcore_config(c: GPT2Config, precision: str) -> IronCoreConfig:
    """The IronCoreConfig of a GPT2Config (no vocabulary padding); read from config.json alone, before any weight."""
    hidden_act, gated = FROM_GPT2_ACTIVATIONS[c.activation_function]
    return IronCoreConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.n_inner or 4 * c.n_embd,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        head_dim=c.n_embd // c.n_head,
        max_position_embeddings=c.n_positions,
        precision=precision,
        norm_type="layernorm",
        norm_eps=c.layer_norm_epsilon,
        hidden_act=hidden_act,
        gated_mlp=gated,
        embedding_dropout=c.embd_pdrop,
        attention_dropout=c.attn_pdrop,
        hidden_dropout=c.resid_pdrop,
        tie_word_embeddings=c.tie_word_embeddings,
        position_embedding_type="absolute",
        initializer_range=c.initializer_range,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )


def gpt2_to_ironcore(model: GPT2LMHeadModel) -> IronCoreForCausalLM:
    """A GPT2LMHeadModel as an IronCore model (no vocabulary padding); ConfigError for variants it cannot express."""
    c = model.config
    problems = from_gpt2_problems(c)
    if problems:
        raise ConfigError("cannot convert this GPT2LMHeadModel to IronCore: " + "; ".join(problems))
    config = gpt2_ironcore_config(c, _precision(model))
    sd = model.state_dict()
    state = {
        "model.embed_tokens.weight": sd["transformer.wte.weight"],
        "model.embed_positions.weight": sd["transformer.wpe.weight"],
        "model.norm.weight": sd["transformer.ln_f.weight"],
        "model.norm.bias": sd["transformer.ln_f.bias"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(c.n_layer):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            state[f"{dst}attn_norm.{kind}"] = sd[f"{src}ln_1.{kind}"]
            state[f"{dst}mlp_norm.{kind}"] = sd[f"{src}ln_2.{kind}"]
        q, k, v = _t(sd[f"{src}attn.c_attn.weight"]).chunk(3)
        qb, kb, vb = sd[f"{src}attn.c_attn.bias"].chunk(3)
        state.update(
            {f"{dst}self_attn.q_proj.weight": q, f"{dst}self_attn.k_proj.weight": k, f"{dst}self_attn.v_proj.weight": v}
        )
        state.update(
            {f"{dst}self_attn.q_proj.bias": qb, f"{dst}self_attn.k_proj.bias": kb, f"{dst}self_attn.v_proj.bias": vb}
        )
        state[f"{dst}self_attn.o_proj.weight"] = _t(sd[f"{src}attn.c_proj.weight"])
        state[f"{dst}self_attn.o_proj.bias"] = sd[f"{src}attn.c_proj.bias"]
        state[f"{dst}mlp.up_proj.weight"] = _t(sd[f"{src}mlp.c_fc.weight"])
        state[f"{dst}mlp.up_proj.bias"] = sd[f"{src}mlp.c_fc.bias"]
        state[f"{dst}mlp.down_proj.weight"] = _t(sd[f"{src}mlp.c_proj.weight"])
        state[f"{dst}mlp.down_proj.bias"] = sd[f"{src}mlp.c_proj.bias"]
    return _build(IronCoreForCausalLM, config, state, like=model)


def _bias_layout(c: Any) -> tuple[tuple[bool, bool] | None, list[str]]:
    """(bias, qkv_bias) of a LLaMA-family config, or None with the fields that make it inexpressible."""
    if c.model_type == "qwen2":
        return (False, True), []
    if c.model_type == "mistral":
        return (False, False), []
    if c.attention_bias != c.mlp_bias:
        return None, [f"attention_bias={c.attention_bias} with mlp_bias={c.mlp_bias} (IronCore biases the MLP "
                      "exactly when it biases o_proj)"]
    return (c.attention_bias, c.attention_bias), []


def sliding_window_problems(c: Any, seq_len: int) -> list[str]:
    """A sliding window shorter than `seq_len` (the longest sequence the model will see) changes what attention
    computes, which IronCore cannot express; a longer one changes nothing."""
    if c.model_type == "mistral":
        window, field = c.sliding_window, "sliding_window"
    elif c.model_type == "qwen2" and "sliding_attention" in (c.layer_types or ()):
        window, field = c.sliding_window, "use_sliding_window / layer_types"
    else:
        return []
    if window is None or window >= seq_len:
        return []
    return [f"{field}: a {window}-token sliding window is shorter than the {seq_len}-token sequences this model "
            f"would see (IronCore attends to the whole sequence; set model.max_seq_len <= {window})"]


def from_llama_family_problems(c: Any, seq_len: int | None = None) -> list[str]:
    """The fields of a LLaMA / Mistral / Qwen2 config that IronCore cannot compute (empty when it can)."""
    rope = c.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
    rope_type = rope.get("rope_type", "default")
    problems = []
    if rope_type not in ("default", "linear", "llama3"):
        problems.append(f"rope_parameters.rope_type={rope_type} (IronCore has default, linear and llama3)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"rope_parameters.partial_rotary_factor={rope['partial_rotary_factor']} (IronCore has 1.0)")
    if c.hidden_act not in ("silu", "gelu"):
        problems.append(f"hidden_act={c.hidden_act} (IronCore has silu: swiglu, gelu: geglu)")
    if getattr(c, "pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp={c.pretraining_tp} (IronCore has 1)")
    return problems + _bias_layout(c)[1] + sliding_window_problems(c, seq_len or c.max_position_embeddings)


def llama_ironcore_config(c: Any, precision: str) -> IronCoreConfig:
    """The IronCoreConfig of a LLaMA / Mistral / Qwen2 config (no vocabulary padding), from config.json alone."""
    rope = c.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
    rope_type = rope.get("rope_type", "default")
    layout, _ = _bias_layout(c)
    llama3 = rope_type == "llama3"
    return IronCoreConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings,
        precision=precision,
        norm_type="rmsnorm",
        norm_eps=c.rms_norm_eps,
        hidden_act=c.hidden_act,
        gated_mlp=True,
        embedding_dropout=0.0,
        attention_dropout=float(c.attention_dropout or 0.0),
        hidden_dropout=0.0,
        bias=layout[0],
        qkv_bias=layout[1],
        tie_word_embeddings=c.tie_word_embeddings,
        position_embedding_type="rope",
        rope_theta=float(rope["rope_theta"]),
        rope_scaling_factor=float(rope.get("factor", 1.0)) if rope_type in ("linear", "llama3") else 1.0,
        rope_scaling_type="llama3" if llama3 else "linear",
        rope_low_freq_factor=float(rope["low_freq_factor"]) if llama3 else 1.0,
        rope_high_freq_factor=float(rope["high_freq_factor"]) if llama3 else 4.0,
        rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]) if llama3 else 8192,
        initializer_range=c.initializer_range,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )


def llama_to_ironcore(model: PreTrainedModel, seq_len: int | None = None) -> IronCoreForCausalLM:
    """A LLaMA, Mistral or Qwen2 model as an IronCore model (no vocabulary padding); ConfigError for variants it
    cannot express. `seq_len` (default: the model's max_position_embeddings) is the longest sequence the model will
    see, which a sliding window must cover."""
    c = model.config
    problems = from_llama_family_problems(c, seq_len)
    if problems:
        raise ConfigError(f"cannot convert this {type(model).__name__} to IronCore: " + "; ".join(problems))
    config = llama_ironcore_config(c, _precision(model))
    state = {
        k.replace(".input_layernorm.", ".attn_norm.").replace(".post_attention_layernorm.", ".mlp_norm."): v
        for k, v in model.state_dict().items()
    }
    return _build(IronCoreForCausalLM, config, state, like=model)


def _precision(model: PreTrainedModel) -> str:
    return str(model.dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------- loading weights


def load_state(model: PreTrainedModel, state: dict[str, torch.Tensor], source: str, share: bool = False) -> None:
    """Copy `state` into `model`; a missing, unexpected or mis-shaped tensor is a one-line CheckpointError.

    Tied parameters (the LM head when `tie_word_embeddings`) follow their source and are skipped. `share` makes the
    model's parameters the given tensors (no copy: `model` may then be a meta-device skeleton).
    """
    tied = set(model.all_tied_weights_keys)
    expected = {k: v for k, v in model.state_dict().items() if k not in tied}
    state = {k: v for k, v in state.items() if k not in tied}
    _check_names_and_shapes({k: tuple(v.shape) for k, v in state.items()}, expected, source)
    if share:
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        return
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)


def _check_names_and_shapes(found: dict[str, tuple], expected: dict[str, torch.Tensor], source: str) -> None:
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: tensor {missing[0]} is missing{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source}: tensor {unexpected[0]} is not part of the model{more}")
    for name, tensor in expected.items():
        if found[name] != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {found[name]} but the config expects {tuple(tensor.shape)}"
            )


def uninitialized(model_cls: type, config: Any) -> Any:
    """A model whose weights are about to be overwritten: no random init (nor its RNG draws), but tied as usual."""
    with no_init_weights():
        model = model_cls(config)
    model.tie_weights()
    return model


def skeleton(model_cls: type, config: Any) -> Any:
    """A model on the meta device, whose parameters `load_state(..., share=True)` then sets. Only for IronCore
    models: they hold no buffers (rotary frequencies are computed per call), so nothing stays on meta."""
    with torch.device("meta"):
        return model_cls(config)


def _build(model_cls: type, config: Any, state: dict[str, torch.Tensor], like: PreTrainedModel) -> Any:
    model = uninitialized(model_cls, config)
    load_state(model, state, f"{type(like).__name__} weights")
    return model.to(like.dtype).train(like.training)


def checkpoint_shapes(path: Path) -> dict[str, tuple]:
    """Tensor name -> shape of a model directory's weights, read from the headers (no tensor is loaded).

    Reading every header also proves each weight file whole: safetensors refuses a file whose size is not
    what its header says, so a truncated or corrupt file is one CheckpointError naming it, before any load.
    """
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        files = shard_files(index)
    elif (path / "pytorch_model.bin").is_file():
        return bin_shapes(path / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    shapes = {}
    for file in files:
        shapes.update(safetensors_shapes(file))
    return shapes


def shard_files(index: Path) -> list[Path]:
    """The weight files a `model.safetensors.index.json` names, each of which must exist."""
    try:
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index}: not a safetensors index (JSON with a weight_map): {err}") from None
    files = [index.parent / name for name in names]
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{index}: names {file.name}, which is missing")
    return files


def safetensors_shapes(file: Path) -> dict[str, tuple]:
    """Shapes from one safetensors header; safe_open also checks the file's size against it."""
    try:
        with safe_open(file, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt ({err})") from None


def bin_shapes(file: Path) -> dict[str, tuple]:
    """Shapes of a `pytorch_model.bin`, loaded on the meta device with `weights_only=True` (no code runs)."""
    try:
        state = torch.load(file, map_location="meta", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{file}: not a readable PyTorch weights file, truncated or corrupt ({reason})") from None
    return {k: tuple(v.shape) for k, v in state.items()}


ARCHITECTURES: dict[str, tuple[type, type]] = {
    "ironcore": (IronCoreConfig, IronCoreForCausalLM),
    "gpt2": (GPT2Config, GPT2LMHeadModel),
    **{name: (config_cls, model_cls) for name, (config_cls, model_cls, _) in LLAMA_FAMILY.items()},
}


def _check_checkpoint(path: Path, model_cls: type, config: Any) -> None:
    """Compare the weights on disk with what `config` builds, so a mismatch names the tensor and both shapes."""
    with torch.device("meta"):
        skeleton = model_cls(config)
    tied = set(skeleton.all_tied_weights_keys)
    expected = {k: v for k, v in skeleton.state_dict().items() if k not in tied}
    ignored = [re.compile(p) for p in skeleton._keys_to_ignore_on_load_unexpected or ()]
    found = {}
    for name, shape in checkpoint_shapes(path).items():
        # base-model checkpoints omit the prefix: the Hub's gpt2 stores `h.0...`, not `transformer.h.0...`
        if name not in expected and f"{skeleton.base_model_prefix}.{name}" in expected:
            name = f"{skeleton.base_model_prefix}.{name}"
        if name in expected or name not in tied and not any(p.search(name) for p in ignored):
            found[name] = shape
    _check_names_and_shapes(found, expected, str(path))


def read_model_type(path: Path) -> str:
    """The `model_type` of a model directory, refused unless IronCore can load it."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{path}: no config.json (expected a model directory of type {', '.join(ARCHITECTURES)})"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    return model_type


def check_model_dir(path: Path) -> str:
    """The model type of a model directory, whose weight files' headers are checked against its config: a broken
    directory is one CheckpointError naming the file before any weight is loaded."""
    model_type = read_model_type(path)
    config_cls, model_cls = ARCHITECTURES[model_type]
    _check_checkpoint(path, model_cls, config_cls.from_pretrained(path))
    return model_type


def native_problems(config: Any, seq_len: int | None = None) -> list[str]:
    """The config.json fields of a supported checkpoint that IronCore cannot compute, read before any weight."""
    if config.model_type == "ironcore":
        return []
    if config.model_type == "gpt2":
        return from_gpt2_problems(config)
    return from_llama_family_problems(config, seq_len)


# --------------------------------------------------------------------------------------------- sources

# What a Hub snapshot needs: config, safetensors weights (never pickles), tokenizer and generation config.
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
             "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "added_tokens.json"]
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_local(source: str) -> bool:
    """A path (absolute, relative with ./ or ../, ~, or an existing directory) rather than a Hub name."""
    return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().is_dir()


def pretrained_dir(source: str | Path) -> Path:
    """The local directory of `init.from_pretrained`: a local directory as given, or a Hub name (`org/name`,
    optionally `org/name@revision`) fetched into the HF cache by huggingface_hub (token from `hf auth login` /
    HF_TOKEN; nothing is fetched again once cached, and HF_HUB_OFFLINE=1 reads the cache only).

    Only safetensors weights are fetched: a pickle (`pytorch_model.bin`) can run code when loaded, and a Hub
    repository is not a source IronCore trusts. Every failure is one CheckpointError naming the source."""
    source = str(source)
    if looks_local(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"init.from_pretrained: {path} is not a directory (expected a model directory "
                                  "with config.json, or a Hub name)")
        return path
    repo_id, _, revision = source.partition("@")
    if not HUB_NAME.fullmatch(repo_id):
        raise CheckpointError(f"init.from_pretrained: {source!r} is neither a local directory nor a Hub name "
                              "(org/name or org/name@revision)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise CheckpointError(f"init.from_pretrained: {repo_id} is a gated repository: accept its terms on "
                              "huggingface.co, then log in with `hf auth login` (or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"init.from_pretrained: no Hub repository named {repo_id} (or it is private: log in "
                              "with `hf auth login` or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"init.from_pretrained: {repo_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        reason = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
                  else "the Hub cannot be reached")
        raise CheckpointError(f"init.from_pretrained: {source} is not in the local cache ({constants.HF_HUB_CACHE}) "
                              f"and {reason}") from None
    except (HfHubHTTPError, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"init.from_pretrained: {source} could not be fetched ({reason})") from None
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"init.from_pretrained: {source} has no safetensors weights; IronCore fetches no "
                              "pickled .bin weights from the Hub (loading one can run code): download it, check it "
                              "and give its local directory (read with torch.load(weights_only=True))")
    return path


# spec field -> the config.json key it comes from, per family (what `ironcore config --explain` names)
_COMMON_KEYS = {"data.vocab_size": "vocab_size", "model.untie_embed": "tie_word_embeddings"}
SOURCE_KEYS: dict[str, dict[str, str]] = {
    "gpt2": {**_COMMON_KEYS, "model.d_model": "n_embd", "model.d_ffn": "n_inner", "model.num_layers": "n_layer",
             "model.num_attention_heads": "n_head", "model.num_attention_groups": "n_head",
             "model.head_dim": "n_embd / n_head", "model.max_seq_len": "n_positions",
             "model.ln_eps": "layer_norm_epsilon", "model.activation_type": "activation_function",
             "model.dropout_embd": "embd_pdrop", "model.dropout_attn": "attn_pdrop",
             "model.dropout_mlp": "resid_pdrop"},
    "llama": {**_COMMON_KEYS, "model.d_model": "hidden_size", "model.d_ffn": "intermediate_size",
              "model.num_layers": "num_hidden_layers", "model.num_attention_heads": "num_attention_heads",
              "model.num_attention_groups": "num_key_value_heads", "model.head_dim": "head_dim",
              "model.max_seq_len": "max_position_embeddings", "model.ln_eps": "rms_norm_eps",
              "model.activation_type": "hidden_act", "model.no_bias": "attention_bias, mlp_bias",
              "model.qkv_bias": "attention_bias", "model.dropout_attn": "attention_dropout",
              "model.positional_embedding.base": "rope_parameters.rope_theta",
              "model.positional_embedding.scaling_type": "rope_parameters.rope_type",
              "model.positional_embedding.scaling_factor": "rope_parameters.factor",
              "model.positional_embedding.low_freq_factor": "rope_parameters.low_freq_factor",
              "model.positional_embedding.high_freq_factor": "rope_parameters.high_freq_factor",
              "model.positional_embedding.original_max_seq_len": "rope_parameters.original_max_position_embeddings"},
}
SOURCE_KEYS["mistral"] = {**SOURCE_KEYS["llama"], "model.no_bias": "(Mistral has no biases)",
                          "model.qkv_bias": "(Mistral has no biases)"}
SOURCE_KEYS["qwen2"] = {**SOURCE_KEYS["llama"], "model.no_bias": "(Qwen2: biases on q/k/v only)",
                        "model.qkv_bias": "(Qwen2: biases on q/k/v only)"}
DROPOUT_FIELDS = {"model.dropout_embd": "embedding_dropout", "model.dropout_attn": "attention_dropout",
                  "model.dropout_mlp": "hidden_dropout"}
SOURCE_KEYS["ironcore"] = {
    "data.vocab_size": "unpadded_vocab_size", "model.d_model": "hidden_size", "model.d_ffn": "intermediate_size",
    "model.num_layers": "num_hidden_layers", "model.num_attention_heads": "num_attention_heads",
    "model.num_attention_groups": "num_key_value_heads", "model.head_dim": "head_dim",
    "model.max_seq_len": "max_position_embeddings", "model.ln_type": "norm_type", "model.ln_eps": "norm_eps",
    "model.post_ln": "post_norm", "model.activation_type": "hidden_act, gated_mlp", "model.no_bias": "bias",
    "model.untie_embed": "tie_word_embeddings", "model.qkv_bias": "qkv_bias",
    "model.positional_embedding.type": "position_embedding_type", "model.positional_embedding.base": "rope_theta",
    "model.positional_embedding.scaling_factor": "rope_scaling_factor",
    "model.positional_embedding.offset": "rope_offset", "model.positional_embedding.scaling_type": "rope_scaling_type",
    "model.positional_embedding.low_freq_factor": "rope_low_freq_factor",
    "model.positional_embedding.high_freq_factor": "rope_high_freq_factor",
    "model.positional_embedding.original_max_seq_len": "rope_original_max_position_embeddings",
    **DROPOUT_FIELDS,
}


def checkpoint_fields(source: str | Path, seq_len: int | None = None) -> tuple[Path, dict[str, tuple[Any, str]]]:
    """The local directory of a pretrained source and, per spec field (architecture, vocabulary, dropout), its
    value in the checkpoint and the config.json key it comes from. Only config.json is read (and, for a Hub name,
    the snapshot fetched) and the weight files' headers (a broken file is one CheckpointError naming it); what
    IronCore cannot express is one CheckpointError naming the config.json field."""
    path = pretrained_dir(source)
    model_type = check_model_dir(path)  # a broken weight file is named now, before any field is compared
    config = pretrained_config(path, model_type, seq_len)
    values = {**config.spec_fields(), **{k: getattr(config, v) for k, v in DROPOUT_FIELDS.items()}}
    keys = SOURCE_KEYS[model_type]
    return path, {name: (value, keys.get(name, f"({model_type} architecture)")) for name, value in values.items()}


def load_pretrained(path: str | Path, run_or_config: Any = None) -> IronCoreForCausalLM:
    """An IronCore model from a directory of a supported type (`ARCHITECTURES`, read from its config.json).

    The weights are float32 whatever the checkpoint's dtype. Without `run_or_config` the model keeps the
    directory's architecture. With a RunConfig or IronCoreConfig
    the architecture must match it (else CheckpointError naming the differing fields) and the model takes that
    config's training settings (dropout, recompute, attention, vocabulary padding).

    The checkpoint goes straight into IronCore's parameters, one tensor at a time (`ironcore_tensors`) into a
    meta-device skeleton: no native transformers model is built, so host memory peaks at about the float32 model
    plus the mapped pages of the one tensor being read (benchmarks/import_memory.py measures it).
    """
    target = None
    if run_or_config is not None:
        target = (
            run_or_config
            if isinstance(run_or_config, IronCoreConfig)
            else IronCoreConfig.from_run_config(run_or_config)
        )
    path, model_type, source = _checked_source(path, target)
    model = skeleton(IronCoreForCausalLM, target or source)
    state = dict(ironcore_tensors(path, model_type, model.config, source.unpadded_vocab_size))
    load_state(model, state, f"{path} ({model_type} weights)", share=True)
    _take_generation_config(model, path)
    return model.train(target is not None)  # from_pretrained's eval mode, or ready to train for a run


def load_partitioned(path: str | Path, config: IronCoreConfig) -> IronCoreForCausalLM:
    """ZeRO-3: a pretrained model built already partitioned, with no rank ever holding the whole checkpoint.

    As transformers' from_pretrained does under ZeRO-3, the model is built inside `deepspeed.zero.Init`: each
    parameter is partitioned over the ranks as it is created, and not initialised. Rank 0 alone then reads the
    checkpoint, one tensor at a time, and scatters each tensor's flat slices straight into the ranks' partitions
    (`_scatter_into_partition`); the other ranks walk the same conversion on meta tensors and read nothing. Rank 0
    so holds its partition plus the one tensor being read, the others their partition alone.
    """
    import deepspeed
    from transformers.integrations import deepspeed_config

    path, model_type, source = _checked_source(path, config)
    meta = skeleton(IronCoreForCausalLM, config)
    tied = set(meta.all_tied_weights_keys)
    expected = {k: v for k, v in meta.state_dict().items() if k not in tied}
    walk = list(ironcore_tensors(path, model_type, config, source.unpadded_vocab_size, meta=True))  # reads nothing
    _check_names_and_shapes({name: tuple(t.shape) for name, t in walk}, expected, f"{path} ({model_type} weights)")
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
        model = IronCoreForCausalLM(config)
    model.tie_weights()  # as transformers does after zero.Init: post_init's tying is skipped inside no_init_weights
    params = dict(model.named_parameters())
    main = torch.distributed.get_rank() == 0
    tensors = ironcore_tensors(path, model_type, config, source.unpadded_vocab_size) if main else iter(walk)
    for name, tensor in tensors:
        _scatter_into_partition(params[name], tensor if main else None)
        del tensor
    _take_generation_config(model, path)
    return model.train()


def _scatter_into_partition(param: torch.nn.Parameter, full: torch.Tensor | None) -> None:
    """Rank 0's `full` tensor into every rank's partition of a ZeRO-3 parameter, by one `scatter`.

    DeepSpeed partitions a parameter flat: rank r's `ds_tensor` holds elements [r*n, (r+1)*n) of the flattened
    tensor, the last partition zero-padded to n (`Init._partition_param`). No rank gathers the full parameter,
    as `GatheredParameters` would (an all-gather before the write, a broadcast after it).
    """
    part = param.ds_tensor
    world = torch.distributed.get_world_size()
    if part.numel() * world < param.ds_numel:
        raise RuntimeError(f"ZeRO-3 partition of {tuple(param.ds_shape)} is not flat over {world} ranks")
    chunks = None
    if full is not None:
        chunks = list(full.to(part.dtype).reshape(-1).split(part.numel()))
        chunks += [chunks[-1].new_zeros(0)] * (world - len(chunks))
        chunks = [c if c.numel() == part.numel() else torch.cat([c, c.new_zeros(part.numel() - c.numel())])
                  for c in chunks]
    with torch.no_grad():
        torch.distributed.scatter(part, chunks, src=0)


def _checked_source(path: str | Path, target: IronCoreConfig | None) -> tuple[Path, str, IronCoreConfig]:
    """The local directory, model type and IronCoreConfig of a pretrained source, checked loadable and, given a
    target config, of the same architecture (else CheckpointError naming the differing fields)."""
    path = pretrained_dir(path)
    model_type = check_model_dir(path)
    source = pretrained_config(path, model_type, target.max_position_embeddings if target is not None else None)
    if target is not None:
        check_same_architecture(source, target, str(path))
    return path, model_type, source


def _take_generation_config(model: IronCoreForCausalLM, path: Path) -> None:
    if (path / "generation_config.json").is_file():  # as from_pretrained: the checkpoint's decoding defaults
        model.generation_config = GenerationConfig.from_pretrained(path)


def pretrained_config(path: Path, model_type: str, seq_len: int | None = None) -> IronCoreConfig:
    """The IronCoreConfig of a checked model directory, from its config.json alone (float32, no vocabulary
    padding for native types); what IronCore cannot express is one CheckpointError naming the config.json field.
    `seq_len` is the longest sequence the model will see (a sliding window must cover it)."""
    native = ARCHITECTURES[model_type][0].from_pretrained(path)
    problems = native_problems(native, seq_len)
    if problems:
        raise CheckpointError(f"{path}: IronCore cannot express this {model_type} checkpoint: " + "; ".join(problems))
    if model_type == "ironcore":
        return native
    if model_type == "gpt2":
        return gpt2_ironcore_config(native, "float32")
    return llama_ironcore_config(native, "float32")


def _copy(stored: torch.Tensor) -> torch.Tensor:
    return stored.to(torch.float32, copy=True)


def _transposed(stored: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D (in, out) as nn.Linear's (out, in), copied straight from the stored tensor."""
    return torch.empty(stored.shape[::-1], dtype=torch.float32, device=stored.device).copy_(stored.t())


Reader = Callable[..., Any]


def tensor_reader(path: Path, prefix: str, meta: bool = False) -> Reader:
    """`read(name, make=_copy)`: `make` applied to one stored tensor of a model directory, under its full name
    (`prefix.` added where a base-model checkpoint omits it, as the Hub's gpt2 stores `h.0...`). `make` gets the
    tensor as stored (any dtype, possibly a view of the mapped file) and returns new float32 tensors on the stored
    tensor's device, so a transpose, split or padding is written straight into the parameter with no intermediate
    copy. With `meta` the stored tensors are meta tensors of the headers' shapes: nothing is read, and the same
    conversion code gives every output's name and shape.

    Each safetensors read opens the file anew, so the mapped pages of a tensor are released once it is copied:
    a mapping kept open would end up holding the whole file besides the model. A local `pytorch_model.bin`
    (weights_only) is mapped once, so it peaks at about twice the model.
    """
    def full(name: str) -> str:
        return name if name.startswith(f"{prefix}.") or name.startswith("lm_head.") else f"{prefix}.{name}"

    if meta:
        shapes = {full(name): shape for name, shape in checkpoint_shapes(path).items()}
        return lambda name, make=_copy: make(torch.empty(shapes[name], device="meta"))

    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file() or index.is_file():
        files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else shard_files(index)
        where = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                where.update({full(name): (file, name) for name in f.keys()})

        def read(name: str, make: Callable[[torch.Tensor], Any] = _copy) -> Any:
            file, stored = where[name]
            with safe_open(file, framework="pt") as f:
                return make(f.get_tensor(stored))

        return read
    state = {full(k): v for k, v in torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True,
                                               mmap=True).items()}
    return lambda name, make=_copy: make(state[name])


def ironcore_tensors(path: Path, model_type: str, config: IronCoreConfig, source_vocab: int, meta: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """IronCore's tensors for `config`, read lazily from a checked `model_type` directory one at a time and
    renamed, transposed, split and cast to float32 on the way, each written once into its final tensor. The
    vocabulary tensors are the checkpoint's first `source_vocab` rows, zero-padded to `config.vocab_size`; they are
    the largest and come first, while the pages mapped to read them are not yet on top of the rest of the model. A
    tied head is not read: it follows the embedding. `meta`: the same names and shapes, nothing read."""
    read = tensor_reader(path, ARCHITECTURES[model_type][1].base_model_prefix, meta)

    def rows(stored: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(config.vocab_size, stored.shape[1], dtype=torch.float32, device=stored.device)
        out[:source_vocab] = stored[:source_vocab]
        return out

    if model_type == "gpt2":
        return _gpt2_tensors(read, config, rows)
    rename = (lambda name: name) if model_type == "ironcore" else _ironcore_to_llama_names
    model = skeleton(IronCoreForCausalLM, config)
    tied = set(model.all_tied_weights_keys)
    names = sorted((n for n in model.state_dict() if n not in tied), key=lambda n: n not in VOCAB_TENSORS)
    return ((name, read(rename(name), rows if name in VOCAB_TENSORS else _copy)) for name in names)


def _gpt2_tensors(read: Reader, config: IronCoreConfig, rows: Callable[[torch.Tensor], torch.Tensor]
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """IronCore's tensors from a GPT2LMHeadModel's, lazily: Conv1D weights transposed, c_attn split in q/k/v."""
    yield "model.embed_tokens.weight", read("transformer.wte.weight", rows)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", read("lm_head.weight", rows)
    yield "model.embed_positions.weight", read("transformer.wpe.weight")
    yield "model.norm.weight", read("transformer.ln_f.weight")
    yield "model.norm.bias", read("transformer.ln_f.bias")
    for i in range(config.num_hidden_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            yield f"{dst}attn_norm.{kind}", read(f"{src}ln_1.{kind}")
            yield f"{dst}mlp_norm.{kind}", read(f"{src}ln_2.{kind}")
        qkv = read(f"{src}attn.c_attn.weight", lambda w: [_transposed(part) for part in w.chunk(3, dim=1)])
        qkv_bias = read(f"{src}attn.c_attn.bias", lambda b: [_copy(part) for part in b.chunk(3)])
        for p, weight, bias in zip("qkv", qkv, qkv_bias):
            yield f"{dst}self_attn.{p}_proj.weight", weight
            yield f"{dst}self_attn.{p}_proj.bias", bias
        yield f"{dst}self_attn.o_proj.weight", read(f"{src}attn.c_proj.weight", _transposed)
        yield f"{dst}self_attn.o_proj.bias", read(f"{src}attn.c_proj.bias")
        yield f"{dst}mlp.up_proj.weight", read(f"{src}mlp.c_fc.weight", _transposed)
        yield f"{dst}mlp.up_proj.bias", read(f"{src}mlp.c_fc.bias")
        yield f"{dst}mlp.down_proj.weight", read(f"{src}mlp.c_proj.weight", _transposed)
        yield f"{dst}mlp.down_proj.bias", read(f"{src}mlp.c_proj.bias")


def _same(a: Any, b: Any) -> bool:
    return math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) or isinstance(b, float) else a == b


LLAMA3_FIELDS = ("low_freq_factor", "high_freq_factor", "original_max_seq_len")


def check_same_architecture(found: IronCoreConfig, wanted: IronCoreConfig, source: str) -> None:
    """CheckpointError naming every spec field where a pretrained model's architecture differs from the config's.

    max_seq_len only matters for learned absolute positions (a table of that size); the rope fields only for rope.
    """
    have, want = found.spec_fields(), wanted.spec_fields()
    skip = set()
    if wanted.position_embedding_type != "absolute":
        skip.add("model.max_seq_len")
    rope_fields = ("base", "scaling_factor", "offset", "scaling_type", *LLAMA3_FIELDS)
    if wanted.position_embedding_type != "rope":
        skip |= {f"model.positional_embedding.{k}" for k in rope_fields}
    elif wanted.rope_scaling_type != "llama3":
        skip |= {f"model.positional_embedding.{k}" for k in LLAMA3_FIELDS}
    differing = [
        f"{k} is {have[k]} there but {want[k]} in the config"
        for k in want
        if k not in skip and not _same(have[k], want[k])
    ]
    if differing:
        raise CheckpointError(f"{source}: the pretrained model does not match the run's model: " + "; ".join(differing))


def retarget(model: IronCoreForCausalLM, config: IronCoreConfig) -> IronCoreForCausalLM:
    """`model`'s weights in a new model built from `config` (same architecture), re-padding the vocabulary rows."""
    vocab = model.config.unpadded_vocab_size
    state = model.state_dict()
    tied = set(model.all_tied_weights_keys)
    for name in VOCAB_TENSORS:
        if name in tied:  # a tied head follows the embedding
            continue
        rows = state[name][:vocab]
        state[name] = torch.cat([rows, rows.new_zeros(config.vocab_size - vocab, rows.shape[1])])
    target = uninitialized(IronCoreForCausalLM, config)
    load_state(target, state, "pretrained IronCore weights")
    return target


def ironcore_to_source(model: IronCoreForCausalLM, source_config: dict[str, Any]) -> PreTrainedModel:
    """The model in the architecture of the checkpoint it was fine-tuned from: the source's own config.json
    (model_type, architectures, rope type and parameters, theta, eps, bias flags, sliding window, token ids) with
    this model's weights, so the export is what the source was, trained further. CheckpointError when the model no
    longer has the source's architecture (only the rope context may differ: the source's is kept)."""
    model_type = source_config.get("model_type")
    if model_type == "ironcore":
        return trim_vocab_padding(model)
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"the source checkpoint's model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(ARCHITECTURES)})")
    config_cls, model_cls = ARCHITECTURES[model_type]
    config = config_cls.from_dict(source_config)
    from_native = gpt2_ironcore_config if model_type == "gpt2" else llama_ironcore_config
    source = from_native(config, "float32")
    check_same_architecture(source, model.config, "the source checkpoint")
    native = ironcore_to_gpt2(model) if model_type == "gpt2" else ironcore_to_llama_family(model, model_type)
    out = uninitialized(model_cls, config)
    load_state(out, native.state_dict(), f"{type(native).__name__} weights")
    return out.to(model.dtype).train(model.training)


def trim_vocab_padding(model: IronCoreForCausalLM) -> IronCoreForCausalLM:
    """A copy without vocabulary padding rows, for exports in IronCore's own format."""
    config = copy.deepcopy(model.config)
    config.vocab_size = config.unpadded_vocab_size
    return retarget(model, config).to(model.dtype).train(model.training)


def loads_on_main_process_only(run: Any) -> bool:
    """Whether only rank 0 builds (or loads) the initial weights while the other ranks build on the meta device,
    so N ranks on a node do not hold N full copies: FSDP2's `cpu_ram_efficient_loading` (translate.py) then
    broadcasts rank 0's tensors while sharding, which every FSDP run uses (all ranks start from rank 0's weights).
    Not for DPO, whose live reference is a full copy of the model made on every rank before sharding, nor with
    trainer.torch_compile, whose speed check runs a layer before sharding: those build full weights everywhere."""
    return run.parallel.use_fsdp and _whole_model_not_needed(run)


def loads_partitioned(run: Any) -> bool:
    """Whether a pretrained checkpoint is loaded into a model partitioned from the start (`load_partitioned`):
    under ZeRO-3, with the same exceptions as `loads_on_main_process_only`. A fresh model is still built whole
    on every rank (same seed, so the same weights) and partitioned by DeepSpeed."""
    return run.derived.zero_stage == 3 and bool(run.init.from_pretrained) and _whole_model_not_needed(run)


def _whole_model_not_needed(run: Any) -> bool:
    return run.data.task_type != "dpo" and not run.trainer.torch_compile


def build_model(run: Any) -> IronCoreForCausalLM:
    """The model of a run: fresh weights from `init` (seeded), or `init.from_pretrained` checked against `model`.

    With `init.data_parallel_random_init` each rank draws its own weights (seed + rank); otherwise every rank
    draws the same ones. The seed is used in a forked RNG, so building a model leaves the global RNG alone.
    Under FSDP only rank 0 materialises the weights (`loads_on_main_process_only`); the others build on meta.
    Under ZeRO-3 a pretrained model is partitioned as it is built and filled from rank 0's reads.
    """
    config = IronCoreConfig.from_run_config(run)
    if loads_on_main_process_only(run) and run.parallel.rank > 0:
        return skeleton(IronCoreForCausalLM, config)  # rank 0's weights arrive while accelerate shards the model
    if loads_partitioned(run):
        return load_partitioned(run.init.from_pretrained, config)
    if run.init.from_pretrained:
        return load_pretrained(run.init.from_pretrained, config)
    seed = run.init.seed + (max(run.parallel.rank, 0) if run.init.data_parallel_random_init else 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IronCoreForCausalLM(config)
