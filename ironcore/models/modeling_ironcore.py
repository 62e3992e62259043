"""PyTorch IronCore: one decoder-only transformer that covers GPT-2 and LLaMA shapes and the space between.

Written as a transformers modeling file (class names, attention-function interface, masks, `DynamicCache`,
`GenerationMixin`) and self-contained: it imports only torch, transformers and `.configuration_ironcore`, so
`save_pretrained` can copy it next to the weights and `trust_remote_code=True` loads them without IronCore.

Parameter names follow LLaMA (`model.embed_tokens`, `layers.N.self_attn.q_proj`, `mlp.up_proj`, `model.norm`,
`lm_head`), plus `model.embed_positions` for learned absolute positions and `attn_norm` / `mlp_norm` for the
norm of each sub-block, which sits before it (pre-LN) or after its residual add (post-LN).
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

from .configuration_ironcore import IronCoreConfig


class IronCoreRMSNorm(nn.Module):
    """RMSNorm computed in float32 exactly as LLaMA does, so converted LLaMA checkpoints give the same numbers."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def make_norm(config: IronCoreConfig) -> nn.Module:
    """LayerNorm (with a bias unless `bias=False`) or RMSNorm (never a bias), as the config says."""
    if config.norm_type == "rmsnorm":
        return IronCoreRMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.bias)


class IronCoreRotaryEmbedding(nn.Module):
    """cos/sin of rotary position embeddings (non-interleaved halves, as LLaMA).

    angle(p, i) = (p + rope_offset) * theta^(-2i/head_dim) / rope_scaling_factor. Dividing by the factor is
    transformers' "linear" rope scaling. The offset shifts every position; since rotary attention scores depend
    only on the distance between query and key, it leaves scores unchanged up to rounding. The inverse
    frequencies are recomputed per call (head_dim/2 numbers) rather than kept in a buffer, so no dtype cast,
    meta-device build or checkpoint load can ever alter them.
    """

    def __init__(self, config: IronCoreConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.scaling_factor = config.rope_scaling_factor
        self.offset = config.rope_offset

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
        return 1.0 / (self.theta**exponents) / self.scaling_factor

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=x.device.type, enabled=False):
            positions = position_ids.float() + self.offset
            freqs = positions[..., None] * self.inv_freq(x.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys [batch, heads, seq, head_dim] by the per-position angles [batch, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim): share each KV head across its group."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: softmax(q k^T * scaling + mask) v with the softmax in float32."""
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
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
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.bias)
        self.o_proj.writes_residual = True
        self.resid_dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        if position_embeddings is not None:
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, *position_embeddings)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
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
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.resid_dropout(self.o_proj(attn_output)), attn_weights


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

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self.post_norm:
            attn_output, _ = self.self_attn(
                hidden_states, position_embeddings, attention_mask, cache, **kwargs
            )
            hidden_states = self.attn_norm(hidden_states + attn_output)
            return self.mlp_norm(hidden_states + self.mlp(hidden_states))
        attn_output, _ = self.self_attn(
            self.attn_norm(hidden_states), position_embeddings, attention_mask, cache, **kwargs
        )
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


class IronCorePreTrainedModel(PreTrainedModel):
    """Shared transformers plumbing: config class, init, FSDP wrap unit, supported attention implementations."""

    config_class = IronCoreConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["IronCoreDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True

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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        # A cache only serves generation; in training it would just hold every layer's keys and values.
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_seen = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past_seen

        hidden_states = inputs_embeds
        if self.embed_positions is not None:
            hidden_states = hidden_states + self.embed_positions(position_ids)
        hidden_states = self.dropout(hidden_states)
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
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), cache=cache if use_cache else None
        )

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
        say) begins a new document (transformers' `find_packed_sequence_indices`). This is only looked for on a
        forward without cached keys. transformers detects packing itself only when
        there is neither a padding mask nor a cache, so the packed-sequence mask is passed explicitly and AND-ed
        with the causal and padding masks. flash-attention gets cumulative document lengths for its varlen
        kernel instead, and the padding mask is dropped: packed rows are right-padded, and causality already
        keeps real tokens from seeing the padding after them.
        """
        batch_size, seq_len = inputs_embeds.shape[:2]
        segments = None
        if past_seen == 0 and seq_len > 1:
            segments = find_packed_sequence_indices(position_ids.expand(batch_size, -1))
        if segments is not None and "flash" in self.config._attn_implementation:
            return None, {**kwargs, **flash_varlen_kwargs(segments)}
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            and_mask_function=packed_sequence_mask_function(segments) if segments is not None else None,
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
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """labels are the unshifted input ids (shifted inside, -100 ignored), as everywhere in transformers."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        if self.config.unpadded_vocab_size < self.config.vocab_size:
            # padding rows exist only for GEMM shapes: they must never be predicted, sampled or given probability
            logits[..., self.config.unpadded_vocab_size :] = torch.finfo(logits.dtype).min
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


__all__ = ["IronCoreForCausalLM", "IronCoreModel", "IronCorePreTrainedModel"]
