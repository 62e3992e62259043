"""init.from_pretrained from any source (a local dir, a Hub name in the HF cache), the model group derived from the
checkpoint's config.json, and its bad inputs. The Hub cache is written in the Hub's own layout and read through
the real huggingface_hub code, offline (tests/conftest.py sets HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from helpers_data import VOCAB, default_tok_dir_fixture  # noqa: F401
from helpers_hub import REVISION, checkpoint_dir, hub_cache_fixture, into_hub_cache  # noqa: F401
from helpers_train import CACHE, cli_errors, train_in_process
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ironcore.cli import main
from ironcore.config import config_to_dict, load_config
from ironcore.errors import CheckpointError, ConfigError
from ironcore.models import build_model, load_pretrained
from ironcore.models.conversion import ironcore_to_source, loads_partitioned

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}


def tiny_llama(vocab: int = VOCAB) -> LlamaForCausalLM:
    """A Llama-3.2-shaped checkpoint (llama3 rope, theta 500000, GQA, tied head) of ~60k parameters."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.2,
        tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE, bos_token_id=None, eos_token_id=None,
    )).eval()


@pytest.fixture(name="llama_dir")
def llama_dir_fixture(tmp_path, default_tok_dir) -> Path:
    return checkpoint_dir(tmp_path / "llama", tiny_llama(), default_tok_dir)


def run_file(tmp_path: Path, source: str, model: dict | None = None, **data) -> Path:
    text = {
        "trainer": {"model_path": str(tmp_path / "run"), "micro_batch_size": 2, "gradient_accumulation_steps": 1,
                    "log_interval": 1, "num_workers": 0, "vocab_padding_unit": 64},
        "operation": {"train_steps": 2},
        "data": {"task_type": "pretrain", "seq_length": 32, **data},
        "init": {"from_pretrained": source},
    }
    if model is not None:
        text["model"] = model
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(text))
    return path


# ------------------------------------------------------------------------------------------------ the model group


def test_model_group_comes_from_the_checkpoint(tmp_path, llama_dir):
    """No architecture field given: all of them, data.vocab_size and the tokenizer come from the checkpoint."""
    run = load_config(run_file(tmp_path, str(llama_dir), model={"dropout_attn": 0.0, "precision": "float32"}))
    m = run.model
    assert (m.d_model, m.d_ffn, m.num_layers, m.num_attention_heads, m.num_attention_groups, m.head_dim) == (
        32, 48, 2, 4, 2, 8)
    assert (m.ln_type, m.activation_type, m.no_bias, m.qkv_bias, m.untie_embed, m.max_seq_len) == (
        "rmsnorm", "swiglu", True, False, False, 64)
    pe = m.positional_embedding
    assert (pe.type, pe.base, pe.scaling_type, pe.scaling_factor, pe.original_max_seq_len) == (
        "rope", 500000.0, "llama3", 8.0, 256)
    assert m.ln_eps == 1e-5 and m.dropout_mlp == 0.0 and m.dropout_attn == 0.0
    assert run.data.vocab_size == VOCAB and run.derived.padded_vocab_size == 768
    assert (m.vocab_name_or_path, m.tokenizer_type) == (str(llama_dir), "auto")
    sources = run.derived.model_sources
    assert sources["model.d_model"] == f"{llama_dir} (config.json: hidden_size)"
    assert sources["model.positional_embedding.scaling_type"] == f"{llama_dir} (config.json: rope_parameters.rope_type)"
    assert sources["model.dropout_attn"] == "config"
    assert sources["data.vocab_size"].endswith("(config.json: vocab_size)")
    model = build_model(run).eval()
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x).logits, tiny_llama()(x).logits, atol=1e-5, rtol=0)
    # the saved, resolved config gives every field, so re-resolving it never reads the checkpoint again
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(config_to_dict(run)))
    shutil.rmtree(llama_dir)
    again = load_config(saved)
    assert again.model == run.model and again.derived.model_sources is None


def test_explicit_fields_that_contradict_the_checkpoint_are_refused(tmp_path, llama_dir):
    agreeing = {"d_model": 32, "num_attention_groups": 2, "max_seq_len": 32, "positional_embedding": {"base": 5e5}}
    run = load_config(run_file(tmp_path, str(llama_dir), model=agreeing))
    assert run.model.max_seq_len == 32 and run.derived.model_sources["model.d_model"] == "config"  # rope context: free
    bad = {"d_model": 64, "ln_type": "layernorm", "positional_embedding": {"scaling_type": "linear"}}
    with pytest.raises(ConfigError) as caught:
        load_config(run_file(tmp_path, str(llama_dir), model=bad, vocab_size=1024))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"init.from_pretrained={llama_dir}: the pretrained model does not match the run's model")
    for part in ("model.d_model is 32 there but 64 in the config (config.json: hidden_size)",
                 "model.ln_type is rmsnorm there but layernorm in the config (llama architecture)",
                 "model.positional_embedding.scaling_type is llama3 there but linear in the config",
                 "data.vocab_size is 768 there but 1024 in the config (config.json: vocab_size)"):
        assert part in message, message


def test_explain_shows_where_each_model_value_came_from(tmp_path, llama_dir, capsys):
    assert main(["config", str(run_file(tmp_path, str(llama_dir), model={"dropout_mlp": 0.0})), "--explain",
                 "--format", "json", "--world-size", "1"]) == 0
    derived = json.loads(capsys.readouterr().out)["explain"]["model_from_checkpoint"]
    assert derived["source"] == str(llama_dir)
    fields = derived["fields"]
    groups = {"value": 2, "from": f"{llama_dir} (config.json: num_key_value_heads)"}
    assert fields["model.num_attention_groups"] == groups
    assert fields["model.positional_embedding.base"]["value"] == 500000.0
    assert fields["model.dropout_mlp"] == {"value": 0.0, "from": "config"}
    assert fields["model.vocab_name_or_path"] == {"value": str(llama_dir), "from": f"{llama_dir} (its tokenizer files)"}


@pytest.mark.parametrize("overrides, stage, partitioned", [
    (["parallel.deepspeed_config=zero3"], 3, True),
    (["parallel.deepspeed_config=zero3_offload"], 3, True),
    (["parallel.deepspeed_config=zero2"], 2, False),
    (["parallel.use_fsdp=true"], 0, False),  # FSDP has its own rank-0 route: loads_on_main_process_only
    (["parallel.deepspeed_config=zero3", "data.task_type=dpo"], 3, False),  # DPO copies a full live reference
])
def test_zero3_loads_a_checkpoint_partitioned(tmp_path, llama_dir, overrides, stage, partitioned):
    """Which runs build the pretrained model partitioned under deepspeed.zero.Init and fill it from rank 0's reads;
    the 2-rank runs in test_distributed show the loaded weights equal one process's."""
    run = load_config(run_file(tmp_path, str(llama_dir)), overrides)
    assert run.derived.zero_stage == stage
    assert loads_partitioned(run) is partitioned


def test_tokenizer_bigger_than_the_embedding_rows(tmp_path, default_tok_dir, capsys):
    small = checkpoint_dir(tmp_path / "small", tiny_llama(vocab=500), default_tok_dir)
    code, errors = cli_errors(["train", str(run_file(tmp_path, str(small), cache_dir=str(CACHE)))], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert "data.vocab_size 500 is smaller than the tokenizer's vocabulary (768 tokens" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------ Hub names


def test_hub_name_resolves_offline_from_the_cache(tmp_path, llama_dir, hub_cache):
    snapshot = into_hub_cache(hub_cache, "tiny-org/tiny-llama", llama_dir)
    for source in ("tiny-org/tiny-llama", f"tiny-org/tiny-llama@{REVISION}"):
        run = load_config(run_file(tmp_path, source))
        assert run.model.d_model == 32 and run.model.vocab_name_or_path == str(snapshot)
        assert run.derived.model_sources["model.d_model"] == f"{source} (config.json: hidden_size)"
    model = build_model(run).eval()
    x = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(x).logits[..., :VOCAB], tiny_llama()(x).logits, atol=1e-5, rtol=0)


def test_hub_name_in_a_subprocess_with_hf_hub_cache(tmp_path, llama_dir):
    """`ironcore config` in a fresh process, the cache given the usual way (HF_HUB_CACHE), offline."""
    cache = tmp_path / "hub"
    into_hub_cache(cache, "tiny-org/tiny-llama", llama_dir)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    config = run_file(tmp_path, "tiny-org/tiny-llama")
    out = subprocess.run([sys.executable, "-m", "ironcore.cli", "config", str(config), "--format", "json",
                          "--world-size", "1"],
                         env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    report = json.loads(out)
    assert report["model"]["num_attention_groups"] == 2 and report["data"]["vocab_size"] == VOCAB


def hub_error(tmp_path: Path, source: str) -> str:
    with pytest.raises((CheckpointError, ConfigError)) as caught:
        load_config(run_file(tmp_path, source))
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_hub_bad_inputs(tmp_path, llama_dir, hub_cache):
    assert hub_error(tmp_path, "tiny-org/not-cached") == (
        f"init.from_pretrained: tiny-org/not-cached is not in the local cache ({hub_cache}) and HF_HUB_OFFLINE is set")
    assert "is neither a local directory nor a Hub name" in hub_error(tmp_path, "no such thing")
    assert "missing is not a directory (expected a model directory with config.json" in hub_error(
        tmp_path, "./missing")
    # .bin-only repository: nothing pickled is taken from the Hub
    bin_only = tmp_path / "bin_only"
    model = tiny_llama()
    model.config.save_pretrained(bin_only)
    torch.save(model.state_dict(), bin_only / "pytorch_model.bin")  # transformers 5 writes safetensors only
    into_hub_cache(hub_cache, "tiny-org/bin-only", bin_only)
    assert "tiny-org/bin-only has no safetensors weights" in hub_error(tmp_path, "tiny-org/bin-only")
    # a local .bin is read with torch.load(weights_only=True): plain tensors load, anything else is refused
    x = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(load_pretrained(bin_only).eval()(x).logits, model(x).logits, atol=1e-5, rtol=0)
    torch.save({**model.state_dict(), "extra": Path("code")}, bin_only / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: not a readable PyTorch weights file"):
        load_pretrained(bin_only)
    # an unsupported model type lists the supported ones
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    assert "model_type 'mixtral' is not supported (supported: ironcore, gpt2, llama, mistral, qwen2)" in hub_error(
        tmp_path, str(other))


# The Hub's answers as it sends them (status and X-Error-Code header), which huggingface_hub's own error mapping
# (hf_raise_for_status) turns into its exception classes: only the network is replaced, by httpx's mock transport.
HUB_ANSWERS = {
    "missing": ("tiny-org/no-such-model", 401, "RepoNotFound", "Repository not found",
                "init.from_pretrained: no Hub repository named tiny-org/no-such-model (or it is private: log in with "
                "`hf auth login` or set HF_TOKEN)"),
    "gated": ("tiny-org/gated", 403, "GatedRepo", "Access to model tiny-org/gated is restricted.",
              "init.from_pretrained: tiny-org/gated is a gated repository: accept its terms on huggingface.co, then "
              "log in with `hf auth login` (or set HF_TOKEN)"),
    "revision": ("tiny-org/tiny-llama@nope", 404, "RevisionNotFound", "Invalid rev id: nope",
                 "init.from_pretrained: tiny-org/tiny-llama has no revision 'nope'"),
}


@pytest.mark.parametrize("case", HUB_ANSWERS)
def test_hub_errors_from_the_network_are_one_line_and_exit_2(tmp_path, hub_cache, monkeypatch, capsys, case):
    """Online (HF_HUB_OFFLINE unset), the Hub answering with the error: `ironcore train` exits 2 with one line
    that says what to do, and writes nothing (no run directory, nothing in the cache)."""
    import httpx2
    from huggingface_hub.utils import _http

    source, status, code, message, expected = HUB_ANSWERS[case]
    requests = []

    def hub(request: httpx2.Request) -> httpx2.Response:
        requests.append(str(request.url))
        return httpx2.Response(status, headers={"X-Error-Code": code, "X-Error-Message": message},
                               json={"error": message}, request=request)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    try:
        code_, errors = cli_errors(["train", str(run_file(tmp_path, source))], capsys)
    finally:
        _http.set_client_factory(_http.default_client_factory)
    repo_id = source.partition("@")[0]
    assert any(f"huggingface.co/api/models/{repo_id}/" in url for url in requests), requests  # it did ask the Hub
    assert (code_, errors) == (2, [f"error: {expected}"])
    assert not (tmp_path / "run").exists()
    assert not any(p.is_file() for p in hub_cache.rglob("*")), list(hub_cache.rglob("*"))


def test_gpt2_checkpoint_derives_absolute_positions_and_refuses_a_shorter_table(tmp_path, default_tok_dir):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4))
    source = checkpoint_dir(tmp_path / "gpt2", gpt2, default_tok_dir)
    run = load_config(run_file(tmp_path, str(source)))
    assert (run.model.positional_embedding.type, run.model.ln_type, run.model.activation_type) == (
        "absolute", "layernorm", "gelu_tanh")
    assert (run.model.dropout_embd, run.model.no_bias, run.model.head_dim) == (0.1, False, 8)
    assert run.derived.model_sources["model.ln_type"] == f"{source} (gpt2 architecture)"
    with pytest.raises(ConfigError, match=r"model.max_seq_len is 64 there but 32 in the config \(config.json: n_po"):
        load_config(run_file(tmp_path, str(source), model={"max_seq_len": 32}))



# ------------------------------------------------------------------------------------------------ end to end

FAMILY_SOURCES = {
    "llama3": tiny_llama,
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.2,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=64, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None)),
}


@pytest.mark.parametrize("family", FAMILY_SOURCES)
def test_fine_tune_from_a_hub_name_exports_in_the_source_architecture(tmp_path, default_tok_dir, hub_cache, family):
    """Hub name -> train (checkpoint) -> resume -> `ironcore export` (default: the source's architecture) -> plain
    AutoModelForCausalLM with the source's config fields and our logits -> generate."""
    torch.manual_seed(0)
    source = checkpoint_dir(tmp_path / "source", FAMILY_SOURCES[family]().eval(), default_tok_dir)
    into_hub_cache(hub_cache, f"tiny-org/{family}", source)
    data = {"train_datasets": [{"dataset_path": "builtin:pretrain", "max_samples": 200}], "cache_dir": str(CACHE)}
    model = {"max_seq_len": 64} if family == "mistral" else {}  # the window (64) covers every trained sequence
    config = run_file(tmp_path, f"tiny-org/{family}", model=model, **data)
    if family == "llama3":  # the whole chain once: checkpoint at step 1, resume to step 2
        train_in_process(load_config(config, ["operation.train_steps=1", "trainer.save_checkpoint_steps=1"]))
        assert (tmp_path / "run" / "checkpoints" / "step_1").is_dir()
    run_dir = train_in_process(load_config(config)).parent
    assert (run_dir / "checkpoints" / "step_2").is_dir()
    out = tmp_path / "native"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    exported = json.loads((out / "config.json").read_text())
    original = json.loads((source / "config.json").read_text())
    for key in ("model_type", "architectures", "rope_parameters", "rms_norm_eps", "tie_word_embeddings",
                "max_position_embeddings", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window"):
        assert exported.get(key) == original.get(key), key
    assert "auto_map" not in exported
    native = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_pretrained(run_dir / "export").eval()
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(native(x).logits, ours(x).logits[..., :VOCAB], atol=1e-5, rtol=0)
    assert not torch.allclose(native(x).logits, FAMILY_SOURCES[family]().eval()(x).logits)  # it did train
    tokenizer = AutoTokenizer.from_pretrained(out)
    generated = native.generate(**tokenizer("def main", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 2


def test_arch_source_of_a_model_dir_is_its_own_and_a_changed_model_is_refused(tmp_path, default_tok_dir):
    torch.manual_seed(0)
    qwen = FAMILY_SOURCES["qwen2"]().eval()
    source = checkpoint_dir(tmp_path / "qwen2", qwen, default_tok_dir)
    assert main(["export", str(source), "--out", str(tmp_path / "out"), "--arch", "source"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    x = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(x).logits, qwen(x).logits,
                               atol=1e-5, rtol=0)
    changed = {**json.loads((source / "config.json").read_text()), "intermediate_size": 64}
    with pytest.raises(CheckpointError, match=r"the source checkpoint: .*model.d_ffn is 64 there but 48 in the config"):
        ironcore_to_source(load_pretrained(source), changed)


def test_a_bf16_checkpoint_becomes_float32_master_weights(tmp_path, default_tok_dir):
    bf16 = tiny_llama().to(torch.bfloat16)
    source = checkpoint_dir(tmp_path / "bf16", bf16, default_tok_dir)
    run = load_config(run_file(tmp_path, str(source)))
    model = build_model(run)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    embed = model.model.embed_tokens.weight
    torch.testing.assert_close(embed[:VOCAB], bf16.model.embed_tokens.weight.float(), atol=0, rtol=0)
    assert model.lm_head.weight is embed  # still tied after the load


# ------------------------------------------------------------------------------------------------ chat template

SOURCE_TEMPLATE = (  # the checkpoint's own: ChatML-like with a different turn header than IronCore's default
    "{%- for message in messages -%}{{- '### ' + message['role'] + ':\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}{{- message['content'] + eos_token -}}{% endgeneration %}"
    "{%- else -%}{{- message['content'] + eos_token -}}{%- endif -%}{{- '\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### assistant:\\n' -}}{%- endif -%}"
)
DATA_TEMPLATE = SOURCE_TEMPLATE.replace("### ", ">> ")  # what a run's data.chat_template sets instead
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


@pytest.mark.parametrize("template_from", ["checkpoint", "data.chat_template"])
def test_sft_export_carries_the_chat_template_and_generation_config_it_trained_with(tmp_path, default_tok_dir,
                                                                                    template_from):
    """SFT from a checkpoint whose tokenizer has a chat template and whose generation_config.json sets stop tokens
    and sampling: the run's export and `ironcore export` (source architecture) carry the template the run trained
    with (the checkpoint's, or data.chat_template when set) and the checkpoint's generation config."""
    from transformers import GenerationConfig

    from ironcore.data import load_tokenizer

    source = checkpoint_dir(tmp_path / "source", tiny_llama(), None)
    tokenizer = AutoTokenizer.from_pretrained(default_tok_dir)
    tokenizer.chat_template = SOURCE_TEMPLATE
    tokenizer.save_pretrained(source)
    stops = [tokenizer.eos_token_id, 5]
    GenerationConfig(eos_token_id=stops, do_sample=True, temperature=0.6, top_p=0.9).save_pretrained(source)
    data = {"task_type": "sft", "seq_length": 64, "cache_dir": str(CACHE),
            "train_datasets": [{"dataset_path": "builtin:sft", "max_samples": 64}],
            **({"chat_template": DATA_TEMPLATE} if template_from == "data.chat_template" else {})}
    run = load_config(run_file(tmp_path, str(source), **data))
    trained = load_tokenizer(run)
    expected = DATA_TEMPLATE if template_from == "data.chat_template" else SOURCE_TEMPLATE
    assert trained.chat_template == expected
    run_dir = train_in_process(run).parent
    out = tmp_path / "native"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    prompt = trained.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(("### assistant:\n", ">> assistant:\n"))
    for export in (run_dir / "export", out):
        loaded = AutoTokenizer.from_pretrained(export)
        assert loaded.chat_template == expected, export
        assert loaded.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == prompt, export
        generation = GenerationConfig.from_pretrained(export)
        assert (generation.eos_token_id, generation.temperature, generation.top_p) == (stops, 0.6, 0.9), export
    native = AutoModelForCausalLM.from_pretrained(out).eval()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    ids = loaded(prompt, return_tensors="pt")
    assert native.generate(**ids, max_new_tokens=3).shape[1] > ids["input_ids"].shape[1]
