"""IronCoreForCausalLM: config mapping, every architecture switch, RoPE, packing, recompute, generation."""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import replace

import pytest
import torch
from helpers_model import GPT2_LIKE, LLAMA_LIKE, activation_bytes, one_thread, tiny_config, tiny_run  # noqa: F401

from ironcore.errors import ConfigError
from ironcore.models import IronCoreConfig, IronCoreForCausalLM, build_model, resolve_attn_implementation
from ironcore.models.modeling_ironcore import IronCoreRotaryEmbedding, apply_rotary_pos_emb, flash_varlen_kwargs


def model_of(config: IronCoreConfig, seed: int = 0) -> IronCoreForCausalLM:
    torch.manual_seed(seed)
    return IronCoreForCausalLM(config).eval()


def tokens(*shape: int, vocab: int = 60, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ config


def test_from_run_config_maps_every_field():
    run = tiny_run(
        pe="rope",
        rope=dict(base=500.0, scaling_factor=2.0, offset=3),
        num_attention_groups=2,
        d_model=48,
        head_dim=16,
        ln_eps=1e-6,
        post_ln=True,
        untie_embed=True,
        dropout_embd=0.1,
        dropout_attn=0.2,
        dropout_mlp=0.3,
        recompute="optimized",
        **LLAMA_LIKE,
    )
    config = IronCoreConfig.from_run_config(run)
    assert (config.vocab_size, config.unpadded_vocab_size) == (64, 60)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (48, 64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert (config.norm_type, config.norm_eps, config.post_norm, config.bias) == ("rmsnorm", 1e-6, True, False)
    assert (config.hidden_act, config.gated_mlp, config.tie_word_embeddings) == ("silu", True, False)
    assert (config.embedding_dropout, config.attention_dropout, config.hidden_dropout) == (0.1, 0.2, 0.3)
    assert (config.rope_theta, config.rope_scaling_factor, config.rope_offset) == (500.0, 2.0, 3)
    assert (config.max_position_embeddings, config.precision, config.initializer_range) == (64, "float32", 0.2)
    assert (config.activation_recompute, config.recompute_strategy) == (True, "optimized")
    fields = config.spec_fields()
    assert fields["model.activation_type"] == "swiglu" and fields["model.num_attention_groups"] == 2
    assert tiny_run(num_attention_groups=None).model.num_attention_groups is None
    assert IronCoreConfig.from_run_config(tiny_run()).num_key_value_heads == 4  # None = MHA


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (dict(num_attention_groups=3), "model.num_attention_groups"),
        (dict(pe="rope", head_dim=7), "model.head_dim"),
    ],
)
def test_bad_model_configs_fail_before_any_tensor(fields, named):
    """Config resolution refuses them (tiny_run resolves), and so does the HF config built without a run."""
    with pytest.raises(ConfigError, match=named) as caught:
        tiny_run(**fields)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="model.num_attention_groups"):
        IronCoreConfig(num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="model.head_dim"):
        IronCoreConfig(position_embedding_type="rope", head_dim=7)


@pytest.fixture
def fresh_attn_choice():
    """resolve_attn_implementation is cached per process: start empty, and leave no patched answer behind."""
    resolve_attn_implementation.cache_clear()
    yield
    resolve_attn_implementation.cache_clear()


@pytest.mark.parametrize(
    ("cuda", "flash_attn", "expected", "missing"),
    [
        (False, False, "sdpa", "a CUDA device and a usable flash-attn 2 package is missing"),
        (True, False, "sdpa", "a usable flash-attn 2 package is missing"),
        (False, True, "sdpa", "a CUDA device is missing"),
        (True, True, "flash_attention_2", None),
    ],
)
def test_attention_choice_on_every_machine_and_logs_once(
    monkeypatch, caplog, fresh_attn_choice, cuda, flash_attn, expected, missing
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr("ironcore.models.configuration_ironcore.is_flash_attn_2_available", lambda: flash_attn)
    with caplog.at_level(logging.INFO, logger="ironcore.models.configuration_ironcore"):
        assert resolve_attn_implementation(True) == expected
        assert resolve_attn_implementation(True) == expected
        assert resolve_attn_implementation(False) == "sdpa"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "use_flash_attn is false" in lines[1], lines
    if missing:
        assert f"use_flash_attn is true but {missing}" in lines[0], lines
    else:
        assert lines[0] == "Attention: flash_attention_2 (flash-attn on CUDA)"
    assert IronCoreConfig.from_run_config(tiny_run())._attn_implementation == expected  # use_flash_attn: true


# ------------------------------------------------------------------------------------------------ architecture

COMBINATIONS = list(
    itertools.product(
        ("layernorm", "rmsnorm"),
        (False, True),
        ("gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"),
        ("absolute", "rope", "none"),
        (False, True),
        (False, True),
    )
)


@pytest.mark.parametrize(("ln_type", "post_ln", "activation", "pe", "no_bias", "untie"), COMBINATIONS)
def test_every_combination_trains(ln_type, post_ln, activation, pe, no_bias, untie):
    config = tiny_config(
        pe=pe,
        ln_type=ln_type,
        post_ln=post_ln,
        activation_type=activation,
        no_bias=no_bias,
        untie_embed=untie,
        d_model=16,
        d_ffn=32,
        num_layers=1,
        num_attention_heads=2,
        dropout_embd=0.1,
        dropout_attn=0.1,
        dropout_mlp=0.1,
    )
    model = IronCoreForCausalLM(config).train()
    x = tokens(2, 8)
    out = model(x, labels=x)
    out.loss.backward()
    assert out.logits.shape == (2, 8, 64) and torch.isfinite(out.loss)
    assert model.lm_head.weight.grad is not None and torch.isfinite(model.lm_head.weight.grad).all()
    assert all(p.grad is not None for p in model.parameters())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (not untie)
    assert any(name.endswith("bias") for name, _ in model.named_parameters()) == (not no_bias)


def test_gqa_mqa_and_head_dim_shapes():
    for groups, kv in ((None, 4), (2, 2), (1, 1)):
        model = IronCoreForCausalLM(tiny_config(num_attention_groups=groups, d_model=24, head_dim=10))
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.weight.shape == (40, 24) and attn.k_proj.weight.shape == (kv * 10, 24)
        assert attn.o_proj.weight.shape == (24, 40)


def test_padded_vocab_rows_never_win():
    model = model_of(tiny_config(untie_embed=True))
    x = tokens(2, 10)
    logits = model(x).logits
    assert (logits[..., 60:] == torch.finfo(logits.dtype).min).all()
    assert logits.argmax(-1).max() < 60
    model.train()
    model(x, labels=x).loss.backward()
    assert model.lm_head.weight.grad[60:].abs().sum() == 0  # never pushed up or down
    generated = model.eval().generate(x[:, :3], max_new_tokens=20, do_sample=True, top_k=0)
    assert generated.max() < 60


def test_init_std_scaled_residual_and_xavier():
    run = tiny_run(d_model=128, d_ffn=512, num_layers=8, num_attention_heads=8, head_dim=16, init_std=0.02)
    model = build_model(run)
    layer = model.model.layers[3]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert layer.mlp.up_proj.bias.abs().max() == 0 and (layer.attn_norm.weight == 1).all()
    assert torch.equal(build_model(run).lm_head.weight, model.lm_head.weight)  # seeded
    ranked = replace(
        run, init=replace(run.init, data_parallel_random_init=True), parallel=replace(run.parallel, rank=1)
    )
    assert not torch.equal(build_model(ranked).lm_head.weight, model.lm_head.weight)
    xavier = build_model(replace(run, init=replace(run.init, xavier_init=True)))
    bound = math.sqrt(6 / (128 + 512))
    up = xavier.model.layers[0].mlp.up_proj.weight
    assert up.abs().max() <= bound and up.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


# ------------------------------------------------------------------------------------------------ dropout

DROPOUT_FIELDS = ("dropout_embd", "dropout_attn", "dropout_mlp")


def dropped_fractions(model: IronCoreForCausalLM, x: torch.Tensor) -> dict[str, float]:
    """Share of exact zeros at each place a dropout acts, in layer 0 (eager attention, to see the probabilities).

    embd: the layer's input (token + position embeddings); attn_probs: the causal (non-masked) attention
    probabilities; attn_out / mlp_out: what the attention and MLP blocks add to the residual stream.
    """
    layer, seen = model.model.layers[0], {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: seen.update(embd=args[0])),
        layer.self_attn.register_forward_hook(lambda m, a, out: seen.update(attn_out=out[0], attn_probs=out[1])),
        layer.mlp.register_forward_hook(lambda m, a, out: seen.update(mlp_out=out)),
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    seen["attn_probs"] = seen["attn_probs"][..., causal]
    return {name: (value == 0).float().mean().item() for name, value in seen.items()}


@pytest.mark.parametrize("field", DROPOUT_FIELDS)
def test_each_dropout_acts_in_training_only_and_only_where_it_belongs(field):
    x = tokens(2, 16)
    model = model_of(tiny_config("eager", **{field: 0.5}))
    without = model_of(tiny_config("eager"))  # same seed: the same weights
    evaluated = model(x).logits
    assert torch.equal(model(x).logits, evaluated) and torch.equal(without(x).logits, evaluated)
    model.train()
    first, second = model(x).logits, model(x).logits
    assert not torch.allclose(first, second) and not torch.allclose(first, evaluated)
    without.train()
    torch.testing.assert_close(without(x).logits, evaluated, atol=1e-6, rtol=0)  # rate 0: training changes nothing

    dropped = dropped_fractions(model, x)
    where = {"dropout_embd": {"embd"}, "dropout_attn": {"attn_probs"}, "dropout_mlp": {"attn_out", "mlp_out"}}[field]
    for place, fraction in dropped.items():
        if place in where:
            assert fraction == pytest.approx(0.5, abs=0.1), dropped
        else:
            assert fraction == 0, dropped
    assert set(dropped_fractions(model.eval(), x).values()) == {0}


def test_attention_dropout_rescales_the_kept_probabilities():
    x = tokens(2, 16)
    model = model_of(tiny_config("eager", dropout_attn=0.25))
    probs = {}
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda m, a, out: probs.update({m.training: out[1]}))
    model(x)
    model.train()(x)
    hook.remove()
    kept = probs[True] != 0
    torch.testing.assert_close(probs[True][kept], probs[False][kept] / 0.75, atol=1e-6, rtol=1e-6)


def test_sdpa_applies_attention_dropout():
    x = tokens(2, 16)
    model = model_of(tiny_config("sdpa", dropout_attn=0.5))
    evaluated = model(x).logits
    model.train()
    assert not torch.allclose(model(x).logits, model(x).logits)
    assert not torch.allclose(model(x).logits, evaluated)


# ------------------------------------------------------------------------------------------------ post-LN


def norm_by_hand(x: torch.Tensor, norm: torch.nn.Module, ln_type: str, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm / RMSNorm from their formulas, with `norm`'s affine parameters (independent of the model's code)."""
    if ln_type == "layernorm":
        centred = x - x.mean(-1, keepdim=True)
        return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * norm.weight + norm.bias
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight


def randomise_norms(model: IronCoreForCausalLM) -> None:
    """Norm weights (and biases) away from 1 (and 0), so it matters which norm is applied to what."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            elif "norm" in name:
                param.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("ln_type", ["layernorm", "rmsnorm"])
def test_post_ln_layer_normalises_after_each_residual_add(ln_type):
    post = model_of(tiny_config(ln_type=ln_type, post_ln=True))
    pre = model_of(tiny_config(ln_type=ln_type))
    randomise_norms(post)
    loaded = pre.load_state_dict(post.state_dict(), strict=False)  # the same layers; only pre-LN has a final norm
    assert not loaded.unexpected_keys and all(key.startswith("model.norm.") for key in loaded.missing_keys)
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        layer = post.model.layers[0]
        h = norm_by_hand(x + layer.self_attn(x)[0], layer.attn_norm, ln_type)
        expected_post = norm_by_hand(h + layer.mlp(h), layer.mlp_norm, ln_type)
        torch.testing.assert_close(layer(x), expected_post, atol=1e-5, rtol=1e-5)

        layer = pre.model.layers[0]
        h = x + layer.self_attn(norm_by_hand(x, layer.attn_norm, ln_type))[0]
        expected_pre = h + layer.mlp(norm_by_hand(h, layer.mlp_norm, ln_type))
        torch.testing.assert_close(layer(x), expected_pre, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected_post, expected_pre, atol=1e-2)
        assert not torch.allclose(post(tokens(2, 12)).logits, pre(tokens(2, 12)).logits, atol=1e-2)


@pytest.mark.parametrize("ln_type", ["layernorm", "rmsnorm"])
def test_post_ln_hidden_states_are_normalised_after_every_layer(ln_type):
    model = model_of(tiny_config(ln_type=ln_type, post_ln=True, num_layers=3))  # norm weights 1, biases 0
    assert isinstance(model.model.norm, torch.nn.Identity)  # the last layer's output is already normalised
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, out: outputs.append(out)) for layer in model.model.layers]
    model(tokens(2, 12))
    for hook in hooks:
        hook.remove()
    assert len(outputs) == 3
    for hidden in outputs:
        if ln_type == "layernorm":
            torch.testing.assert_close(hidden.mean(-1), torch.zeros(2, 12), atol=1e-5, rtol=0)
            torch.testing.assert_close(hidden.var(-1, unbiased=False), torch.ones(2, 12), atol=1e-3, rtol=0)
        else:
            torch.testing.assert_close(hidden.pow(2).mean(-1), torch.ones(2, 12), atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------------------ RoPE


def rope_scores(config: IronCoreConfig, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    cos, sin = IronCoreRotaryEmbedding(config)(q, positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q @ k.transpose(-1, -2)


def test_rope_scores_depend_only_on_relative_position():
    config = tiny_config(pe="rope", head_dim=16)
    q, k = torch.randn(2, 3, 12, 16), torch.randn(2, 3, 12, 16)
    positions = torch.arange(12).unsqueeze(0)
    base = rope_scores(config, positions, q, k)
    torch.testing.assert_close(rope_scores(config, positions + 37, q, k), base, atol=1e-4, rtol=1e-5)
    shuffled = torch.tensor([[0, 5, 6, 9, 20, 21, 22, 23, 30, 31, 40, 41]])  # not a shift: scores change
    assert not torch.allclose(rope_scores(config, shuffled, q, k), base, atol=1e-3)


def test_rope_offset_and_scaling_factor_act_as_documented():
    x = tokens(1, 16)
    positions = torch.arange(16).unsqueeze(0)
    plain = model_of(tiny_config(pe="rope"))

    def with_rope(**rope) -> IronCoreForCausalLM:
        model = model_of(tiny_config(pe="rope", rope=rope))
        model.load_state_dict(plain.state_dict())
        return model

    # offset: every position shifted by it (p + offset); relative scores, so the logits barely move
    offset = with_rope(offset=5)
    torch.testing.assert_close(
        offset(x, position_ids=positions).logits, plain(x, position_ids=positions + 5).logits, atol=0, rtol=0
    )
    torch.testing.assert_close(offset(x).logits, plain(x).logits, atol=1e-5, rtol=1e-5)
    # scaling_factor: positions divided by it (HF linear scaling): angles at 2p with factor 2 are those at p
    # (checked on the rotary tables: a model reads position_ids that step by 2 as packed one-token documents)
    rotary, rotary_scaled = (
        IronCoreRotaryEmbedding(tiny_config(pe="rope", rope=dict(scaling_factor=f))) for f in (1.0, 2.0)
    )
    for table, table_scaled in zip(rotary(x.float(), positions), rotary_scaled(x.float(), 2 * positions), strict=True):
        torch.testing.assert_close(table_scaled, table, atol=0, rtol=0)
    scaled = with_rope(scaling_factor=2.0)
    assert not torch.allclose(scaled(x).logits, plain(x).logits, atol=1e-3)


# ------------------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("pe", ["absolute", "rope"])
def test_eager_and_sdpa_agree(pe):
    x = tokens(2, 16)
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding
    sdpa = model_of(tiny_config("sdpa", pe=pe, num_attention_groups=2))
    eager = model_of(tiny_config("eager", pe=pe, num_attention_groups=2))
    torch.testing.assert_close(
        eager(x, attention_mask=mask).logits[:, 5:], sdpa(x, attention_mask=mask).logits[:, 5:], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pe", ["absolute", "rope", "none"])
def test_packed_row_matches_documents_alone(attn, pe):
    model = model_of(tiny_config(attn, pe=pe, num_attention_groups=2))
    doc_a, doc_b = tokens(1, 5, seed=2), tokens(1, 9, seed=3)
    alone_a, alone_b = model(doc_a).logits, model(doc_b).logits
    row = torch.cat([doc_a, doc_b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(9)]).unsqueeze(0)
    for mask in (None, torch.ones_like(row)):
        packed = model(row, position_ids=positions, attention_mask=mask).logits
        torch.testing.assert_close(packed[:, :5], alone_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 5:], alone_b, atol=1e-5, rtol=1e-5)
    # a batch whose second row is right-padded: padding is masked and the documents stay apart
    rows = torch.cat([row, torch.cat([doc_b, doc_a[:, :3], torch.zeros(1, 2, dtype=torch.long)], dim=1)])
    positions2 = torch.cat(
        [positions, torch.cat([torch.arange(9), torch.arange(3), torch.zeros(2, dtype=torch.long)]).unsqueeze(0)]
    )
    mask2 = torch.ones_like(rows)
    mask2[1, 12:] = 0
    out = model(rows, position_ids=positions2, attention_mask=mask2).logits
    torch.testing.assert_close(out[0, :5], alone_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :9], alone_b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 9:12], alone_a[0, :3], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def varlen_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """flash_attn_varlen_func's contract, in SDPA: causal attention within each [cu[i], cu[i+1]) token range."""
    assert attention_mask is None
    batch, heads, length, dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(batch * length, -1, dim).transpose(0, 1) for t in (query, key, value))
    k, v = (t.repeat_interleave(module.num_key_value_groups, dim=0) for t in (k, v))
    cu = kwargs["cu_seq_lens_q"].tolist()
    out = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                q[:, s:e], k[:, s:e], v[:, s:e], is_causal=True, scale=scaling
            )
            for s, e in itertools.pairwise(cu)
        ],
        dim=1,
    )
    return out.transpose(0, 1).reshape(batch, length, heads, dim), None


def test_flash_route_gives_each_packed_document_its_own_sequence(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_varlen_stand_in", varlen_attention)
    model = model_of(tiny_config(pe="rope", num_attention_groups=2))
    doc_a, doc_b = tokens(1, 5, seed=2), tokens(1, 9, seed=3)
    alone_a, alone_b = model(doc_a).logits, model(doc_b).logits
    model.config._attn_implementation = "flash_varlen_stand_in"
    rows = torch.cat([torch.cat([doc_a, doc_b], 1), torch.cat([doc_b, doc_a], 1)])
    positions = torch.cat([torch.arange(5), torch.arange(9)])
    positions = torch.stack([positions, torch.cat([torch.arange(9), torch.arange(5)])])
    out = model(rows, position_ids=positions, attention_mask=torch.ones_like(rows)).logits
    torch.testing.assert_close(out[0, :5], alone_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, 5:], alone_b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :9], alone_b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 9:], alone_a[0], atol=1e-5, rtol=1e-5)


def test_flash_varlen_lengths_cover_each_packed_document():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    from transformers.masking_utils import find_packed_sequence_indices

    kwargs = flash_varlen_kwargs(find_packed_sequence_indices(positions))
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 12] and kwargs["max_length_q"] == 6
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32 and kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]


# ------------------------------------------------------------------------------------------------ recompute


def loss_and_grads(model: IronCoreForCausalLM, x: torch.Tensor, seed: int = 7) -> tuple[torch.Tensor, dict]:
    model.train().zero_grad()
    torch.manual_seed(seed)
    loss = model(x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("strategy", ["default", "optimized"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_recompute_gives_same_loss_and_gradients(strategy, dropout):
    drop = dict(dropout_embd=dropout, dropout_attn=dropout, dropout_mlp=dropout)
    plain = model_of(tiny_config(pe="rope", **drop, **LLAMA_LIKE))
    recomputed = model_of(tiny_config(pe="rope", recompute=strategy, **drop, **LLAMA_LIKE))
    recomputed.load_state_dict(plain.state_dict())
    assert all(layer.gradient_checkpointing for layer in recomputed.model.layers)
    x = tokens(2, 16)
    loss, grads = loss_and_grads(plain, x)
    loss_r, grads_r = loss_and_grads(recomputed, x)
    torch.testing.assert_close(loss_r, loss, atol=1e-6, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_optimized_recompute_stores_fewer_activations(attn):
    sizes = dict(d_model=64, d_ffn=256, head_dim=16, max_seq_len=64, **GPT2_LIKE)
    x = tokens(2, 64)
    stored = {
        strategy: activation_bytes(model_of(tiny_config(attn, recompute=strategy, **sizes)).train(), x)
        for strategy in (None, "optimized", "default")
    }
    assert stored["default"] < stored["optimized"] < 0.75 * stored[None], stored


# ------------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize(
    "arch", [dict(pe="absolute", **GPT2_LIKE), dict(pe="rope", num_attention_groups=2, **LLAMA_LIKE)]
)
def test_generate_with_and_without_cache(arch):
    model = model_of(tiny_config(**arch))
    prompt = tokens(2, 5)
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape == (2, 17) and torch.equal(cached, uncached)
    # left-padded batch: the padded prompt continues exactly like the same prompt alone
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt[:1, 2:]], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    batch = model.generate(
        torch.cat([padded, prompt[1:]]),
        attention_mask=torch.cat([mask, torch.ones_like(mask)]),
        max_new_tokens=6,
        do_sample=False,
    )
    alone = model.generate(prompt[:1, 2:], max_new_tokens=6, do_sample=False)
    assert torch.equal(batch[0, 5:], alone[0, 3:]) and torch.equal(batch[1], cached[1, :11])
