"""Pretrain rows: exact seq_length blocks, documents separated by EOS, optional per-document positions."""

from __future__ import annotations

import itertools
import logging

import datasets
import numpy as np
import pytest
import torch
from helpers_data import (  # noqa: F401
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

from ironcore.data import build_train_loader, load_tokenizer, prepare_data, pretrain
from ironcore.data import prepare as prepare_module

OLD_FEATURE = datasets.List(datasets.Value("int32"))  # cache version 2's pretrain blocks


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


def test_blocks_are_stored_as_uint16_and_loaded_as_int64(tmp_path, default_tok_dir):
    """Issue 16: a vocabulary under 65,536 ids stores 2 bytes a token (fixed-size lists, no offsets); the model
    still gets int64."""
    rows = text_rows(40, words=12)
    run = make_run(tmp_path, "pretrain", [spec(write_jsonl(tmp_path / "t.jsonl", rows))], default_tok_dir, seq_length=48)
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    column = prepared.train.data.column("input_ids")
    assert str(column.type) == "fixed_size_list<item: uint16>[48]"
    info = next(iter(prepared.stats["datasets"].values()))
    assert info["token_dtype"] == "uint16" and info["cache_version"] == prepare_module.CACHE_VERSIONS["pretrain"]
    train = info["splits"]["train"]
    assert 2 * train["tokens"] < train["bytes"] < 2 * train["tokens"] + 1024  # + the Arrow file's schema and footer
    batch = next(iter(build_train_loader(prepared.train, run, rank=0, tokenizer=tokenizer)))
    assert batch["input_ids"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
    assert batch["input_ids"].tolist() == [prepared.train[i]["input_ids"] for i in batch["sample_ids"].tolist()]


def test_vocabulary_over_65536_ids_is_stored_as_uint32(tmp_path, default_tok_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(default_tok_dir))
    tokenizer.add_tokens([f"<x{i}>" for i in range(2**16)])
    big = tmp_path / "big_tok"
    tokenizer.save_pretrained(str(big))
    top = f"<x{2**16 - 1}>"
    rows = [{"text": f"{r['text']} {top}"} for r in text_rows(20, words=12)]
    run = make_run(tmp_path, "pretrain", [spec(write_jsonl(tmp_path / "t.jsonl", rows))], big, seq_length=48,
                   vocab_size=len(tokenizer))
    prepared = prepare_data(run, load_tokenizer(run))
    assert str(prepared.train.data.column("input_ids").type) == "fixed_size_list<item: uint32>[48]"
    top_id = tokenizer.convert_tokens_to_ids(top)
    assert top_id >= 2**16 and top_id in itertools.chain.from_iterable(prepared.train["input_ids"])


def test_cache_of_an_earlier_version_is_rebuilt_with_a_log_line(tmp_path, default_tok_dir, monkeypatch, caplog):
    """An entry of cache version 2 (int32 lists with offsets) is not read: the same inputs build a version-3 entry
    with the same tokens, and the log names the old folder."""
    rows = text_rows(40, words=12)
    run = make_run(tmp_path, "pretrain", [spec(write_jsonl(tmp_path / "t.jsonl", rows))], default_tok_dir, seq_length=48)
    tokenizer = load_tokenizer(run)
    with monkeypatch.context() as old:
        old.setattr(prepare_module, "CACHE_VERSIONS", {"pretrain": 2})
        old.setattr(pretrain, "token_dtype", lambda tok: "int32")
        old.setattr(pretrain, "block_features", lambda dtype, seq: datasets.Features({"input_ids": OLD_FEATURE}))
        before = prepare_data(run, tokenizer)
    assert str(before.train.data.column("input_ids").type) == "list<item: int32>"
    with caplog.at_level(logging.INFO, logger="ironcore.data.prepare"):
        after = prepare_data(run, tokenizer)
    assert str(after.train.data.column("input_ids").type) == "fixed_size_list<item: uint16>[48]"
    assert after.train["input_ids"] == before.train["input_ids"]
    old_dir, new_dir = sorted((tmp_path / "cache" / "preprocessed").glob("t-*"), key=lambda p: p.stat().st_mtime)
    assert (old_dir / "COMPLETE.json").is_file() and (new_dir / "COMPLETE.json").is_file()
    rebuilt = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    assert rebuilt == [f"data.train_datasets[0] 't': rebuilding; {old_dir} was built by cache version 2 "
                       "(this is version 3) and can be deleted"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ironcore.data.prepare"):
        prepare_data(run, tokenizer)
    assert not [r for r in caplog.records if "rebuilding" in r.getMessage()]


@pytest.mark.parametrize("tok_fixture", ["default_tok_dir", "own_tok_dir", "llama_tok_dir"])
@pytest.mark.parametrize("split_special_tokens", [False, True])
def test_fast_encoder_gives_the_ids_of_the_tokenizer_call(request, tok_fixture, split_special_tokens):
    """`encode_batch_fast` on a copy of the backend equals `tokenizer(texts)`: BOS of a LLaMA tokenizer, special-token
    text inside a document (split or not, as the tokenizer says), whatever truncation an earlier call left set."""
    tokenizer = AutoTokenizer.from_pretrained(str(request.getfixturevalue(tok_fixture)),
                                              split_special_tokens=split_special_tokens)
    tokenizer(["an earlier call with truncation"], truncation=True, max_length=2)
    texts = [r["text"] for r in text_rows(6, words=40)] + [f"a {tokenizer.eos_token} b", "", "  ", "x"]
    backend = pretrain.backend_encoder(tokenizer)
    expected = tokenizer(texts)["input_ids"]
    assert [encoding.ids for encoding in backend.encode_batch_fast(texts)] == expected
    eos = tokenizer.eos_token_id
    flat = pretrain._encode(texts, tokenizer=tokenizer, backend=backend, eos_id=eos, dtype="uint16")
    ended = [ids if ids[-1:] == [eos] else ids + [eos] for text, ids in zip(texts, expected, strict=True) if text and ids]
    assert flat.dtype == np.uint16 and flat.tolist() == list(itertools.chain.from_iterable(ended))
    plain = pretrain._encode(texts, tokenizer=tokenizer, backend=None, eos_id=eos, dtype="uint16")
    assert plain.tolist() == flat.tolist()
