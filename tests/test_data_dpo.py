"""DPO: explicit columns and shared-prefix conversations, labels only on the final answer, pairs in one batch."""

from __future__ import annotations

import pytest
import torch
from helpers_data import (  # noqa: F401
    default_tok_dir_fixture,
    default_tok_fixture,
    make_run,
    own_tok_dir_fixture,
    own_tok_fixture,
    spec,
    trained_runs,
    write_jsonl,
)

from ironcore.data import build_train_loader, load_tokenizer, prepare_data
from ironcore.errors import DataError


def explicit_rows(n: int) -> list[dict]:
    return [{"prompt": f"p{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]


def conversation_rows(n: int) -> list[dict]:
    """ultrafeedback_binarized shape: both sides are full conversations sharing the prompt turns."""
    rows = []
    for i in range(n):
        head = [{"role": "user", "content": f"p{i}?"}, {"role": "assistant", "content": "earlier"},
                {"role": "user", "content": "and now?"}]
        rows.append({"prompt": f"p{i}?", "chosen": head + [{"role": "assistant", "content": f"good {i}"}],
                     "rejected": head + [{"role": "assistant", "content": f"bad {i}"}]})
    return rows


@pytest.mark.parametrize("shape", ["explicit", "conversation"])
def test_labels_only_on_final_answer_and_pairs_share_a_batch(tmp_path, default_tok_dir, shape):
    rows = explicit_rows(12) if shape == "explicit" else conversation_rows(12)
    run = make_run(tmp_path, "dpo", [spec(write_jsonl(tmp_path / "d.jsonl", rows))], default_tok_dir)
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    eos = tokenizer.eos_token
    for k, row in enumerate(prepared.train):
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            answer = f"{'good' if side == 'chosen' else 'bad'} {k}{eos}"
            assert [tokenizer.decode(r) for r in trained_runs(ids, labels)] == [answer]
            assert tokenizer.decode(ids).startswith(f"<|im_start|>user\np{k}?")
        prompt_len = next(k for k, label in enumerate(row["chosen_labels"]) if label != -100)
        assert row["chosen_input_ids"][:prompt_len] == row["rejected_input_ids"][:prompt_len]
    batch = next(iter(build_train_loader(prepared.train, run, rank=0, tokenizer=tokenizer)))
    width = batch["chosen_input_ids"].shape[1]
    for key in ("input_ids", "labels", "attention_mask", "position_ids"):
        assert batch[f"chosen_{key}"].shape == batch[f"rejected_{key}"].shape == (4, width)
    for b, sample in enumerate(batch["sample_ids"].tolist()):
        n = int(batch["chosen_attention_mask"][b].sum())
        assert batch["chosen_input_ids"][b, :n].tolist() == prepared.train[sample]["chosen_input_ids"]
        m = int(batch["rejected_attention_mask"][b].sum())
        assert batch["rejected_input_ids"][b, :m].tolist() == prepared.train[sample]["rejected_input_ids"]


def test_row_without_rejected_is_an_error_naming_the_row(tmp_path, default_tok_dir):
    rows = explicit_rows(5)
    rows[3]["rejected"] = None
    run = make_run(tmp_path, "dpo", [spec(write_jsonl(tmp_path / "d.jsonl", rows))], default_tok_dir)
    with pytest.raises(DataError, match=r"data.train_datasets\[0\] 'd' row 3: no rejected answer"):
        prepare_data(run, load_tokenizer(run))
    assert not any(p.name.startswith("d-") for p in (tmp_path / "cache" / "preprocessed").iterdir())


def test_missing_chosen_column_lists_columns(tmp_path, default_tok_dir):
    rows = [{"prompt": "p", "good": "a", "rejected": "b"}]
    run = make_run(tmp_path, "dpo", [spec(write_jsonl(tmp_path / "d.jsonl", rows))], default_tok_dir)
    with pytest.raises(DataError, match=r"no column 'chosen' .*; columns: prompt, good, rejected"):
        prepare_data(run, load_tokenizer(run))


def test_pairs_with_different_prompts_are_skipped_and_counted(tmp_path, default_tok_dir):
    rows = conversation_rows(4)
    rows[1]["rejected"][0] = {"role": "user", "content": "another prompt"}
    run = make_run(tmp_path, "dpo", [spec(write_jsonl(tmp_path / "d.jsonl", rows))], default_tok_dir)
    prepared = prepare_data(run, load_tokenizer(run))
    assert len(prepared.train) == 3
    assert prepared.stats["datasets"]["d"]["status"] == {"ok": 3, "bad_pair": 1}


def test_pairs_with_the_same_tokens_on_both_sides_are_skipped_and_counted(tmp_path, default_tok_dir):
    """Chosen equal to rejected (either row shape), or equal once truncated to seq_length: no preference to learn."""
    rows = conversation_rows(4)
    rows[2]["rejected"] = rows[2]["chosen"]
    long = {"prompt": "p?", "chosen": "same " * 80 + "yes", "rejected": "same " * 80 + "no"}
    explicit = explicit_rows(3) + [{"prompt": "p?", "chosen": "tie", "rejected": "tie"}, long]
    run = make_run(tmp_path, "dpo", [spec(write_jsonl(tmp_path / "c.jsonl", rows)),
                                     spec(write_jsonl(tmp_path / "e.jsonl", explicit))], default_tok_dir)
    prepared = prepare_data(run, load_tokenizer(run))
    assert prepared.stats["datasets"]["c"]["status"] == {"ok": 3, "identical_pair": 1}
    assert prepared.stats["datasets"]["e"]["status"] == {"ok": 3, "identical_pair": 2}
    assert all(row["chosen_input_ids"] != row["rejected_input_ids"] for row in prepared.train)
    dropped = make_run(tmp_path, "dpo", [spec(tmp_path / "e.jsonl")], default_tok_dir, truncation="drop")
    status = prepare_data(dropped, load_tokenizer(dropped)).stats["datasets"]["e"]["status"]
    assert status == {"ok": 3, "too_long": 1, "identical_pair": 1}


def test_conversation_whose_last_answer_is_empty_is_an_error_naming_the_row(tmp_path, default_tok_dir):
    rows = conversation_rows(3)
    rows[1]["chosen"][-1] = {"role": "assistant", "content": None}
    run = make_run(tmp_path, "dpo", [spec(write_jsonl(tmp_path / "d.jsonl", rows))], default_tok_dir)
    with pytest.raises(DataError, match=r"data.train_datasets\[0\] 'd' row 1: no chosen answer \(its last message is empty"):
        prepare_data(run, load_tokenizer(run))
    assert not any(p.name.startswith("d-") for p in (tmp_path / "cache" / "preprocessed").iterdir())


def test_both_sides_are_stored_in_two_bytes_a_token_and_collated_as_int64(tmp_path, default_tok_dir):
    """Issue 16: each side's ids in uint16 and labels in int16 (4 bytes a token, plus list offsets); the batch is int64."""
    run = make_run(tmp_path, "dpo", [spec(write_jsonl(tmp_path / "d.jsonl", conversation_rows(12)))], default_tok_dir)
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    types = {name: str(prepared.train.data.column(name).type) for name in prepared.train.column_names}
    assert types == {f"{side}_{column}": f"list<item: {dtype}>" for side in ("chosen", "rejected")
                     for column, dtype in (("input_ids", "uint16"), ("labels", "int16"))}
    train = prepared.stats["datasets"]["d"]["splits"]["train"]
    tokens, offsets = train["chosen"]["tokens"] + train["rejected"]["tokens"], 4 * 4 * (train["rows"] + 1)
    assert 4 * tokens + offsets < train["bytes"] < 4 * tokens + offsets + 4096
    batch = next(iter(build_train_loader(prepared.train, run, rank=0, tokenizer=tokenizer)))
    assert {v.dtype for v in batch.values()} == {torch.int64}
    for b, sample in enumerate(batch["sample_ids"].tolist()):
        n = int(batch["rejected_attention_mask"][b].sum())
        assert batch["rejected_labels"][b, :n].tolist() == prepared.train[sample]["rejected_labels"]
