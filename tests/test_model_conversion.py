"""IronCore <-> GPT-2 / LLaMA conversion, save/load (also as remote code), presets, pretrained-init checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from helpers_model import GPT2_LIKE, LLAMA_LIKE, one_thread, tiny_config, tiny_run  # noqa: F401
from helpers_train import cli_errors, example_overrides
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ironcore.config import config_from_dict, load_config
from ironcore.errors import CheckpointError, ConfigError
from ironcore.models import (
    IronCoreConfig,
    IronCoreForCausalLM,
    build_model,
    gpt2_to_ironcore,
    ironcore_to_gpt2,
    ironcore_to_llama,
    ironcore_to_mistral,
    ironcore_to_qwen2,
    llama_to_ironcore,
    load_pretrained,
    trim_vocab_padding,
)
from ironcore.models.conversion import ironcore_tensors

REPO = Path(__file__).resolve().parent.parent
TOL = dict(atol=1e-5, rtol=0)


def ironcore(seed: int = 0, **kwargs) -> IronCoreForCausalLM:
    torch.manual_seed(seed)
    return IronCoreForCausalLM(tiny_config(**kwargs)).eval()


def ids(batch: int = 2, length: int = 12, vocab: int = 60) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(5))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------ GPT-2


@pytest.mark.parametrize("untie", [False, True])
def test_ironcore_to_gpt2_and_back(untie):
    model = ironcore(untie_embed=untie, **GPT2_LIKE)
    gpt2 = ironcore_to_gpt2(model)
    x = ids()
    assert gpt2.config.vocab_size == 60 and gpt2.transformer.wte.weight.shape[0] == 60  # padding trimmed
    assert (gpt2.lm_head.weight is gpt2.transformer.wte.weight) == (not untie)
    torch.testing.assert_close(gpt2(x).logits, model(x).logits[..., :60], **TOL)
    back = gpt2_to_ironcore(gpt2)
    assert back.config.vocab_size == 60
    torch.testing.assert_close(back(x).logits, model(x).logits[..., :60], atol=0, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_to_ironcore_and_back(tie):
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=60,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        initializer_range=0.2,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=None,
    )
    gpt2 = GPT2LMHeadModel(config).eval()
    model = gpt2_to_ironcore(gpt2)
    x = ids()
    assert model.config.activation_type == "gelu_tanh" and model.config.tie_word_embeddings == tie
    torch.testing.assert_close(model(x).logits, gpt2(x).logits, **TOL)
    assert_same_weights(ironcore_to_gpt2(model), gpt2)


# ------------------------------------------------------------------------------------------------ LLaMA


@pytest.mark.parametrize("untie", [False, True])
@pytest.mark.parametrize("groups", [None, 2])
def test_ironcore_to_llama_and_back(untie, groups):
    model = ironcore(pe="rope", num_attention_groups=groups, untie_embed=untie, head_dim=16, **LLAMA_LIKE)
    llama = ironcore_to_llama(model)
    x = ids()
    assert llama.config.vocab_size == 60 and llama.config.num_key_value_heads == (groups or 4)
    assert (llama.lm_head.weight is llama.model.embed_tokens.weight) == (not untie)
    torch.testing.assert_close(llama(x).logits, model(x).logits[..., :60], **TOL)
    torch.testing.assert_close(llama_to_ironcore(llama)(x).logits, model(x).logits[..., :60], atol=0, rtol=0)


def test_llama_with_bias_geglu_and_linear_rope_scaling():
    model = ironcore(pe="rope", rope=dict(base=500.0, scaling_factor=4.0), ln_type="rmsnorm", activation_type="geglu")
    llama = ironcore_to_llama(model)
    assert llama.config.rope_parameters == {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}
    assert llama.config.attention_bias and llama.config.mlp_bias and llama.config.hidden_act == "gelu"
    x = ids()
    torch.testing.assert_close(llama(x).logits, model(x).logits[..., :60], **TOL)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_to_ironcore_and_back(tie, kv_heads):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=60,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=64,
        initializer_range=0.2,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=None,
    )
    llama = LlamaForCausalLM(config).eval()
    model = llama_to_ironcore(llama)
    x = ids()
    assert model.config.activation_type == "swiglu" and model.config.num_key_value_heads == kv_heads
    torch.testing.assert_close(model(x).logits, llama(x).logits, **TOL)
    assert_same_weights(ironcore_to_llama(model), llama)


# ------------------------------------------------------------------------------------------------ refusals


def test_conversion_to_an_architecture_the_config_cannot_express():
    llama_like = ironcore(pe="rope", num_attention_groups=2, head_dim=16, **LLAMA_LIKE)
    with pytest.raises(ConfigError) as caught:
        ironcore_to_gpt2(llama_like)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("cannot convert to GPT2LMHeadModel")
    for field in (
        "positional_embedding.type=rope",
        "ln_type=rmsnorm",
        "activation_type=swiglu",
        "no_bias=true",
        "num_attention_groups=2",
        "head_dim=16",
    ):
        assert f"model.{field}" in message
    with pytest.raises(ConfigError, match=r"model.positional_embedding.type=absolute .*model.ln_type=layernorm"):
        ironcore_to_llama(ironcore(**GPT2_LIKE))
    with pytest.raises(ConfigError, match=r"model.positional_embedding.offset=3 \(needs 0\); model.post_ln=true"):
        ironcore_to_llama(ironcore(pe="rope", rope=dict(offset=3), post_ln=True, **LLAMA_LIKE))
    llama3 = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=60,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
        )
    )
    with pytest.raises(ConfigError, match="rope_parameters.rope_type=dynamic"):
        llama_to_ironcore(llama3)


# ------------------------------------------------------------------------------------------------ save / load


def test_save_pretrained_round_trip_is_bitwise(tmp_path):
    model = ironcore(pe="rope", num_attention_groups=2, untie_embed=True, **LLAMA_LIKE)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "ironcore" and saved["vocab_size"] == 64 and saved["unpadded_vocab_size"] == 60
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is IronCoreForCausalLM and loaded.dtype == torch.float32
    assert_same_weights(loaded, model)
    x = ids()
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
    tied = ironcore(**GPT2_LIKE)
    tied.save_pretrained(tmp_path / "tied")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert_same_weights(reloaded, tied)


REMOTE_LOAD = """
import sys
sys.modules["ironcore"] = None  # not importable here, even if it were installed in site-packages
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    torch.save({"logits": model(torch.load(sys.argv[2])).logits, "module": type(model).__module__}, sys.argv[3])
"""


def test_trust_remote_code_load_without_ironcore(tmp_path):
    model = ironcore(pe="rope", num_attention_groups=2, **LLAMA_LIKE)
    export = tmp_path / "export"
    model.save_pretrained(export)
    assert {"configuration_ironcore.py", "modeling_ironcore.py"} <= {p.name for p in export.iterdir()}
    auto_map = json.loads((export / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_ironcore.IronCoreForCausalLM"
    x = ids()
    torch.save(x, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_LOAD, str(export), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    remote = torch.load(tmp_path / "out.pt")
    assert remote["module"].startswith("transformers_modules.")
    torch.testing.assert_close(remote["logits"], model(x).logits, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ presets

PRESETS = sorted((REPO / "configs" / "model").glob("*.yaml"))


def preset_run(path: Path, vocab_size: int = 50257, unit: int = 1):
    raw = yaml.safe_load(path.read_text())
    return config_from_dict({"model": raw, "data": {"vocab_size": vocab_size}, "trainer": {"vocab_padding_unit": unit}})


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_builds_on_meta(preset):
    run = preset_run(preset, unit=128)
    config = IronCoreConfig.from_run_config(run)
    with torch.device("meta"):
        model = IronCoreForCausalLM(config)
    assert model.lm_head.weight.shape == (50304, run.model.d_model)
    assert len(model.model.layers) == run.model.num_layers


def test_gpt2_small_parameter_count_matches_gpt2lmheadmodel():
    config = IronCoreConfig.from_run_config(preset_run(REPO / "configs" / "model" / "gpt2-small.yaml"))
    with torch.device("meta"):
        ours = IronCoreForCausalLM(config)
        theirs = GPT2LMHeadModel(GPT2Config(vocab_size=50257))
    assert ours.num_parameters() == theirs.num_parameters() == 124_439_808


def loaded_preset(name: str):
    """A preset through the real lookup (`model=NAME`), at GPT-2's vocabulary and no padding."""
    return load_config(None, [f"model={name}", "data.vocab_size=50257", "trainer.vocab_padding_unit=1"])


@pytest.mark.parametrize(
    ("name", "d_model", "layers", "heads"), [("gpt2-large", 1280, 36, 20), ("gpt2-xl", 1600, 48, 25)]
)
def test_gpt2_large_and_xl_presets_have_gpt2_shapes(name, d_model, layers, heads):
    run = loaded_preset(name)
    m = run.model
    assert (m.d_model, m.num_layers, m.num_attention_heads, m.head_dim) == (d_model, layers, heads, d_model // heads)
    assert (m.d_ffn, m.max_seq_len, m.num_attention_groups) == (4 * d_model, 1024, None)
    assert (m.ln_type, m.activation_type, m.positional_embedding.type) == ("layernorm", "gelu_tanh", "absolute")
    assert (m.post_ln, m.no_bias, m.untie_embed, m.tokenizer_type) == (False, False, False, "gpt2")
    config = IronCoreConfig.from_run_config(run)
    assert (config.vocab_size, config.max_position_embeddings) == (50257, 1024)
    reference = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=d_model, n_layer=layers, n_head=heads)
    with torch.device("meta"):
        ours, theirs = IronCoreForCausalLM(config), GPT2LMHeadModel(reference)
    assert ours.num_parameters() == theirs.num_parameters()
    if name == "gpt2-large":
        assert ours.num_parameters() == 774_030_080


def test_llama_preset_is_a_llama_shape():
    run = loaded_preset("llama")
    m = run.model
    assert (m.ln_type, m.activation_type, m.positional_embedding.type) == ("rmsnorm", "swiglu", "rope")
    assert m.no_bias and m.untie_embed and not m.post_ln
    assert 1 < m.num_attention_groups < m.num_attention_heads and m.num_attention_heads % m.num_attention_groups == 0
    config = IronCoreConfig.from_run_config(run)
    assert config.num_key_value_heads == m.num_attention_groups and not config.bias
    reference = LlamaConfig(
        vocab_size=50257,
        hidden_size=m.d_model,
        intermediate_size=m.d_ffn,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_attention_groups,
        head_dim=m.head_dim,
        max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.ln_eps,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        ours, theirs = IronCoreForCausalLM(config), LlamaForCausalLM(reference)
    assert sorted(p.shape for p in ours.parameters()) == sorted(p.shape for p in theirs.parameters())
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight


# ------------------------------------------------------------------------------------------------ pretrained init


def test_load_pretrained_detects_the_model_type(tmp_path):
    x = ids()
    gpt2 = ironcore_to_gpt2(ironcore(**GPT2_LIKE))
    llama = ironcore_to_llama(ironcore(pe="rope", num_attention_groups=2, head_dim=16, **LLAMA_LIKE))
    native = ironcore(pe="none", activation_type="relu")
    for name, source in (("gpt2", gpt2), ("llama", llama), ("ironcore", native)):
        source.save_pretrained(tmp_path / name)
        loaded = load_pretrained(tmp_path / name)
        assert type(loaded) is IronCoreForCausalLM
        torch.testing.assert_close(loaded.eval()(x).logits, source(x).logits, **TOL)
    trimmed = trim_vocab_padding(native)
    assert trimmed.config.vocab_size == 60 and trimmed.model.embed_tokens.weight.shape[0] == 60
    torch.testing.assert_close(trimmed(x).logits, native(x).logits[..., :60], atol=0, rtol=0)


def test_build_model_from_pretrained_checks_the_config(tmp_path):
    run = tiny_run(**GPT2_LIKE)
    source = ironcore_to_gpt2(build_model(run).eval())
    source.save_pretrained(tmp_path)
    model = build_model(replace(run, init=replace(run.init, from_pretrained=str(tmp_path)))).eval()
    assert model.config.vocab_size == 64  # re-padded for this run
    x = ids()
    torch.testing.assert_close(model(x).logits[..., :60], source(x).logits, **TOL)
    different = replace(
        run, model=replace(run.model, d_ffn=128, ln_eps=1e-6), init=replace(run.init, from_pretrained=str(tmp_path))
    )
    with pytest.raises(CheckpointError, match=r"model.d_ffn is 64 there but 128 in the config; model.ln_eps") as caught:
        build_model(different)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("kind", ["ironcore", "gpt2"])
def test_checkpoint_whose_shapes_do_not_match_its_config(tmp_path, kind):
    model = ironcore(**GPT2_LIKE)
    (ironcore_to_gpt2(model) if kind == "gpt2" else model).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size" if kind == "ironcore" else "n_inner"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as caught:
        load_pretrained(tmp_path)
    message = str(caught.value)
    tensor = "model.layers.0.mlp.up_proj.weight" if kind == "ironcore" else "transformer.h.0.mlp.c_fc.weight"
    shapes = ("(64, 32)", "(48, 32)") if kind == "ironcore" else ("(32, 64)", "(32, 48)")
    assert "\n" not in message and tensor in message and all(s in message for s in shapes), message


def test_directories_that_are_not_models(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"model_type 'bert' is not supported \(supported: ironcore, gpt2, llama, mistral, qwen2\)"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(IronCoreConfig().to_json_string())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pretrained(tmp_path)


def broken_model_dir(path: Path, kind: str) -> Path:
    """An IronCore model directory at `path` whose weights or config are broken as `kind` says; returns the file
    the error must name."""
    model = ironcore(**GPT2_LIKE)
    if kind == "truncated bin":
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
        os.truncate(path / "pytorch_model.bin", (path / "pytorch_model.bin").stat().st_size // 2)
        return path / "pytorch_model.bin"
    model.save_pretrained(path, max_shard_size="40KB" if "shard" in kind or "index" in kind else "50GB")
    index = path / "model.safetensors.index.json"
    if kind == "missing shard":
        shard = sorted(path.glob("model-*.safetensors"))[-1]
        shard.unlink()
        return index
    if kind == "index not json":
        index.write_text("{not json")
        return index
    if kind == "config not json":
        (path / "config.json").write_text('{"model_type": "ironcore",')
        return path / "config.json"
    weights = path / "model.safetensors"
    if kind == "truncated":
        os.truncate(weights, weights.stat().st_size - 100)
    else:
        weights.write_bytes(weights.read_bytes()[:8] + os.urandom(200))
    return weights


BROKEN = ["truncated", "garbage header", "missing shard", "index not json", "config not json", "truncated bin"]


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_pretrained_dir_is_one_error_naming_the_file(tmp_path, kind):
    """load_pretrained (export, generate) and init.from_pretrained (training) read every header before any weight,
    so a damaged file is a CheckpointError naming it, not a safetensors / torch / json traceback."""
    blamed = broken_model_dir(tmp_path / "model", kind)
    run = tiny_run(**GPT2_LIKE)
    for load in (lambda: load_pretrained(tmp_path / "model"),
                 lambda: build_model(replace(run, init=replace(run.init, from_pretrained=str(tmp_path / "model"))))):
        with pytest.raises(CheckpointError) as caught:
            load()
        assert str(caught.value).startswith(str(blamed)) and "\n" not in str(caught.value), caught.value


def test_training_from_a_corrupt_pretrained_dir_is_one_line(tmp_path, capsys):
    """`ironcore train` with init.from_pretrained naming a truncated model.safetensors: exit 2, one line, no run."""
    blamed = broken_model_dir(tmp_path / "pretrained", "truncated")
    run_dir = tmp_path / "run"
    args = ["train", str(REPO / "examples" / "pretrain.yaml"),
            *example_overrides(run_dir, f"init.from_pretrained={tmp_path / 'pretrained'}")]
    code, errors = cli_errors(args, capsys)
    assert code == 2 and len(errors) == 1 and str(blamed) in errors[0], errors
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "export").exists()


# ------------------------------------------------------------------------------------------------ families

SMALL = dict(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             head_dim=8, max_position_embeddings=64, initializer_range=0.2, bos_token_id=None, eos_token_id=None)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
FAMILIES = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=60, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                               initializer_range=0.2, bos_token_id=None, eos_token_id=None)),
    # distilgpt2: GPT-2 with half the layers, an explicit n_inner and the exact-erf gelu
    "distilgpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=60, n_positions=32, n_embd=32, n_layer=3, n_head=2,
                                                     n_inner=96, activation_function="gelu", initializer_range=0.2,
                                                     bos_token_id=None, eos_token_id=None)),
    "llama2": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False)),
    "llama-linear-scaling": lambda: LlamaForCausalLM(LlamaConfig(
        **SMALL, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0})),
    "llama3.1-untied": lambda: LlamaForCausalLM(LlamaConfig(
        **SMALL, num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    "llama3.2-tied": lambda: LlamaForCausalLM(LlamaConfig(
        **SMALL, num_key_value_heads=1, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=None)),
    "mistral-window-covers-all": lambda: MistralForCausalLM(MistralConfig(**SMALL, num_key_value_heads=4, sliding_window=64)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True)),
}
BACK = {"gpt2": ironcore_to_gpt2, "llama": ironcore_to_llama, "mistral": ironcore_to_mistral,
        "qwen2": ironcore_to_qwen2}


def family(name: str):
    torch.manual_seed(0)
    return FAMILIES[name]().eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_family_loads_with_transformers_logits_and_converts_back(tmp_path, name):
    """save_pretrained -> load_pretrained: the same logits as transformers (fp32); back to its class bit for bit."""
    native = family(name)
    native.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path).eval()
    x = ids(length=30)
    torch.testing.assert_close(model(x).logits, native(x).logits, **TOL)
    back = BACK[native.config.model_type](model)
    assert type(back) is type(native) and back.config.tie_word_embeddings == native.config.tie_word_embeddings
    assert_same_weights(back, native)
    torch.testing.assert_close(back(x).logits, native(x).logits, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama3.1-untied", "llama3.2-tied"])
def test_the_meta_walk_of_a_checkpoint_gives_every_tensor_rank_0_reads(tmp_path, name):
    """Under ZeRO-3 only rank 0 reads the checkpoint; the other ranks walk the same conversion on meta tensors to
    take part in each tensor's scatter (`load_partitioned`): the same names in the same order, the same shapes."""
    family(name).save_pretrained(tmp_path)
    config = load_pretrained(tmp_path).config
    model_type = json.loads((tmp_path / "config.json").read_text())["model_type"]
    read = list(ironcore_tensors(tmp_path, model_type, config, config.vocab_size))
    walked = list(ironcore_tensors(tmp_path, model_type, config, config.vocab_size, meta=True))
    assert [(n, t.shape) for n, t in walked] == [(n, t.shape) for n, t in read]
    assert all(t.is_meta for _, t in walked) and not any(t.is_meta for _, t in read)


def test_llama3_scaling_matches_transformers_in_every_band():
    """The llama3 rope has three bands (kept, blended, divided by the factor); all appear and match transformers."""
    native = family("llama3.1-untied")
    rotary = llama_to_ironcore(native).model.rotary_emb
    ours = rotary.inv_freq(torch.device("cpu"))
    torch.testing.assert_close(ours, native.model.rotary_emb.inv_freq, atol=0, rtol=1e-6)
    plain = 1.0 / 500000.0 ** (torch.arange(0, 8, 2, dtype=torch.float) / 8)
    ratios = (plain / ours).tolist()
    assert ratios[0] == pytest.approx(1.0) and ratios[-1] == pytest.approx(8.0)
    assert any(1.0 + 1e-3 < r < 8.0 - 1e-3 for r in ratios), ratios


def test_qwen2_layout_is_qkv_bias_only():
    model = llama_to_ironcore(family("qwen2"))
    attention = model.model.layers[0].self_attn
    assert model.config.spec_fields()["model.no_bias"] and model.config.qkv_bias
    assert attention.q_proj.bias is not None and attention.v_proj.bias is not None and attention.o_proj.bias is None
    assert model.model.layers[0].mlp.up_proj.bias is None
    with pytest.raises(ConfigError, match=r"cannot convert to LlamaForCausalLM: model.no_bias=true, "
                                          r"model.qkv_bias=true \(needs model.no_bias=false or model.no_bias=true"):
        ironcore_to_llama(model)
    with pytest.raises(ConfigError, match=r"cannot convert to GPT2LMHeadModel: .*model.no_bias=true"):
        ironcore_to_gpt2(model)
    with pytest.raises(ConfigError, match=r"cannot convert to Qwen2ForCausalLM: model.no_bias=true with "
                                          r"model.qkv_bias unset \(needs model.no_bias=true, model.qkv_bias=true\)"):
        ironcore_to_qwen2(ironcore(pe="rope", head_dim=16, **LLAMA_LIKE))


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def one_line(call) -> str:
    with pytest.raises((CheckpointError, ConfigError)) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_what_the_families_cannot_express_is_refused_naming_the_field(tmp_path):
    short_window = MistralForCausalLM(MistralConfig(**SMALL, num_key_value_heads=4, sliding_window=16))
    message = one_line(lambda: load_pretrained(save(short_window, tmp_path / "mistral")))
    assert "sliding_window: a 16-token sliding window is shorter than the 64-token sequences" in message
    assert "model.max_seq_len <= 16" in message
    # trained on sequences no longer than the window, it computes exactly what Mistral does
    x = ids(length=16)
    torch.testing.assert_close(llama_to_ironcore(short_window.eval(), 16)(x).logits, short_window(x).logits, **TOL)
    qwen_window = Qwen2ForCausalLM(
        Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=16, max_window_layers=1))
    message = one_line(lambda: load_pretrained(save(qwen_window, tmp_path / "qwen2")))
    assert "use_sliding_window / layer_types: a 16-token sliding window" in message
    mixed_bias = LlamaForCausalLM(LlamaConfig(**SMALL, attention_bias=True, mlp_bias=False))
    message = one_line(lambda: load_pretrained(save(mixed_bias, tmp_path / "bias")))
    assert "attention_bias=True with mlp_bias=False" in message
    yarn = LlamaForCausalLM(LlamaConfig(**SMALL, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 32}))
    assert "rope_parameters.rope_type=yarn" in one_line(lambda: load_pretrained(save(yarn, tmp_path / "yarn")))
    qk_norm = Qwen3ForCausalLM(Qwen3Config(**SMALL))  # q/k norms: a model type IronCore does not load
    message = one_line(lambda: load_pretrained(save(qk_norm, tmp_path / "qwen3")))
    assert "model_type 'qwen3' is not supported (supported: ironcore, gpt2, llama, mistral, qwen2)" in message
