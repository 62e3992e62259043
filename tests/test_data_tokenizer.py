"""Tokenizers: `ironcore tokenizer train`, the cached built-in tokenizer, vocabulary checks, loading errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml
from helpers_data import (  # noqa: F401
    chat_rows,
    corpus,
    default_tok_dir_fixture,
    default_tok_fixture,
    llama_tok_dir_fixture,
    make_run,
    own_tok_dir_fixture,
    own_tok_fixture,
    spec,
    text_rows,
    write_jsonl,
)
from transformers import AutoTokenizer

from ironcore.cli import main
from ironcore.config.resolve import resolve
from ironcore.data import load_tokenizer, prepare_data
from ironcore.data import tokenizer as tokenizer_module
from ironcore.data.tokenizer import BUILTIN_VOCAB_SIZE, DEFAULT_CHAT_TEMPLATE, tokenizer_fingerprint
from ironcore.errors import ConfigError, DataError

SAMPLES = ["Grüße aus Köln — naïve café 🎉🚀", "def f(x):\n    return x ** 2  # squares\n", "  leading and\ttabs\r\n"]


def test_trained_tokenizer_reloads_offline_and_round_trips(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("\n".join(SAMPLES * 20 + corpus()[:10]))
    write_jsonl(tmp_path / "b.jsonl", [{"body": f"row {i}: the quick brown fox"} for i in range(50)])
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(out), "--files", str(tmp_path / "a.txt"), "--vocab-size", "600",
                 "--special-token", "<|tool|>"]) == 0
    assert "Trained a byte-level BPE of 600 tokens" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert len(tokenizer) == 600
    for text in SAMPLES + ["unseen: Ωμέγα ∑ 日本語"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert {"<|im_start|>", "<|tool|>"} <= set(tokenizer.all_special_tokens)
    assert len(tokenizer.encode("<|im_start|>")) == 1
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert (out / "chat_template.jinja").is_file()
    assert main(["tokenizer", "train", str(out), "--files", str(tmp_path / "a.txt")]) == 2
    assert "already holds a tokenizer; pass --force" in capsys.readouterr().err
    assert main(["tokenizer", "train", str(tmp_path / "tok2"), "--files", str(tmp_path / "b.jsonl"),
                 "--text-column", "body", "--vocab-size", "300"]) == 0
    assert AutoTokenizer.from_pretrained(str(tmp_path / "tok2")).decode([]) == ""


def test_tokenizer_from_a_configured_dataset(tmp_path, default_tok_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(50))
    config = {"model": {"max_seq_len": 64, "vocab_name_or_path": str(default_tok_dir), "tokenizer_type": "auto"},
              "data": {"task_type": "sft", "vocab_size": 1024, "train_datasets": [{"dataset_path": str(data)}]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["tokenizer", "train", str(tmp_path / "tok"), "--config", str(tmp_path / "run.yaml"), "--vocab-size", "300"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert "answer" in tokenizer.get_vocab() or "Ġanswer" in tokenizer.get_vocab()


def test_builtin_tokenizer_is_trained_once_and_cached(tmp_path, monkeypatch):
    run = make_run(tmp_path, "pretrain", [], "builtin", vocab_size=BUILTIN_VOCAB_SIZE)
    calls = []
    real = tokenizer_module.train_tokenizer
    monkeypatch.setattr(tokenizer_module, "train_tokenizer", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load_tokenizer(run)
    second = load_tokenizer(run)
    assert calls == [1] and len(first) == BUILTIN_VOCAB_SIZE
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second)
    assert first.chat_template == DEFAULT_CHAT_TEMPLATE
    (entry,) = (tmp_path / "cache" / "tokenizers").glob("builtin-*")
    assert json.loads((entry / "COMPLETE.json").read_text())["vocab_size"] == BUILTIN_VOCAB_SIZE


def with_type(run, model_type: str, data_type: str | None = None):
    """`run` re-resolved with these tokenizer types (a data config's wins, as resolution decides)."""
    return resolve(replace(run, model=replace(run.model, tokenizer_type=model_type),
                           data=replace(run.data, tokenizer_type=data_type)))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "auto"])
def test_hub_style_tokenizer_types_load_the_directory_as_autotokenizer_does(tmp_path, default_tok_dir, llama_tok_dir, kind):
    """`gpt2`, `llama` and `auto` all go through AutoTokenizer: the directory's files pick the class, not the type.

    A LLaMA-style tokenizer keeps its BOS on every document and gets EOS appended; the GPT-2-style one adds nothing.
    """
    for tok_dir, class_name, bos_first in ((default_tok_dir, "TokenizersBackend", False),
                                           (llama_tok_dir, "LlamaTokenizer", True)):
        reference = AutoTokenizer.from_pretrained(str(tok_dir))
        tokenizer = load_tokenizer(with_type(make_run(tmp_path, "pretrain", [], tok_dir), kind))
        assert type(tokenizer).__name__ == type(reference).__name__ == class_name
        assert len(tokenizer) == len(reference) and tokenizer.eos_token_id == reference.eos_token_id
        for text in SAMPLES[1:]:
            assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
        assert (tokenizer("def f")["input_ids"][0] == tokenizer.bos_token_id) is bos_first
    docs = text_rows(12, words=8)
    run = with_type(make_run(tmp_path, "pretrain", [spec(write_jsonl(tmp_path / "t.jsonl", docs))], llama_tok_dir), kind)
    tokenizer = load_tokenizer(run)
    stream = [t for doc in docs for t in tokenizer(doc["text"])["input_ids"] + [tokenizer.eos_token_id]]
    blocks = prepare_data(run, tokenizer).train["input_ids"]
    assert len(blocks) == len(stream) // 64 and [t for b in blocks for t in b] == stream[: 64 * len(blocks)]
    assert stream[0] == tokenizer.bos_token_id and stream.count(tokenizer.bos_token_id) == len(docs)


def test_builtin_tokenizer_type_ignores_the_path_and_a_data_config_type_wins(tmp_path, default_tok_dir):
    """`builtin` loads the built-in tokenizer whatever `vocab_name_or_path` says; `data.tokenizer_type` beats the model's."""
    run = make_run(tmp_path, "pretrain", [], default_tok_dir, vocab_size=BUILTIN_VOCAB_SIZE)
    by_model = load_tokenizer(with_type(run, "builtin"))
    by_data = load_tokenizer(with_type(run, "gpt2", "builtin"))
    assert len(by_model) == BUILTIN_VOCAB_SIZE != len(AutoTokenizer.from_pretrained(str(default_tok_dir)))
    assert tokenizer_fingerprint(by_model) == tokenizer_fingerprint(by_data)
    (entry,) = (tmp_path / "cache" / "tokenizers").glob("builtin-*")
    assert tokenizer_fingerprint(by_model) == tokenizer_fingerprint(load_tokenizer(make_run(tmp_path, "pretrain", [], entry,
                                                                                            vocab_size=BUILTIN_VOCAB_SIZE)))
    assert len(load_tokenizer(with_type(run, "builtin", "auto"))) == len(AutoTokenizer.from_pretrained(str(default_tok_dir)))


def test_model_vocabulary_smaller_than_tokenizer_is_a_config_error(tmp_path, default_tok_dir):
    with pytest.raises(ConfigError, match=r"data.vocab_size 700 is smaller than the tokenizer's vocabulary \(768 tokens "
                                          r"of '.*', model.vocab_name_or_path\); set data.vocab_size >= 768"):
        load_tokenizer(make_run(tmp_path, "pretrain", [], default_tok_dir, vocab_size=700))


def test_tokenizer_loading_errors(tmp_path, default_tok_dir):
    with pytest.raises(DataError, match=r"tokenizer directory .*missing_tok \(model.vocab_name_or_path\) does not exist"):
        load_tokenizer(make_run(tmp_path, "pretrain", [], tmp_path / "missing_tok"))
    with pytest.raises(DataError, match=r"tokenizer 'someorg/sometok' .* cannot reach the Hub; give a local path"):
        load_tokenizer(make_run(tmp_path, "pretrain", [], "someorg/sometok"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"empty_dir \(model.vocab_name_or_path\) holds no loadable tokenizer"):
        load_tokenizer(make_run(tmp_path, "pretrain", [], tmp_path / "empty_dir"))
    run = make_run(tmp_path, "pretrain", [], default_tok_dir)
    with pytest.raises(ConfigError, match=r"model.tokenizer_type 'sentencepiece' is not one of gpt2, llama, auto, builtin"):
        load_tokenizer(with_type(run, "sentencepiece"))


def test_fingerprint_follows_the_chat_template(tmp_path, default_tok_dir):
    plain = load_tokenizer(make_run(tmp_path, "sft", [], default_tok_dir))
    custom = load_tokenizer(make_run(tmp_path, "sft", [], default_tok_dir, chat_template="{{ messages[0]['content'] }}"))
    assert tokenizer_fingerprint(plain) == tokenizer_fingerprint(load_tokenizer(make_run(tmp_path, "sft", [], default_tok_dir)))
    assert tokenizer_fingerprint(plain) != tokenizer_fingerprint(custom)
