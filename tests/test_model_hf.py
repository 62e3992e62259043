"""IronCoreForCausalLM / IronCoreModel as transformers drives them: recorded outputs, tuples, the cache's names,
refused keywords, resizing, padding-free packing, the tensor-parallel plan, each declared capability, and eager /
SDPA / flex equivalence. Both a LLaMA shape (rope, RMSNorm, SwiGLU, GQA) and a GPT-2 shape (learned positions,
LayerNorm, GELU, biases) run through every behaviour that depends on the architecture.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager

import pytest
import torch
from helpers_model import GPT2_LIKE, LLAMA_LIKE, one_thread, tiny_config  # noqa: F401
from transformers import AttentionInterface, CompileConfig, DataCollatorWithFlattening, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging as hf_logging

from ironcore.models import IronCoreForCausalLM, IronCoreModel, ironcore_to_gpt2, ironcore_to_llama, trim_vocab_padding

ARCHS = {
    "llama": dict(pe="rope", num_attention_groups=2, **LLAMA_LIKE),
    "gpt2": dict(pe="absolute", **GPT2_LIKE),
}
VOCAB = 60  # tiny_run's real vocabulary, padded to 64


def assert_close_at_transformers_tolerance(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32: 1e-5. bf16: transformers' eager <> SDPA tolerance (tests/test_modeling_common.py), rtol 1e-2 and
    atol max(1e-2, 3e-2 * the outputs' magnitude), as bf16 rounds large values coarsely; here for every element."""
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        return
    magnitude = float(torch.maximum(actual.abs().amax(), expected.abs().amax()))
    torch.testing.assert_close(actual, expected, atol=max(1e-2, 3e-2 * magnitude), rtol=1e-2)


def model_of(arch: str, attn: str = "sdpa", seed: int = 0, cls: type = IronCoreForCausalLM, **fields):
    torch.manual_seed(seed)
    return cls(tiny_config(attn, **{**ARCHS[arch], **fields})).eval()


def same_weights(model, attn: str):
    """A copy of `model` running another attention implementation."""
    other = type(model)(model.config.__class__.from_dict(model.config.to_dict())).eval()
    other.load_state_dict(model.state_dict())
    other.config._attn_implementation = attn
    return other.to(model.dtype)


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def left_padded(batch: int = 3, length: int = 9, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask of a batch whose last row has `pad` padding tokens on the left."""
    ids, mask = tokens(batch, length), torch.ones(batch, length, dtype=torch.long)
    ids[-1, :pad], mask[-1, :pad] = 0, 0
    return ids, mask


@contextmanager
def transformers_warnings(caplog):
    """Capture transformers' own log records (its loggers do not propagate), every `warning_once` included."""
    hf_logging.warning_once.cache_clear()
    root = logging.getLogger("transformers")
    root.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            yield caplog
    finally:
        root.removeHandler(caplog.handler)


# ------------------------------------------------------------------------------------ hidden states, attentions


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cls", [IronCoreForCausalLM, IronCoreModel])
def test_forward_records_every_layers_hidden_states_and_eager_attentions(arch, cls):
    model = model_of(arch, "eager", cls=cls, num_layers=3)
    base = model.model if cls is IronCoreForCausalLM else model
    ids, mask = left_padded()
    layer_outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, out: layer_outputs.append(out)) for layer in base.layers]
    out = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    for hook in hooks:
        hook.remove()

    assert len(out.hidden_states) == 4 and len(out.attentions) == 3
    embeddings = base.embed_tokens(ids)
    if base.embed_positions is not None:
        embeddings = embeddings + base.embed_positions(torch.arange(9))
    torch.testing.assert_close(out.hidden_states[0], embeddings, atol=0, rtol=0)
    for recorded, produced in zip(out.hidden_states[1:-1], layer_outputs[:-1], strict=True):
        torch.testing.assert_close(recorded, produced, atol=0, rtol=0)
    last = out.last_hidden_state if cls is IronCoreModel else base.norm(layer_outputs[-1])
    torch.testing.assert_close(out.hidden_states[-1], last, atol=0, rtol=0)  # after the final norm, as in LLaMA

    causal = torch.ones(9, 9).tril().bool()
    for weights in out.attentions:
        assert weights.shape == (3, 4, 9, 9)
        torch.testing.assert_close(weights.sum(-1)[:, :, 3:], torch.ones(3, 4, 6), atol=1e-6, rtol=0)
        real = weights[:, :, 3:]  # the padded queries of the last row attend to nothing real
        assert (real[..., ~causal[3:]] == 0).all()  # no key after its query
        assert (real[-1, ..., :3] == 0).all()  # no padded key
    assert not torch.allclose(out.attentions[0], out.attentions[1])


GENERATION_MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=0),
    "beam": dict(num_beams=2, do_sample=False),
    "assisted": dict(do_sample=False),  # the assistant is added in the test
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", GENERATION_MODES)
def test_generate_returns_hidden_states_and_attentions(arch, mode):
    model = model_of(arch, "eager")
    ids, mask = left_padded(batch=2, length=5, pad=2)
    kwargs = dict(GENERATION_MODES[mode])
    if mode == "assisted":  # transformers assists one row at a time
        ids, mask = ids[:1], mask[:1]
        kwargs["assistant_model"] = model_of(arch, "eager", seed=1)
    rows = len(ids) * kwargs.get("num_beams", 1)
    torch.manual_seed(0)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, return_dict_in_generate=True,
        output_hidden_states=True, output_attentions=True, **kwargs,
    )
    assert len(out.hidden_states) == len(out.attentions) == 4
    assert all(len(step) == 3 for step in out.hidden_states) and all(len(step) == 2 for step in out.attentions)
    assert out.hidden_states[0][0].shape == (rows, 5, 32) and out.attentions[0][0].shape == (rows, 4, 5, 5)
    new, seen = out.attentions[-1][0].shape[2:]  # assisted decoding verifies several candidates per step
    assert seen == out.sequences.shape[1] - 1 - (new - 1) and out.hidden_states[-1][-1].shape[1] == new


def test_fused_attention_warns_on_output_attentions_and_returns_no_weights(caplog):
    model = model_of("llama", "sdpa")
    ids, mask = left_padded()
    with transformers_warnings(caplog):
        out = model(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert out.attentions == () and len(out.hidden_states) == 3  # no weights, never invented ones
    assert any("does not support `output_attentions=True`" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------ tuples, keywords, cache names


@pytest.mark.parametrize("arch", ARCHS)
def test_return_dict_false_returns_the_outputs_as_tuples(arch):
    model = model_of(arch)
    ids = tokens(2, 7)
    out = model(ids, labels=ids, output_hidden_states=True)
    tup = model(ids, labels=ids, output_hidden_states=True, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 4  # loss, logits, cache, hidden_states
    torch.testing.assert_close(tup[0], out.loss, atol=0, rtol=0)
    torch.testing.assert_close(tup[1], out.logits, atol=0, rtol=0)
    assert isinstance(tup[2], DynamicCache) and len(tup[3]) == 3
    base_tup = model.model(ids, use_cache=False, return_dict=False)
    assert isinstance(base_tup, tuple) and len(base_tup) == 1
    model.config.return_dict = False  # the config's default, as for every transformers model
    assert isinstance(model(ids), tuple) and isinstance(model.model(ids), tuple)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cls", [IronCoreForCausalLM, IronCoreModel])
def test_old_past_key_values_name_still_uses_the_cache(arch, cls):
    """Same logits as the new name (tolerance 1e-5: cached and full forwards take different kernels)."""
    model = model_of(arch, cls=cls)
    ids = tokens(2, 9)
    full = model(ids)
    prefix = model(ids[:, :6])
    with pytest.warns(FutureWarning, match="`past_key_values` is deprecated .* Use `cache` instead"):
        rest = model(ids[:, 6:], past_key_values=prefix.cache)
    assert rest.cache is prefix.cache and rest.cache.get_seq_length() == 9
    key = "logits" if cls is IronCoreForCausalLM else "last_hidden_state"
    torch.testing.assert_close(rest[key], full[key][:, 6:], atol=1e-5, rtol=1e-5)


def test_cache_and_past_key_values_together_is_an_error_naming_both():
    model = model_of("llama")
    for target in (model, model.model):
        with pytest.raises(ValueError, match="Both `past_key_values` and `cache` are set"):
            target(tokens(1, 4), cache=DynamicCache(), past_key_values=DynamicCache())


def test_a_keyword_nothing_reads_is_refused():
    model = model_of("llama")
    with pytest.raises(TypeError, match=r"IronCoreForCausalLM.forward\(\) got unexpected keyword argument\(s\) 'foo'"):
        model(tokens(1, 4), foo=1)
    with pytest.raises(TypeError, match=r"IronCoreModel.forward\(\) .* 'cache_position', 'past_key_value'"):
        model.model(tokens(1, 4), past_key_value=None, cache_position=torch.arange(4))
    # transformers' own keywords are read: loss normalisation, the loss's ignore index, shifted labels
    ids = tokens(2, 6)
    plain = model(ids, labels=ids).loss
    torch.testing.assert_close(model(ids, labels=ids, num_items_in_batch=torch.tensor(5)).loss, plain * 10 / 5)
    shifted = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(model(ids, labels=ids, shift_labels=shifted).loss, plain, atol=1e-6, rtol=0)
    assert not torch.equal(model(ids, labels=ids, ignore_index=int(ids[0, 1])).loss, plain)


def test_decoder_layer_calls_attention_by_keyword_and_passes_cache_kwargs():
    model = model_of("llama")
    calls, updates = [], []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args, sorted(kwargs))), with_kwargs=True
    )

    class RecordingCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            updates.append(kwargs)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    model(tokens(1, 4), cache=RecordingCache(), output_attentions=False)
    assert calls == [((), ["attention_mask", "cache", "hidden_states", "output_attentions", "position_embeddings",
                          "position_ids"])]
    assert updates[0]["kwargs"] == {"output_attentions": False, "position_ids": updates[0]["kwargs"]["position_ids"]}


# ------------------------------------------------------------------------------------------------ resizing


@pytest.mark.parametrize("arch", ARCHS)
def test_tokens_added_by_resize_can_be_predicted_and_exported(arch):
    model = model_of(arch)
    assert (model.config.vocab_size, model.config.unpadded_vocab_size) == (64, VOCAB)
    real_rows = model.model.embed_tokens.weight[:VOCAB].detach().clone()
    model.resize_token_embeddings(VOCAB + 2)  # a pad and a chat token
    assert (model.config.vocab_size, model.config.unpadded_vocab_size) == (62, 62)
    new_rows = model.model.embed_tokens.weight[VOCAB:]
    torch.testing.assert_close(new_rows, real_rows.mean(0).expand(2, -1), atol=1e-3, rtol=0)  # not padding rows
    ids = torch.cat([tokens(2, 5), torch.tensor([[VOCAB, VOCAB + 1]] * 2)], dim=1)
    logits = model(ids).logits
    hidden = model.model(ids).last_hidden_state
    torch.testing.assert_close(logits[..., VOCAB:], hidden @ model.lm_head.weight[VOCAB:].T, atol=1e-5, rtol=1e-5)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.lm_head.weight.grad[VOCAB:].abs().sum() > 0  # training can teach them

    # pad_to_multiple_of pads again: those rows are padding, the new tokens stay real
    model.resize_token_embeddings(VOCAB + 3, pad_to_multiple_of=16)
    assert (model.config.vocab_size, model.config.unpadded_vocab_size) == (64, 63)
    logits = model(ids).logits
    assert (logits[..., 63:] == torch.finfo(logits.dtype).min).all()
    assert (logits[..., :63] > torch.finfo(logits.dtype).min / 2).all()

    # exports keep every real token and give the same logits (tolerance 1e-5: another model's kernels)
    exported = ironcore_to_llama(model) if arch == "llama" else ironcore_to_gpt2(model)
    trimmed = trim_vocab_padding(model)
    assert exported.config.vocab_size == trimmed.config.vocab_size == 63
    for other in (exported.eval(), trimmed.eval()):
        torch.testing.assert_close(other(ids).logits, logits[..., :63], atol=1e-5, rtol=1e-5)


def test_resize_keeps_its_vocabulary_through_save_and_load(tmp_path):
    model = model_of("llama")
    model.resize_token_embeddings(VOCAB + 1, pad_to_multiple_of=8)
    model.save_pretrained(tmp_path)
    loaded = IronCoreForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.config.vocab_size, loaded.config.unpadded_vocab_size) == (64, 61)
    ids = torch.tensor([[1, 2, VOCAB]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ packing


def padding_free_batch(lengths: tuple[int, ...]) -> tuple[list[torch.Tensor], dict]:
    """Documents and the batch `DataCollatorWithFlattening` (TRL's padding_free) makes of them."""
    docs = [tokens(n, seed=10 + i) for i, n in enumerate(lengths)]
    batch = DataCollatorWithFlattening(return_position_ids=True)([{"input_ids": d.tolist()} for d in docs])
    return docs, batch


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_padding_free_batch_equals_the_padded_batch(arch, attn, dtype, training):
    """Each document attends only within itself (dropout is off, so training mode runs the same numbers)."""
    model = model_of(arch, attn).to(dtype).train(training)
    docs, batch = padding_free_batch((5, 9, 3))
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, 17)
    padded = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, doc in enumerate(docs):
        padded[i, : len(doc)], mask[i, : len(doc)] = doc, 1
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        reference = model(padded, attention_mask=mask).logits
    starts = [0, 5, 14, 17]
    for i, doc in enumerate(docs):
        assert_close_at_transformers_tolerance(packed[starts[i] : starts[i + 1]], reference[i, : len(doc)])


# ------------------------------------------------------------------------------------------------ tensor parallel


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu"])
def test_tensor_parallel_plan_names_only_existing_layers(activation):
    model = model_of("llama", activation_type=activation)
    names = [name for name, _ in model.named_modules()]
    assert model.tp_plan, "the plan is the config's, merged by transformers"
    for pattern in model.tp_plan:
        regex = re.compile(re.escape(pattern).replace(r"\*", r"\d+") + "$")
        assert any(regex.match(name) for name in names), pattern
    assert ("model.layers.*.mlp.gate_proj" in model.tp_plan) == model.config.gated_mlp


# ------------------------------------------------------------------------------------------------ capabilities


@pytest.mark.parametrize("arch", ARCHS)
def test_static_cache_generation_compiles_fullgraph(arch):
    """`_can_compile_fullgraph`: decoding traces as one graph (fullgraph=True raises on any break) and generates
    what the dynamic cache generates (greedy, so exactly)."""
    model = model_of(arch)
    assert model._can_compile_fullgraph
    ids, mask = left_padded(batch=2, length=5, pad=2)
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="eager", mode="default")
    compile_config._compile_all_devices = True  # transformers' switch to compile on CPU
    compiled = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static",
        compile_config=compile_config,
    )
    assert hasattr(model, "_compiled_call") and torch.equal(compiled, dynamic)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_custom_4d_mask_of_shared_prefixes_equals_separate_rows(arch, attn):
    """Three continuations of one prefix in one row, each seeing the prefix and itself (tolerance 1e-5)."""
    model = model_of(arch, attn)
    prefix, tails = tokens(1, 4), tokens(3, 2, seed=5)
    separate = model(torch.cat([prefix.expand(3, -1), tails], dim=1)).logits[:, 4:]
    row = torch.cat([prefix[0], tails.flatten()]).unsqueeze(0)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 4, 5, 4, 5]])
    allowed = torch.zeros(10, 10, dtype=torch.bool)
    allowed[:, :4] = True
    for i in range(3):
        allowed[4 + 2 * i :, 4 + 2 * i] = True
        allowed[4 + 2 * i + 1, 4 + 2 * i + 1] = True
        allowed[4 + 2 * i + 2 :, 4 + 2 * i : 4 + 2 * i + 2] = False
    allowed &= torch.ones(10, 10, dtype=torch.bool).tril()
    additive = torch.zeros(10, 10).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    shared = model(row, attention_mask=additive, position_ids=positions).logits[0, 4:]
    torch.testing.assert_close(shared.view(3, 2, -1), separate, atol=1e-5, rtol=1e-5)


def test_flex_attention_runs_on_cpu_and_matches_sdpa():
    """`_supports_flex_attn`: padded and padding-free batches (tolerance 1e-5)."""
    sdpa = model_of("llama")
    assert sdpa._supports_flex_attn
    flex = same_weights(sdpa, "flex_attention")
    ids, mask = left_padded()
    with torch.no_grad():
        torch.testing.assert_close(
            flex(ids, attention_mask=mask).logits[-1, 3:], sdpa(ids, attention_mask=mask).logits[-1, 3:],
            atol=1e-5, rtol=1e-5,
        )
        _, batch = padding_free_batch((5, 9, 3))
        torch.testing.assert_close(flex(**batch).logits, sdpa(**batch).logits, atol=1e-5, rtol=1e-5)


def test_a_registered_attention_backend_gets_every_keyword():
    """`_supports_attention_backend`: transformers' interfaces drive the model, and keywords reach the kernel."""
    seen = []

    def counting_sdpa(module, query, key, value, attention_mask, **kwargs):
        seen.append(kwargs.get("block_table"))
        kwargs.pop("block_table", None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("ironcore_test_sdpa", counting_sdpa)
    AttentionMaskInterface.register("ironcore_test_sdpa", sdpa_mask)
    sdpa = model_of("llama")
    assert IronCoreForCausalLM.is_backend_compatible()
    custom = same_weights(sdpa, "sdpa")
    custom.set_attn_implementation("ironcore_test_sdpa")
    ids, mask = left_padded()
    with torch.no_grad():
        out = custom(ids, attention_mask=mask, block_table="table", logits_to_keep=torch.tensor([8])).logits
        torch.testing.assert_close(out, sdpa(ids, attention_mask=mask).logits[:, 8:], atol=1e-6, rtol=0)
    assert seen == ["table", "table"]  # one call per layer


# ------------------------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_and_sdpa_agree_on_padded_batches(arch, side, dtype):
    """Real tokens' logits and last hidden states, at transformers' eager <> SDPA tolerances."""
    eager = model_of(arch, "eager").to(dtype)
    sdpa = same_weights(eager, "sdpa")
    ids, mask = tokens(3, 9), torch.ones(3, 9, dtype=torch.long)
    if side == "left":
        mask[-1, :3] = 0
    else:
        mask[-1, -3:] = 0
    real = mask.bool()
    with torch.no_grad():
        a = eager(ids, attention_mask=mask, output_hidden_states=True)
        b = sdpa(ids, attention_mask=mask, output_hidden_states=True)
    assert_close_at_transformers_tolerance(b.hidden_states[-1][real], a.hidden_states[-1][real])
    assert_close_at_transformers_tolerance(b.logits[real], a.logits[real])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batched_generation_equals_each_row_alone(arch, attn):
    model = model_of(arch, attn)
    prompts = [tokens(1, n, seed=20 + n)[0] for n in (6, 3, 5)]
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, 6 - len(prompt) :], mask[i, 6 - len(prompt) :] = prompt, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert torch.equal(batched[i, 6:], alone[0, len(prompt) :]), i
