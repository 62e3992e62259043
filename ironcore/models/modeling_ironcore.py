"""PyTorch IronCore: one decoder-only transformer that covers GPT-2 and LLaMA shapes and the space between.

Written as a transformers modeling file (class names, attention-function interface, masks, `DynamicCache`,
`GenerationMixin`) and self-contained: it imports only torch, transformers and `.configuration_ironcore`, so
`save_pretrained` can copy it next to the weights and `trust_remote_code=True` loads them without IronCore.

Parameter names follow LLaMA (`model.embed_tokens`, `layers.N.self_attn.q_proj`, `mlp.up_proj`, `model.norm`,
`lm_head`), plus `model.embed_positions` for learned absolute positions and `attn_norm` / `mlp_norm` for the
norm of each sub-block, which sits before it (pre-LN) or after its residual add (post-LN).

Forward conventions are those of transformers' LLaMA: outputs recorded by `capture_outputs` hooks, tuples with
`return_dict=False`, the cache passed as `cache` (`past_key_values` still accepted, with transformers' deprecation
warning; both at once is an error), and a keyword that nothing would read refused rather than dropped. The
capabilities declared, and those not, are listed on `IronCorePreTrainedModel`.
"""

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices, packed_sequence_mask_function
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_ironcore import IronCoreConfig


# RMSNorm computed in float32 exactly as LLaMA does, so converted LLaMA checkpoints give the same numbers.
# Copied from transformers.models.llama.modeling_llama.LlamaRMSNorm with Llama->IronCore
class IronCoreRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps: float = 1e-6) -> None:
        """
        IronCoreRMSNorm is equivalent to T5LayerNorm
        """
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def make_norm(config: IronCoreConfig) -> nn.Module:
    """LayerNorm (with a bias unless `bias=False`) or RMSNorm (never a bias), as the config says."""
    if config.norm_type == "rmsnorm":
        return IronCoreRMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.bias)


class IronCoreRotaryEmbedding(nn.Module):
    """cos/sin of rotary position embeddings (non-interleaved halves, as LLaMA).

    angle(p, i) = (p + rope_offset) * theta^(-2i/head_dim) / rope_scaling_factor with "linear" scaling (as
    transformers' "linear" rope type). "llama3" scaling (transformers' rope type of that name) divides only the
    frequencies whose wavelength exceeds original_max / low_freq_factor, keeps those below original_max /
    high_freq_factor, and blends the band between. The offset shifts every position; since rotary attention
    scores depend only on the distance between query and key, it leaves scores unchanged up to rounding. The
    inverse frequencies are recomputed per call (head_dim/2 numbers) rather than kept in a buffer, so no dtype
    cast, meta-device build or checkpoint load can ever alter them.
    """

    def __init__(self, config: IronCoreConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.scaling_factor = config.rope_scaling_factor
        self.offset = config.rope_offset
        self.scaling_type = config.rope_scaling_type
        self.low_freq_factor = config.rope_low_freq_factor
        self.high_freq_factor = config.rope_high_freq_factor
        self.original_max = config.rope_original_max_position_embeddings

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        if self.scaling_type == "linear":
            return inv_freq / self.scaling_factor
        # llama3, computed as transformers' _compute_llama3_parameters does
        wavelen = 2 * math.pi / inv_freq
        low_freq_wavelen = self.original_max / self.low_freq_factor
        high_freq_wavelen = self.original_max / self.high_freq_factor
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.scaling_factor, inv_freq)
        smooth = (self.original_max / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.scaling_factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=x.device.type, enabled=False):
            positions = position_ids.float() + self.offset
            freqs = positions[..., None] * self.inv_freq(x.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


# Copied from transformers.models.llama.modeling_llama.rotate_half
def rotate_half(x):
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


# Copied from transformers.models.llama.modeling_llama.apply_rotary_pos_emb
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Applies Rotary Position Embedding to the query and key tensors.

    Args:
        q (`torch.Tensor`): The query tensor.
        k (`torch.Tensor`): The key tensor.
        cos (`torch.Tensor`): The cosine part of the rotary embedding.
        sin (`torch.Tensor`): The sine part of the rotary embedding.
        unsqueeze_dim (`int`, *optional*, defaults to 1):
            The 'unsqueeze_dim' argument specifies the dimension along which to unsqueeze cos[position_ids] and
            sin[position_ids] so that they can be properly broadcasted to the dimensions of q and k. For example, note
            that cos[position_ids] and sin[position_ids] have the shape [batch_size, seq_len, head_dim]. Then, if q and
            k have the shape [batch_size, heads, seq_len, head_dim], then setting unsqueeze_dim=1 makes
            cos[position_ids] and sin[position_ids] broadcastable to the shapes of q and k. Similarly, if q and k have
            the shape [batch_size, seq_len, heads, head_dim], then set unsqueeze_dim=2.
    Returns:
        `tuple(torch.Tensor)` comprising of the query and key tensors rotated using the Rotary Position Embedding.
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


# Copied from transformers.models.llama.modeling_llama.repeat_kv
def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """
    This is the equivalent of torch.repeat_interleave(x, dim=1, repeats=n_rep). The hidden states go from (batch,
    num_key_value_heads, seqlen, head_dim) to (batch, num_attention_heads, seqlen, head_dim)
    """
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


# Copied from transformers.models.llama.modeling_llama.eager_attention_forward
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()

    return attn_output, attn_weights


class IronCoreAttention(nn.Module):
    """Multi-head attention with grouped key/value heads (MHA, GQA, MQA) and `head_dim` free of `hidden_size`."""

    def __init__(self, config: IronCoreConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.bias)
        self.o_proj.writes_residual = True
        self.resid_dropout = nn.Dropout(config.hidden_dropout)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # B batch, T new tokens, S cached + new tokens, H query heads, K key/value heads, D head_dim, C hidden_size
        input_shape = hidden_states.shape[:-1]  # (B, T)
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, D)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, K, T, D)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, K, T, D)

        if position_embeddings is not None:  # cos, sin: (B, T, D)
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, *position_embeddings)
        if cache is not None:  # keys and values of every token so far: (B, K, S, D)
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        # attn_output (B, T, H, D); attn_weights (B, H, T, S) from eager, None from fused kernels
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (B, T, H * D)
        return self.resid_dropout(self.o_proj(attn_output)), attn_weights  # (B, T, C)


class IronCoreMLP(nn.Module):
    """Feed-forward block: down(act(up(x))), or down(act(gate(x)) * up(x)) for the gated SwiGLU / GeGLU."""

    def __init__(self, config: IronCoreConfig) -> None:
        super().__init__()
        size, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(size, inner, bias=config.bias) if config.gated_mlp else None
        self.up_proj = nn.Linear(size, inner, bias=config.bias)
        self.down_proj = nn.Linear(inner, size, bias=config.bias)
        self.down_proj.writes_residual = True
        self.act_fn = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            hidden = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        else:
            hidden = self.act_fn(self.up_proj(x))
        return self.dropout(self.down_proj(hidden))


class IronCoreDecoderLayer(GradientCheckpointingLayer):
    """Attention then MLP, each with a residual; the norms go before each block (pre-LN) or after the add (post-LN)."""

    def __init__(self, config: IronCoreConfig, layer_idx: int) -> None:
        super().__init__()
        self.post_norm = config.post_norm
        self.attn_norm = make_norm(config)
        self.self_attn = IronCoreAttention(config, layer_idx)
        self.mlp_norm = make_norm(config)
        self.mlp = IronCoreMLP(config)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_input = hidden_states if self.post_norm else self.attn_norm(hidden_states)
        attn_output, _ = self.self_attn(
            hidden_states=attn_input,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        if self.post_norm:
            hidden_states = self.attn_norm(hidden_states + attn_output)
            return self.mlp_norm(hidden_states + self.mlp(hidden_states))
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


# Ops whose outputs the "optimized" recompute strategy keeps: the GEMMs of the linear layers (nn.Linear lowers to
# aten.mm / aten.addmm). Everything else in a decoder layer is recomputed in backward: norms, rotary embeddings,
# the attention core (sdpa / flash / eager's q k^T, softmax and p v, which run as bmm), activation and dropout.
SAVED_BY_OPTIMIZED_RECOMPUTE = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default})


def keep_matmul_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy: save linear-layer outputs, recompute the cheap or quadratic rest."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_BY_OPTIMIZED_RECOMPUTE else CheckpointPolicy.PREFER_RECOMPUTE


def recompute_kwargs(strategy: str) -> dict:
    """torch.utils.checkpoint arguments for each decoder layer.

    default: the whole layer is recomputed from its input (least memory, one extra layer forward).
    optimized: selective checkpointing with `keep_matmul_outputs`: stores each linear layer's output and
    recomputes only norms, rotary, attention core, activation and dropout, so backward redoes no projection GEMM.
    """
    if strategy == "optimized":
        return {
            "use_reentrant": False,
            "context_fn": partial(create_selective_checkpoint_contexts, keep_matmul_outputs),
        }
    return {"use_reentrant": False}


def flash_varlen_kwargs(segments: torch.Tensor) -> dict:
    """flash-attention varlen arguments that make every packed document of the flattened batch its own sequence."""
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    cu_seq_lens = nn.functional.pad(starts.flatten().nonzero().flatten(), (0, 1), value=segments.numel())
    cu_seq_lens = cu_seq_lens.to(torch.int32)
    max_length = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }


# Keywords besides the named arguments that the model consumes: transformers' model kwargs (output recording, flash
# varlen lengths, `is_causal`, `num_items_in_batch` for the loss, ...) and `merge_with_config_defaults`' debug switches.
MODEL_KWARGS = frozenset(TransformersKwargs.__annotations__) | {"debug_io", "debug_io_dir", "prune_layers"}
# Attention functions transformers ships that read no keyword of their own. A function registered later
# (`AttentionInterface.register`, a Hub kernel) and paged attention (continuous batching: block tables, read and
# write indices) are given every keyword, since they may read theirs.
BUILTIN_ATTENTION = frozenset({"eager", *ALL_ATTENTION_FUNCTIONS._global_mapping}) - {"paged|eager"}
LOSS_ONLY_KWARGS = ("shift_labels", "ignore_index")


def refuse_unused_kwargs(model: PreTrainedModel, kwargs: dict) -> None:
    """TypeError for a keyword nothing would read, instead of letting it vanish into the attention's `**kwargs`."""
    unused = sorted(set(kwargs) - MODEL_KWARGS)
    if unused and model.config._attn_implementation in BUILTIN_ATTENTION:
        names = ", ".join(repr(name) for name in unused)
        raise TypeError(f"{type(model).__name__}.forward() got unexpected keyword argument(s) {names}")


class IronCorePreTrainedModel(PreTrainedModel):
    """Shared transformers plumbing: config class, init, FSDP wrap unit, declared capabilities, output recording.

    Declared, each shown by tests/test_model_hf.py: eager, SDPA, flash-attention 2 (`_supports_flash_attn`) and
    flex attention (`_supports_flex_attn`, it runs on CPU too); any attention registered with transformers'
    `AttentionInterface` and `AttentionMaskInterface` (`_supports_attention_backend`: every keyword reaches the
    attention function, logits slice with a tensor, the tensor-parallel plan is the config's); a static cache
    under `torch.compile(fullgraph=True)` (`_can_compile_fullgraph`); custom 4D attention masks (passed through
    as given); hidden states and attention weights recorded by transformers' hooks (`_can_record_outputs`).
    Fused kernels (SDPA, flash, flex) compute no attention weights: `output_attentions=True` with them warns,
    as transformers does, and returns no weights; eager returns them. flash-attention needs CUDA, so only its
    varlen arguments are tested on CPU (tests/test_model.py).

    Not declared: a pipeline-parallel plan (`_pp_plan`, `base_model_pp_plan`) and an FSDP plan (`_fsdp_plan`),
    which IronCore never uses (it shards with Accelerate's FSDP / DeepSpeed around `_no_split_modules`) and does
    not test.
    """

    config_class = IronCoreConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["IronCoreDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": IronCoreDecoderLayer,
        "attentions": IronCoreAttention,
    }

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """transformers' resize, counting `new_num_tokens` as real tokens, all of which the model can then predict.

        The rows above `unpadded_vocab_size` only round the GEMMs and have never been trained (their logits are
        pinned to the dtype minimum), so they are dropped first: every token the resize adds is then initialised
        the way transformers initialises new tokens, from the real rows. Rows that `pad_to_multiple_of` adds
        are padding again. Conversions and exports read `unpadded_vocab_size`, so they keep the new tokens.
        """
        if new_num_tokens is None and pad_to_multiple_of is None:
            return self.get_input_embeddings()
        real = self.config.unpadded_vocab_size
        if real < self.config.vocab_size:
            super().resize_token_embeddings(real, mean_resizing=False)  # shrinking: nothing is initialised
        wanted = real if new_num_tokens is None else new_num_tokens
        embeddings = super().resize_token_embeddings(wanted, pad_to_multiple_of, mean_resizing)
        self.config.unpadded_vocab_size = wanted
        return embeddings

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """N(0, initializer_range) with GPT-2's depth-scaled residual projections, or Xavier-uniform everywhere.

        The projections that write into the residual stream (o_proj, down_proj: two per layer, marked
        `writes_residual`) get std / sqrt(2 * num_layers), which keeps the stream's variance independent of depth.
        The mark sits on the Linear itself because transformers only calls `_init_weights` on modules that own
        parameters when the model is custom code.
        """
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if self.config.xavier_init:
                init.xavier_uniform_(module.weight)
            elif getattr(module, "writes_residual", False):
                init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))
            else:
                init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, IronCoreRMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)


class IronCoreModel(IronCorePreTrainedModel):
    """Embeddings, decoder layers and the final norm (none after post-LN layers, whose output is normalised)."""

    def __init__(self, config: IronCoreConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        absolute = config.position_embedding_type == "absolute"
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size) if absolute else None
        self.rotary_emb = IronCoreRotaryEmbedding(config) if config.position_embedding_type == "rope" else None
        self.dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList([IronCoreDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.Identity() if config.post_norm else make_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        refuse_unused_kwargs(self, kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        hidden_states = inputs_embeds
        if self.embed_positions is not None:
            hidden_states = hidden_states + self.embed_positions(position_ids)
        hidden_states = self.dropout(hidden_states)
        # tokens a dynamic cache holds; a static cache's length is a tensor, which compiled decoding must not read
        past_seen = cache.get_seq_length() if cache is not None and not cache.is_compileable else 0
        attention_mask, kwargs = self._attention_inputs(
            hidden_states, attention_mask, position_ids, cache, past_seen, kwargs
        )
        position_embeddings = self.rotary_emb(hidden_states, position_ids) if self.rotary_emb is not None else None

        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)

    def _attention_inputs(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Cache | None,
        past_seen: int,
        kwargs: dict,
    ) -> tuple[torch.Tensor | None, dict]:
        """The mask (or flash varlen lengths) that enforces causality, padding and packed-document boundaries.

        A row is packed when its position_ids do not simply count up by one: every other step (a restart at 0,
        say) begins a new document (transformers' `find_packed_sequence_indices`). This is looked for only on a
        forward with nothing in the cache (`past_seen`, the tokens a dynamic cache holds, is 0) and never with a
        static cache, which only serves generation and is sized beyond the input. transformers finds packed
        documents itself when there is neither a padding mask nor a cache (padding-free batches in training, as
        `DataCollatorWithFlattening` sends them); in every other case the packed-sequence mask is passed here and
        AND-ed with the causal and padding masks. Passing it in the first case too would apply it to positions
        instead of indices, and cut documents into blocks. flash-attention gets cumulative document lengths for
        its varlen kernel instead, and the padding mask is dropped: packed rows are right-padded, and causality
        already keeps real tokens from seeing the padding after them.
        """
        batch_size, seq_len = inputs_embeds.shape[:2]
        segments = None
        if past_seen == 0 and seq_len > 1 and not getattr(cache, "is_compileable", False):
            segments = find_packed_sequence_indices(position_ids.expand(batch_size, -1))
        if segments is not None and "flash" in self.config._attn_implementation:
            return None, {**kwargs, **flash_varlen_kwargs(segments)}
        transformers_finds_packing = attention_mask is None and cache is None
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            and_mask_function=(
                packed_sequence_mask_function(segments)
                if segments is not None and not transformers_finds_packing
                else None
            ),
        )
        return mask, kwargs


class IronCoreForCausalLM(IronCorePreTrainedModel, GenerationMixin):
    """IronCoreModel with a language-modelling head; logits of vocabulary padding rows are pinned to dtype min."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: IronCoreConfig) -> None:
        super().__init__(config)
        self.model = IronCoreModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if config.activation_recompute:
            self.activation_checkpointing_enable(recompute_kwargs(config.recompute_strategy))

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """labels are the unshifted input ids (shifted inside, -100 ignored), as everywhere in transformers.

        `shift_labels` and `ignore_index` go to the loss only (transformers' `ForCausalLMLoss` reads them).
        """
        loss_kwargs = {name: kwargs.pop(name) for name in LOSS_ONLY_KWARGS if name in kwargs}
        refuse_unused_kwargs(self, kwargs)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,  # even where config.return_dict is False: this forward makes the tuple
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        if self.config.unpadded_vocab_size < self.config.vocab_size:
            # padding rows exist only for GEMM shapes: they must never be predicted, sampled or given probability
            logits[..., self.config.unpadded_vocab_size :] = torch.finfo(logits.dtype).min
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["IronCoreForCausalLM", "IronCoreModel", "IronCorePreTrainedModel"]
