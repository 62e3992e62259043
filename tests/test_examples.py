"""The Hub fine-tuning examples (examples/smollm2_sft.yaml, smollm2_dpo.yaml) as a user runs them, offline: a
checkpoint with SmolLM2-135M's config.json fields (scaled down) and a tokenizer with a chat template sit in a local
HF cache under the name `HuggingFaceTB/SmolLM2-135M`, in the Hub's own layout (test_models_hub's helpers).

Resolving the config reads only the checkpoint's config.json: the model group comes from it and the Hub datasets
are not touched (HF_DATASETS_OFFLINE is set, so a download would fail). Training then swaps the data entries for
local files with the datasets' own columns and runs 2 steps to an export that plain transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_data import VOCAB, default_tok_dir_fixture, write_jsonl  # noqa: F401
from helpers_hub import checkpoint_dir, hub_cache_fixture, into_hub_cache  # noqa: F401
from helpers_train import REPO, read_metrics, train_in_process
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ironcore.cli import main
from ironcore.config import load_config

HUB_NAME = "HuggingFaceTB/SmolLM2-135M"
# SmolLM2-135M's config.json (576 hidden, 1536 MLP, 30 layers, 9 heads over 3 KV heads of 64, theta 100000, tied
# head, 8192 positions, bf16 weights) at a 1/12 width that keeps its ratios: 3 heads over 1 KV head of 16.
SMOLLM2_SHAPE = {"hidden_size": 48, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 3,
                 "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                 "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}
EXAMPLES = {  # example -> (task, the Hub datasets of its data preset: (entry group, name, split))
    "smollm2_sft": ("sft", [("train_datasets", "HuggingFaceH4/ultrachat_200k", "train_sft"),
                            ("eval_datasets", "HuggingFaceH4/ultrachat_200k", "test_sft")]),
    "smollm2_dpo": ("dpo", [("train_datasets", "HuggingFaceH4/ultrafeedback_binarized", "train_prefs"),
                            ("eval_datasets", "HuggingFaceH4/ultrafeedback_binarized", "test_prefs")]),
}


@pytest.fixture(name="smollm2_snapshot")
def smollm2_snapshot_fixture(tmp_path, default_tok_dir, hub_cache) -> Path:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, initializer_range=0.2,
                                         **SMOLLM2_SHAPE)).to(torch.bfloat16)
    return into_hub_cache(hub_cache, HUB_NAME, checkpoint_dir(tmp_path / "smollm2", model, default_tok_dir))


def ultrachat_rows(n: int) -> list[dict]:
    """Rows with ultrachat_200k's columns: prompt, prompt_id, messages (the prompt's user turn, then the answers)."""
    return [{"prompt": f"What does function{i} return?", "prompt_id": f"{i:064x}", "messages": [
        {"role": "user", "content": f"What does function{i} return?"},
        {"role": "assistant", "content": f"It returns the value {i * 7} of its argument."},
        {"role": "user", "content": "And when it fails?"},
        {"role": "assistant", "content": f"It raises ValueError number {i}."},
    ]} for i in range(n)]


def ultrafeedback_rows(n: int) -> list[dict]:
    """Rows with ultrafeedback_binarized's columns: `prompt` a string, `chosen` / `rejected` conversations that
    repeat the prompt's user turn, `messages` (= chosen) and the two scores."""
    rows = []
    for i in range(n):
        user = {"role": "user", "content": f"Explain module{i}."}
        chosen = [user, {"role": "assistant", "content": f"module{i} reads files and returns their lines."}]
        rejected = [user, {"role": "assistant", "content": f"lines their returns and files reads module{i}."}]
        rows.append({"prompt": user["content"], "prompt_id": f"{i:064x}", "chosen": chosen, "rejected": rejected,
                     "messages": chosen, "score_chosen": 8.0, "score_rejected": 3.0})
    return rows


@pytest.mark.parametrize("example", EXAMPLES)
def test_hub_example_resolves_offline_with_the_model_group_from_the_checkpoint(tmp_path, smollm2_snapshot, example):
    run = load_config(REPO / "examples" / f"{example}.yaml", [f"data.cache_dir={tmp_path / 'cache'}"])
    assert run.init.from_pretrained == HUB_NAME
    m, pe = run.model, run.model.positional_embedding
    assert (m.d_model, m.d_ffn, m.num_layers, m.num_attention_heads, m.num_attention_groups, m.head_dim) == (
        48, 128, 2, 3, 1, 16)
    assert (m.ln_type, m.activation_type, m.no_bias, m.untie_embed, m.max_seq_len, pe.type, pe.base) == (
        "rmsnorm", "swiglu", True, False, 8192, "rope", 100000.0)
    assert run.derived.model_sources["model.d_model"] == f"{HUB_NAME} (config.json: hidden_size)"
    assert m.precision == "bfloat16"  # the example's own training field, beside the derived ones
    assert run.data.vocab_size == VOCAB and m.vocab_name_or_path == str(smollm2_snapshot)  # its own tokenizer
    task, hub_entries = EXAMPLES[example]
    assert run.data.task_type == task
    entries = [(group, e.dataset_path, e.split) for group in ("train_datasets", "eval_datasets")
               for e in getattr(run.data, group)]
    assert entries == hub_entries
    assert not (tmp_path / "cache").exists()  # nothing was downloaded or tokenized to resolve the config


@pytest.mark.parametrize("example", EXAMPLES)
def test_hub_example_trains_two_steps_to_an_export_transformers_loads(tmp_path, smollm2_snapshot, example):
    """The example with its Hub datasets swapped for local files of the same columns, at a CPU-sized batch."""
    task, _ = EXAMPLES[example]
    rows = ultrachat_rows(24) if task == "sft" else ultrafeedback_rows(24)
    train_file = write_jsonl(tmp_path / "data" / "train.jsonl", rows[:16])
    eval_file = write_jsonl(tmp_path / "data" / "test.jsonl", rows[16:])
    entries = {"train_datasets": [{"dataset_path": str(train_file)}],
               "eval_datasets": [{"dataset_path": str(eval_file)}]}
    overrides = [f"data.{group}={json.dumps(value)}" for group, value in entries.items()] + [
        f"trainer.model_path={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_length=64",
        "data.num_workers=1", "trainer.micro_batch_size=2", "trainer.gradient_accumulation_steps=1",
        "trainer.num_workers=0", "trainer.log_interval=1", "trainer.save_checkpoint_steps=2",
        "operation.train_steps=2", "operation.eval_interval=2", "operation.eval_samples=8", "optim.warmup_steps=1",
    ]
    run_dir = train_in_process(load_config(REPO / "examples" / f"{example}.yaml", overrides)).parent
    records = read_metrics(run_dir)
    assert max(r["step"] for r in records) == 2 and any("eval/loss" in r for r in records)
    export = tmp_path / "native"
    assert main(["export", str(run_dir), "--out", str(export)]) == 0  # default: the source's architecture
    assert json.loads((export / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Explain module1."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4
