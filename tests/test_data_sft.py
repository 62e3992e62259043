"""SFT: golden label masks (default template and a tokenizer's own template), truncation, skipping, packing, padding."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise

import pytest
import torch
from helpers_data import (  # noqa: F401
    CONVERSATION,
    OWN_TEMPLATE,
    chat_rows,
    default_tok_dir_fixture,
    default_tok_fixture,
    make_run,
    own_tok_dir_fixture,
    own_tok_fixture,
    spec,
    trained_runs,
    write_jsonl,
)
from transformers import AutoTokenizer

from ironcore.data import build_eval_loader, build_train_loader, load_tokenizer, prepare_data, sft
from ironcore.data.sft import IGNORE_INDEX, encode_chats, generation_masks, span_masks
from ironcore.data.tokenizer import DEFAULT_CHAT_TEMPLATE
from ironcore.errors import DataError


def golden(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Expected ids / labels built piece by piece: each piece ends at a special token or a newline."""
    ids, labels = [], []
    for text, trained in segments:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def test_default_template_golden_mask(default_tok):
    eos = default_tok.eos_token
    expected = golden(default_tok, [
        (f"<|im_start|>system\nbe nice{eos}\n<|im_start|>user\nWhat is x?{eos}\n<|im_start|>assistant\n", False),
        (f"It is y.{eos}", True),
        (f"\n<|im_start|>user\nAnd z?{eos}\n<|im_start|>assistant\n", False),
        (f" Z is\n z.{eos}", True),
        ("\n", False),
    ])
    (ids, labels), = encode_chats([CONVERSATION], default_tok, DEFAULT_CHAT_TEMPLATE)
    assert (ids, labels) == expected
    decoded = [default_tok.decode(run) for run in trained_runs(ids, labels)]
    assert decoded == [f"It is y.{eos}", f" Z is\n z.{eos}"]


def test_own_template_golden_mask(own_tok):
    bos = own_tok.bos_token
    expected = golden(own_tok, [
        (f"{bos}<|system|>\nbe nice<|end|>\n<|user|>\nWhat is x?<|end|>\n<|assistant|>\n", False),
        ("It is y.<|end|>", True),
        ("\n<|user|>\nAnd z?<|end|>\n<|assistant|>\n", False),
        (" Z is\n z.<|end|>", True),
        ("\n", False),
    ])
    (ids, labels), = encode_chats([CONVERSATION], own_tok, own_tok.chat_template)
    assert (ids, labels) == expected


def test_span_path_agrees_with_generation_blocks(default_tok):
    """Both ways of finding assistant tokens give the same mask on the default template."""
    chats = [CONVERSATION, CONVERSATION[1:3], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]]
    assert span_masks(chats, default_tok, DEFAULT_CHAT_TEMPLATE) == generation_masks(chats, default_tok, DEFAULT_CHAT_TEMPLATE)


def test_load_tokenizer_keeps_own_template_and_fills_default(tmp_path, own_tok_dir, default_tok_dir):
    own = load_tokenizer(make_run(tmp_path, "sft", [], own_tok_dir))
    assert own.chat_template == OWN_TEMPLATE
    custom = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    assert load_tokenizer(make_run(tmp_path, "sft", [], default_tok_dir, chat_template=custom)).chat_template == custom


@pytest.mark.parametrize("tok_fixture", ["default_tok_dir", "own_tok_dir"])
def test_prepared_sft_rows_train_only_assistant(tmp_path, request, tok_fixture):
    tok_dir = request.getfixturevalue(tok_fixture)
    rows = chat_rows(20)
    run = make_run(tmp_path, "sft", [spec(write_jsonl(tmp_path / "chat.jsonl", rows))], tok_dir)
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    end = tokenizer.eos_token if tok_fixture == "default_tok_dir" else "<|end|>"
    for k in range(len(prepared.train)):
        row = prepared.train[k]
        (answer,) = [tokenizer.decode(r) for r in trained_runs(row["input_ids"], row["labels"])]
        assert answer == rows[k]["messages"][1]["content"] + end


def test_prompt_response_columns(tmp_path, default_tok_dir):
    path = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": f"q{i}", "response": f"r{i}"} for i in range(6)])
    run = make_run(tmp_path, "sft", [spec(path)], default_tok_dir)
    tokenizer = load_tokenizer(run)
    row = prepare_data(run, tokenizer).train[3]
    assert tokenizer.decode(row["input_ids"]).startswith("<|im_start|>user\nq3")
    assert [tokenizer.decode(r) for r in trained_runs(row["input_ids"], row["labels"])] == [f"r3{tokenizer.eos_token}"]


def long_and_short(n_long: int = 3, n_short: int = 5) -> list[dict]:
    long = [{"messages": [{"role": "user", "content": "tell"}, {"role": "assistant", "content": "word " * 80}]}] * n_long
    return long + chat_rows(n_short)


@pytest.mark.parametrize("truncation,kept", [("truncate", 8), ("drop", 5)])
def test_truncation_truncates_or_drops_and_counts(tmp_path, default_tok_dir, truncation, kept):
    run = make_run(tmp_path, "sft", [spec(write_jsonl(tmp_path / "c.jsonl", long_and_short()))], default_tok_dir,
                   truncation=truncation)
    prepared = prepare_data(run, load_tokenizer(run))
    assert len(prepared.train) == kept
    assert max(len(ids) for ids in prepared.train["input_ids"]) <= 64
    status = prepared.stats["datasets"]["c"]["status"]
    assert status == ({"ok": 5, "truncated": 3} if truncation == "truncate" else {"ok": 5, "too_long": 3})


def test_unknown_role_and_missing_assistant_are_skipped_and_counted(tmp_path, default_tok_dir, caplog):
    rows = chat_rows(4) + [
        {"messages": [{"role": "narrator", "content": "once"}, {"role": "assistant", "content": "upon"}]},
        {"messages": [{"role": "user", "content": "anyone?"}]},
        {"messages": [{"role": "assistant", "content": "I speak first"}]},
    ]
    run = make_run(tmp_path, "sft", [spec(write_jsonl(tmp_path / "c.jsonl", rows))], default_tok_dir)
    prepared = prepare_data(run, load_tokenizer(run))
    assert len(prepared.train) == 4
    assert prepared.stats["datasets"]["c"]["status"] == {"ok": 4, "bad_role": 1, "no_assistant": 2}
    assert "skipped 1 rows (bad_role), 2 rows (no_assistant)" in caplog.text


def test_empty_answers_are_skipped_and_counted_in_both_row_shapes(tmp_path, own_tok_dir):
    """Null, empty or blank assistant content (messages, or a prompt/response pair): skipped, counted, never trained
    as a bare end-of-turn token; here through a tokenizer's own template (the span path)."""
    user = {"role": "user", "content": "q?"}
    chats = chat_rows(3) + [{"messages": [user, {"role": "assistant", "content": content}]} for content in (None, "", "\t")]
    pairs = [{"prompt": "q?", "response": response} for response in ("r1", "r2", None, "", "  ")]
    run = make_run(tmp_path, "sft", [spec(write_jsonl(tmp_path / "c.jsonl", chats)),
                                     spec(write_jsonl(tmp_path / "p.jsonl", pairs))], own_tok_dir)
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    assert prepared.stats["datasets"]["c"]["status"] == {"ok": 3, "empty_answer": 3}
    assert prepared.stats["datasets"]["p"]["status"] == {"ok": 2, "empty_answer": 3}
    answers = {tokenizer.decode(r) for row in prepared.train for r in trained_runs(row["input_ids"], row["labels"])}
    assert answers == {f"answer {i} is {i * 7}.<|end|>" for i in range(3)} | {"r1<|end|>", "r2<|end|>"}


def test_every_row_skipped_is_an_error(tmp_path, default_tok_dir):
    rows = [{"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}] * 3
    run = make_run(tmp_path, "sft", [spec(write_jsonl(tmp_path / "c.jsonl", rows))], default_tok_dir)
    with pytest.raises(DataError, match=r"'c': no rows of .*c\.jsonl left after filtering \(bad_role: 3\)"):
        prepare_data(run, load_tokenizer(run))
    assert not any(p.name.startswith("c-") for p in (tmp_path / "cache" / "preprocessed").iterdir())


def test_packed_rows_restart_positions_per_sample(tmp_path, default_tok_dir):
    rows = chat_rows(30)
    run = make_run(tmp_path, "sft", [spec(write_jsonl(tmp_path / "c.jsonl", rows))], default_tok_dir, pack_sequences=True)
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    assert len(prepared.train) < 30
    samples, answers = 0, []
    for row in prepared.train:
        assert len(row["input_ids"]) <= 64
        starts = [k for k, p in enumerate(row["position_ids"]) if p == 0]
        assert starts[0] == 0
        bounds = starts + [len(row["input_ids"])]
        for a, b in pairwise(bounds):
            assert row["position_ids"][a:b] == list(range(b - a))
            assert tokenizer.decode(row["input_ids"][a : a + 1]) == "<|im_start|>"
        samples += len(starts)
        answers += [tokenizer.decode(r) for r in trained_runs(row["input_ids"], row["labels"])]
    assert samples == 30
    assert sorted(answers) == sorted(r["messages"][1]["content"] + tokenizer.eos_token for r in rows)
    assert prepared.stats["datasets"]["c"]["splits"]["train"]["samples"] == 30
    batch = next(iter(build_train_loader(prepared.train, run, rank=0, tokenizer=tokenizer)))
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        assert batch["position_ids"][b, :n].tolist() == prepared.train[int(batch["sample_ids"][b])]["position_ids"]


def test_packed_logits_equal_unpacked_logits(tmp_path, default_tok_dir):
    """With the model: each sample's logits inside a packed row equal its logits alone."""
    models = pytest.importorskip("ironcore.models")
    rows = chat_rows(12)
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    packed_run = make_run(tmp_path, "sft", [spec(path)], default_tok_dir, pack_sequences=True, vocab_size=768)
    plain_run = make_run(tmp_path, "sft", [spec(path)], default_tok_dir, vocab_size=768)
    tokenizer = load_tokenizer(packed_run)
    packed = prepare_data(packed_run, tokenizer).train
    plain = {tuple(r["input_ids"]) for r in prepare_data(plain_run, tokenizer).train}
    model_cfg = replace(packed_run.model, d_model=32, d_ffn=64, num_layers=2, num_attention_heads=2, head_dim=16,
                        precision="float32", dropout_embd=0.0, dropout_attn=0.0, dropout_mlp=0.0)
    run = replace(packed_run, model=model_cfg)
    model = models.build_model(run).eval()
    batch = next(iter(build_eval_loader(packed, run, rank=0, max_samples=2, tokenizer=tokenizer)))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        checked = 0
        for b in range(batch["input_ids"].shape[0]):
            positions = batch["position_ids"][b, : int(batch["attention_mask"][b].sum())].tolist()
            starts = [k for k, p in enumerate(positions) if p == 0] + [len(positions)]
            for a, e in pairwise(starts):
                ids = batch["input_ids"][b, a:e]
                assert tuple(ids.tolist()) in plain
                alone = model(input_ids=ids[None]).logits[0]
                torch.testing.assert_close(logits[b, a:e], alone, atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked >= 4


def test_padding_with_eos_keeps_trained_eos(tmp_path, default_tok_dir):
    """pad_token_id -1 pads with EOS; pad positions get label -100, the real trained EOS keeps its label."""
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * (1 + 5 * i)}]}
            for i in range(4)]
    run = make_run(tmp_path, "sft", [spec(write_jsonl(tmp_path / "c.jsonl", rows))], default_tok_dir, pad_to_max_length=True)
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    batch = next(iter(build_eval_loader(prepared.train, run, rank=0, max_samples=None, tokenizer=tokenizer)))
    eos = tokenizer.eos_token_id
    assert batch["input_ids"].shape == (4, 64)
    for b in range(4):
        n = len(prepared.train[b]["input_ids"])
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (64 - n)
        assert (batch["input_ids"][b, n:] == eos).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
        last_trained = int((batch["labels"][b] != IGNORE_INDEX).nonzero().max())
        assert batch["labels"][b, last_trained] == eos and last_trained < n


@pytest.mark.parametrize("pad_to_max_length", [True, False])
@pytest.mark.parametrize("pad_token", ["pad_token_id", "eos_token_id"])
def test_explicit_pad_token_id_pads_with_it_and_keeps_trained_eos(tmp_path, default_tok_dir, default_tok, pad_token,
                                                                   pad_to_max_length):
    """pad_token_id >= 0 (here `<|pad|>`, or the EOS id given explicitly) fills pad positions with that id; labels
    on real tokens are untouched, so every trained EOS keeps its label even when the pad id is the EOS id."""
    pad_id = getattr(default_tok, pad_token)
    assert pad_id >= 0 and (pad_id == default_tok.eos_token_id) == (pad_token == "eos_token_id")
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * (1 + 5 * i)}]}
            for i in range(4)]
    run = make_run(tmp_path, "sft", [spec(write_jsonl(tmp_path / "c.jsonl", rows))], default_tok_dir,
                   pad_to_max_length=pad_to_max_length, pad_token_id=pad_id)
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    batch = next(iter(build_eval_loader(prepared.train, run, rank=0, max_samples=None, tokenizer=tokenizer)))
    lengths = [len(ids) for ids in prepared.train["input_ids"]]
    width = 64 if pad_to_max_length else max(lengths)
    assert batch["input_ids"].shape == (4, width) and min(lengths) < width
    for b in range(4):
        row = prepared.train[int(batch["sample_ids"][b])]
        n = len(row["input_ids"])
        assert batch["input_ids"][b, :n].tolist() == row["input_ids"] and batch["labels"][b, :n].tolist() == row["labels"]
        assert batch["input_ids"][b, n:].tolist() == [pad_id] * (width - n)
        assert batch["labels"][b, n:].tolist() == [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (width - n)
        last_trained = int((batch["labels"][b] != IGNORE_INDEX).nonzero().max())
        assert batch["labels"][b, last_trained] == tokenizer.eos_token_id and last_trained < n


def test_templates_that_reject_rows_or_are_not_prefix_stable(tmp_path, own_tok_dir):
    rows = chat_rows(4) + [{"messages": [{"role": "system", "content": "s"}, *chat_rows(1)[0]["messages"]]}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    no_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + OWN_TEMPLATE
    run = make_run(tmp_path, "sft", [spec(path)], own_tok_dir, chat_template=no_system)
    prepared = prepare_data(run, load_tokenizer(run))
    assert prepared.stats["datasets"]["c"]["status"] == {"ok": 4, "template_error": 1}
    counting = "{{ messages | length }}" + OWN_TEMPLATE
    run = make_run(tmp_path, "sft", [spec(path)], own_tok_dir, chat_template=counting)
    with pytest.raises(DataError, match=r"'c': the chat template renders a conversation's beginning differently"):
        prepare_data(run, load_tokenizer(run))


@pytest.mark.parametrize("pack", [False, True])
def test_rows_are_stored_in_two_bytes_a_token_and_collated_as_int64(tmp_path, default_tok_dir, pack):
    """Issue 16: ids in uint16 and labels in int16 (the built-in vocabulary has 2,048 ids), packed positions in uint16:
    4 bytes a token for ids + labels (+ 2 for positions) plus the per-row list offsets; the batch is int64."""
    run = make_run(tmp_path, "sft", [spec(write_jsonl(tmp_path / "c.jsonl", chat_rows(30)))], default_tok_dir,
                   pack_sequences=pack)
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    types = {name: str(prepared.train.data.column(name).type) for name in prepared.train.column_names}
    expected = {"input_ids": "list<item: uint16>", "labels": "list<item: int16>"}
    assert types == ({**expected, "position_ids": "list<item: uint16>"} if pack else expected)
    info = prepared.stats["datasets"]["c"]
    assert (info["token_dtype"], info["label_dtype"]) == ("uint16", "int16")
    train = info["splits"]["train"]
    per_token, offsets = 6 if pack else 4, 4 * len(types) * (train["rows"] + 1)
    assert per_token * train["tokens"] + offsets < train["bytes"] < per_token * train["tokens"] + offsets + 4096
    batch = next(iter(build_train_loader(prepared.train, run, rank=0, tokenizer=tokenizer)))
    assert {batch[k].dtype for k in ("input_ids", "labels", "position_ids")} == {torch.int64}
    for b, sample in enumerate(batch["sample_ids"].tolist()):
        n = int(batch["attention_mask"][b].sum())
        assert batch["labels"][b, :n].tolist() == prepared.train[sample]["labels"]
        assert (batch["labels"][b, :n] == IGNORE_INDEX).any() and (batch["labels"][b, n:] == IGNORE_INDEX).all()


def test_vocabulary_over_32768_ids_stores_labels_as_int32(tmp_path, default_tok_dir):
    """-100 needs a sign: ids of 32,768 and up no longer fit int16 labels (they still fit uint16 ids)."""
    tokenizer = AutoTokenizer.from_pretrained(str(default_tok_dir))
    tokenizer.add_tokens([f"<y{i}>" for i in range(2**15)])
    big = tmp_path / "big_tok"
    tokenizer.save_pretrained(str(big))
    top = f"<y{2**15 - 1}>"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i} {top}"}]}
            for i in range(8)]
    run = make_run(tmp_path, "sft", [spec(write_jsonl(tmp_path / "c.jsonl", rows))], big, vocab_size=len(tokenizer))
    prepared = prepare_data(run, load_tokenizer(run))
    assert str(prepared.train.data.column("input_ids").type) == "list<item: uint16>"
    assert str(prepared.train.data.column("labels").type) == "list<item: int32>"
    top_id = tokenizer.convert_tokens_to_ids(top)
    assert top_id >= 2**15 and all(top_id in row["labels"] for row in prepared.train)


def test_a_bad_row_found_by_a_worker_process_is_one_error_naming_the_row(tmp_path, default_tok_dir, monkeypatch):
    """With `data.num_workers: 2` the row is read and rejected in a worker; the error crosses back unchanged and no
    entry is left complete."""
    monkeypatch.setattr(sft, "ROWS_PER_TASK", 4)
    rows = chat_rows(12)
    rows[9]["messages"] = "a bare string"
    run = make_run(tmp_path, "sft", [spec(write_jsonl(tmp_path / "c.jsonl", rows))], default_tok_dir, num_workers=2)
    with pytest.raises(DataError, match=r"^data.train_datasets\[0\] 'c' row 9 column 'messages' holds str, expected a list"):
        prepare_data(run, load_tokenizer(run))
    assert not any(p.name.startswith("c-") for p in (tmp_path / "cache" / "preprocessed").iterdir())
