"""Moving weights between IronCore and transformers' native architectures, and building the model of a run.

Native targets and what they can express (anything else is refused with a ConfigError naming the fields):

- `GPT2LMHeadModel`: learned absolute positions, LayerNorm, pre-LN, biases, a non-gated MLP (gelu, gelu_tanh,
  relu, silu), multi-head attention with `head_dim * num_attention_heads == d_model`; tied or untied head.
- `LlamaForCausalLM`: RoPE (no offset; `scaling_factor` becomes "linear" rope scaling), RMSNorm, pre-LN, a gated
  MLP (swiglu, geglu), MHA / GQA / MQA, any `head_dim` with `d_model` divisible by the heads (LlamaConfig's rule),
  biases on every projection or none; tied or untied head.

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
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel
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
    """Why `config` cannot be a LlamaForCausalLM (empty when it can), in spec field names."""
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


def ironcore_to_llama(model: IronCoreForCausalLM) -> LlamaForCausalLM:
    """The same network as a LlamaForCausalLM (padding rows trimmed); ConfigError if the config cannot be one."""
    config = model.config
    _refuse("LlamaForCausalLM", llama_problems(config))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling_factor != 1.0:
        rope = {"rope_type": "linear", "rope_theta": config.rope_theta, "factor": config.rope_scaling_factor}
    llama_config = LlamaConfig(
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
        rope_parameters=rope,
        attention_bias=config.bias,
        mlp_bias=config.bias,
        attention_dropout=config.attention_dropout,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    state = {_ironcore_to_llama_names(k): v for k, v in model.state_dict().items()}
    for name in VOCAB_TENSORS:
        state[name] = state[name][: config.unpadded_vocab_size]
    return _build(LlamaForCausalLM, llama_config, state, like=model)


# --------------------------------------------------------------------------------------------- native -> IronCore


def gpt2_to_ironcore(model: GPT2LMHeadModel) -> IronCoreForCausalLM:
    """A GPT2LMHeadModel as an IronCore model (no vocabulary padding); ConfigError for variants it cannot express."""
    c = model.config
    problems = []
    if c.activation_function not in FROM_GPT2_ACTIVATIONS:
        problems.append(f"activation_function={c.activation_function}")
    if not c.scale_attn_weights:
        problems.append("scale_attn_weights=false")
    if c.scale_attn_by_inverse_layer_idx:
        problems.append("scale_attn_by_inverse_layer_idx=true")
    if c.add_cross_attention:
        problems.append("add_cross_attention=true")
    if problems:
        raise ConfigError("cannot convert this GPT2LMHeadModel to IronCore: " + "; ".join(problems))
    hidden_act, gated = FROM_GPT2_ACTIVATIONS[c.activation_function]
    config = IronCoreConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.n_inner or 4 * c.n_embd,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        head_dim=c.n_embd // c.n_head,
        max_position_embeddings=c.n_positions,
        precision=_precision(model),
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


def llama_to_ironcore(model: LlamaForCausalLM) -> IronCoreForCausalLM:
    """A LlamaForCausalLM as an IronCore model (no vocabulary padding); ConfigError for variants it cannot express."""
    c = model.config
    rope = c.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
    problems = []
    if rope.get("rope_type", "default") not in ("default", "linear"):
        problems.append(f"rope_parameters.rope_type={rope['rope_type']} (IronCore has default and linear)")
    if c.hidden_act not in ("silu", "gelu"):
        problems.append(f"hidden_act={c.hidden_act} (IronCore has silu: swiglu, gelu: geglu)")
    if c.attention_bias != c.mlp_bias:
        problems.append(f"attention_bias={c.attention_bias} with mlp_bias={c.mlp_bias} (IronCore has one bias switch)")
    if problems:
        raise ConfigError("cannot convert this LlamaForCausalLM to IronCore: " + "; ".join(problems))
    config = IronCoreConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        precision=_precision(model),
        norm_type="rmsnorm",
        norm_eps=c.rms_norm_eps,
        hidden_act=c.hidden_act,
        gated_mlp=True,
        embedding_dropout=0.0,
        attention_dropout=float(c.attention_dropout or 0.0),
        hidden_dropout=0.0,
        bias=c.attention_bias,
        tie_word_embeddings=c.tie_word_embeddings,
        position_embedding_type="rope",
        rope_theta=float(rope["rope_theta"]),
        rope_scaling_factor=float(rope.get("factor", 1.0)) if rope.get("rope_type") == "linear" else 1.0,
        initializer_range=c.initializer_range,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
    state = {
        k.replace(".input_layernorm.", ".attn_norm.").replace(".post_attention_layernorm.", ".mlp_norm."): v
        for k, v in model.state_dict().items()
    }
    return _build(IronCoreForCausalLM, config, state, like=model)


def _precision(model: PreTrainedModel) -> str:
    return str(model.dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------- loading weights


def load_state(model: PreTrainedModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`; a missing, unexpected or mis-shaped tensor is a one-line CheckpointError.

    Tied parameters (the LM head when `tie_word_embeddings`) follow their source and are skipped.
    """
    tied = set(model.all_tied_weights_keys)
    expected = {k: v for k, v in model.state_dict().items() if k not in tied}
    state = {k: v for k, v in state.items() if k not in tied}
    _check_names_and_shapes({k: tuple(v.shape) for k, v in state.items()}, expected, source)
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
    "llama": (LlamaConfig, LlamaForCausalLM),
}
TO_IRONCORE = {"ironcore": lambda model: model, "gpt2": gpt2_to_ironcore, "llama": llama_to_ironcore}


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
        raise CheckpointError(f"{path}: no config.json (expected an IronCore, GPT-2 or LLaMA model directory)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not one of {', '.join(ARCHITECTURES)}")
    return model_type


def check_model_dir(path: Path) -> str:
    """The model type of a model directory, whose weight files' headers are checked against its config: a broken
    directory is one CheckpointError naming the file before any weight is loaded."""
    model_type = read_model_type(path)
    config_cls, model_cls = ARCHITECTURES[model_type]
    _check_checkpoint(path, model_cls, config_cls.from_pretrained(path))
    return model_type


def load_pretrained(path: str | Path, run_or_config: Any = None) -> IronCoreForCausalLM:
    """An IronCore model from an IronCore, GPT-2 or LLaMA directory (the type is read from its config.json).

    Without `run_or_config` the model keeps the directory's architecture. With a RunConfig or IronCoreConfig
    the architecture must match it (else CheckpointError naming the differing fields) and the model takes that
    config's training settings (dropout, recompute, attention, vocabulary padding).
    """
    path = Path(path)
    model_type = check_model_dir(path)
    model_cls = ARCHITECTURES[model_type][1]
    source = TO_IRONCORE[model_type](model_cls.from_pretrained(path))
    if run_or_config is None:
        return source
    target = (
        run_or_config if isinstance(run_or_config, IronCoreConfig) else IronCoreConfig.from_run_config(run_or_config)
    )
    check_same_architecture(source.config, target, str(path))
    return retarget(source, target)


def _same(a: Any, b: Any) -> bool:
    return math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) or isinstance(b, float) else a == b


def check_same_architecture(found: IronCoreConfig, wanted: IronCoreConfig, source: str) -> None:
    """CheckpointError naming every spec field where a pretrained model's architecture differs from the config's.

    max_seq_len only matters for learned absolute positions (a table of that size); the rope fields only for rope.
    """
    have, want = found.spec_fields(), wanted.spec_fields()
    skip = set()
    if wanted.position_embedding_type != "absolute":
        skip.add("model.max_seq_len")
    if wanted.position_embedding_type != "rope":
        skip |= {f"model.positional_embedding.{k}" for k in ("base", "scaling_factor", "offset")}
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
    for name in VOCAB_TENSORS:
        rows = state[name][:vocab]
        state[name] = torch.cat([rows, rows.new_zeros(config.vocab_size - vocab, rows.shape[1])])
    target = uninitialized(IronCoreForCausalLM, config)
    load_state(target, state, "pretrained IronCore weights")
    return target


def trim_vocab_padding(model: IronCoreForCausalLM) -> IronCoreForCausalLM:
    """A copy without vocabulary padding rows, for exports in IronCore's own format."""
    config = copy.deepcopy(model.config)
    config.vocab_size = config.unpadded_vocab_size
    return retarget(model, config).to(model.dtype).train(model.training)


def build_model(run: Any) -> IronCoreForCausalLM:
    """The model of a run: fresh weights from `init` (seeded), or `init.from_pretrained` checked against `model`.

    With `init.data_parallel_random_init` each rank draws its own weights (seed + rank); otherwise every rank
    draws the same ones. The seed is used in a forked RNG, so building a model leaves the global RNG alone.
    """
    config = IronCoreConfig.from_run_config(run)
    if run.init.from_pretrained:
        return load_pretrained(run.init.from_pretrained, config)
    seed = run.init.seed + (max(run.parallel.rank, 0) if run.init.data_parallel_random_init else 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IronCoreForCausalLM(config)
