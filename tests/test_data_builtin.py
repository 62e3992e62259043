"""The built-in corpus and the shipped data presets: offline quickstarts for all three tasks, Hub presets offline."""

from __future__ import annotations

import pytest
import yaml
from helpers_data import default_tok_dir_fixture, default_tok_fixture, own_tok_dir_fixture, own_tok_fixture, trained_runs  # noqa: F401

from ironcore.config import load_config
from ironcore.data import build_train_loader, builtin_corpus, load_tokenizer, prepare_data
from ironcore.errors import DataError


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the module, so the built-in tokenizer is trained once."""
    return tmp_path_factory.mktemp("builtin_cache")


def run_from_preset(tmp_path, preset: str, cache, model: str = "tiny-gpt2", **data):
    config = {"model": model, "trainer": {"micro_batch_size": 4, "num_workers": 0},
              "data": {"config_path": preset, "cache_dir": str(cache), **data}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    return load_config(tmp_path / "run.yaml", world_size=1)


def test_corpus_is_deterministic_and_shaped_for_each_task():
    texts, chats, pairs = builtin_corpus.pretrain_texts(), builtin_corpus.sft_conversations(), builtin_corpus.dpo_pairs()
    assert len(texts) > 100 and any(t.startswith("Module json\n") for t in texts)
    assert len(chats) == len(pairs) > 1000
    assert any(c[0]["role"] == "system" for c in chats) and any(len(c) >= 4 for c in chats)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert builtin_corpus.dpo_pairs() == pairs and builtin_corpus.sft_conversations() == chats


@pytest.mark.parametrize("task", ["pretrain", "sft", "dpo"])
def test_offline_quickstart_presets(tmp_path, shared_cache, task):
    run = run_from_preset(tmp_path, f"builtin_{task}", shared_cache, seq_length=128)
    assert run.data.train_datasets[0].dataset_path == f"builtin:{task}" and run.model.tokenizer_type == "builtin"
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    assert len(prepared.train) > 500 and len(prepared.eval) > 10
    batch = next(iter(build_train_loader(prepared.train, run, rank=0, tokenizer=tokenizer)))
    assert batch["sample_ids"].shape == (4,)
    row = prepared.train[0]
    if task == "pretrain":
        assert len(row["input_ids"]) == 128
    elif task == "sft":
        answers = trained_runs(row["input_ids"], row["labels"])
        assert answers and tokenizer.decode(row["input_ids"]).startswith("<|im_start|>")
        assert all(tokenizer.decode(a).endswith(tokenizer.eos_token) for a in answers if len(row["input_ids"]) < 128)
    else:
        chosen = tokenizer.decode(trained_runs(row["chosen_input_ids"], row["chosen_labels"])[0])
        rejected = tokenizer.decode(trained_runs(row["rejected_input_ids"], row["rejected_labels"])[0])
        assert chosen != rejected


@pytest.mark.parametrize("preset,name", [("pretrain_example", "roneneldan/TinyStories"),
                                         ("sft_example", "HuggingFaceH4/ultrachat_200k"),
                                         ("dpo_example", "HuggingFaceH4/ultrafeedback_binarized")])
def test_hub_presets_say_the_hub_is_unreachable(tmp_path, shared_cache, preset, name):
    run = run_from_preset(tmp_path, preset, shared_cache)
    assert run.data.train_datasets[0].dataset_path == name
    with pytest.raises(DataError, match=rf"cannot reach the Hub for dataset '{name}'; give a local path"):
        prepare_data(run, load_tokenizer(run))


def test_openwebtext_preset_names_its_tokenizer_and_data(tmp_path, shared_cache):
    run = run_from_preset(tmp_path, "full_owt_pretrain", shared_cache, model="gpt2-small")
    assert run.data.train_datasets[0].dataset_path == "Skylion007/openwebtext" and run.model.vocab_name_or_path == "gpt2"
    with pytest.raises(DataError, match="cannot reach the Hub"):
        prepare_data(run, load_tokenizer(run))
