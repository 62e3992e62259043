"""Pretrain rows: exact seq_length blocks, documents separated by EOS, optional per-document positions."""

from __future__ import annotations

import itertools

from helpers_data import (  # noqa: F401
    default_tok_dir_fixture,
    default_tok_fixture,
    make_run,
    own_tok_dir_fixture,
    own_tok_fixture,
    spec,
    text_rows,
    write_jsonl,
)

from ironcore.data import build_train_loader, load_tokenizer, prepare_data


def test_blocks_are_seq_length_and_documents_end_with_eos(tmp_path, default_tok_dir):
    rows = text_rows(40, words=12)
    run = make_run(tmp_path, "pretrain", [spec(write_jsonl(tmp_path / "t.jsonl", rows))], default_tok_dir, seq_length=48)
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    eos = tokenizer.eos_token_id
    assert all(len(ids) == 48 for ids in prepared.train["input_ids"])
    stream = [tokenizer.encode(r["text"]) + [eos] for r in rows]
    expected = list(itertools.chain.from_iterable(stream))
    got = list(itertools.chain.from_iterable(prepared.train["input_ids"]))
    assert len(got) == len(expected) // 48 * 48
    assert got == expected[: len(got)]
    assert "labels" not in prepared.train.column_names
    batch = next(iter(build_train_loader(prepared.train, run, rank=0, tokenizer=tokenizer)))
    assert batch["input_ids"].shape == (4, 48)
    assert (batch["labels"] == batch["input_ids"]).all() and batch["attention_mask"].all()
    assert batch["position_ids"][0].tolist() == list(range(48))


def test_reset_position_ids_restart_after_each_eos(tmp_path, default_tok_dir):
    rows = text_rows(60, words=2)
    run = make_run(tmp_path, "pretrain", [spec(write_jsonl(tmp_path / "t.jsonl", rows))], default_tok_dir,
                   reset_position_ids=True)
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    batch = next(iter(build_train_loader(prepared.train, run, rank=0, tokenizer=tokenizer)))
    eos = tokenizer.eos_token_id
    for ids, positions in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist(), strict=True):
        expected, p = [], 0
        for token in ids:
            expected.append(p)
            p = 0 if token == eos else p + 1
        assert positions == expected
        assert positions.count(0) == 1 + ids[:-1].count(eos) > 2


def test_split_by_document_before_blocks(tmp_path, default_tok_dir):
    rows = text_rows(100, words=20)
    run = make_run(tmp_path, "pretrain", [spec(write_jsonl(tmp_path / "t.jsonl", rows))], default_tok_dir,
                   splits=(0.8, 0.1, 0.1))
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)

    def docs(ds):
        text = tokenizer.decode(list(itertools.chain.from_iterable(ds["input_ids"])))
        return {part.split(" ")[0] for part in text.split(tokenizer.eos_token) if part.strip()}

    train, evaluation, test = docs(prepared.train), docs(prepared.eval), docs(prepared.test)
    assert evaluation and test and not (train & evaluation) and not (train & test) and not (evaluation & test)
    info = prepared.stats["datasets"]["t"]
    assert info["status"] == {"documents": 100}
    assert info["splits"]["train"]["fill"] == 1.0 and info["splits"]["train"]["trained_ratio"] == 1.0
