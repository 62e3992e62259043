"""`ironcore preprocess CONFIG --inspect --preview N` through the real CLI entry point."""

from __future__ import annotations

import logging
import re

import datasets
import pytest
import yaml
from helpers_data import (  # noqa: F401
    chat_rows,
    default_tok_dir_fixture,
    default_tok_fixture,
    own_tok_dir_fixture,
    own_tok_fixture,
    write_jsonl,
)

from ironcore.cli import main
from ironcore.data.sft import IGNORE_INDEX


def write_config(tmp_path, tok_dir, data_file, **data) -> str:
    config = {
        "model": {"max_seq_len": 64, "vocab_name_or_path": str(tok_dir), "tokenizer_type": "auto"},
        "trainer": {"micro_batch_size": 2, "num_workers": 0},
        "data": {"task_type": "sft", "vocab_size": 1024, "cache_dir": str(tmp_path / "cache"), "splits": [0.8, 0.2, 0.0],
                 "train_datasets": [{"name": "chat", "dataset_path": str(data_file)}], **data},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_preprocess_inspect_and_preview(tmp_path, default_tok_dir, capsys):
    rows = chat_rows(20) + [{"messages": [{"role": "user", "content": "alone"}]}]
    config = write_config(tmp_path, default_tok_dir, write_jsonl(tmp_path / "c.jsonl", rows))
    assert main(["preprocess", config, "data.pack_sequences=true", "--inspect", "--preview", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sft: ") and "train rows" in out
    header = next(line for line in out.splitlines() if line.startswith("dataset"))
    assert header.split() == ["dataset", "split", "rows", "skipped", "tokens", "trained", "trained%", "mean", "len",
                              "max", "len", "fill%"]
    chat_train = next(line.split() for line in out.splitlines() if line.startswith("chat ") and " train " in line)
    assert chat_train[3] == "1"
    assert "chat: 21 input rows; ok 20, no_assistant 1" in out
    assert out.count("===== train row") == 2
    assert "⟦answer" in out and "<|endoftext|>⟧" in out and "─── next packed sample ───" in out


def test_preprocess_bad_input_is_one_line_exit_2(tmp_path, default_tok_dir, capsys):
    config = write_config(tmp_path, default_tok_dir, write_jsonl(tmp_path / "c.jsonl", [{"text": "no chats"}]))
    assert main(["preprocess", config]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.train_datasets[0] 'chat': no column 'messages'") and "\n" not in err


def test_inspect_numbers_match_the_preprocessed_data(tmp_path, default_tok_dir, capsys):
    """Every number `--inspect` prints, recomputed from the cache entries on disk (and the documented mixing)."""
    chats = chat_rows(20) + [{"messages": [{"role": "user", "content": "alone"}]}]
    pairs = [{"prompt": f"q{i}", "response": "r" * (1 + 3 * i)} for i in range(10)]
    entries = [{"name": "chat", "dataset_path": str(write_jsonl(tmp_path / "c.jsonl", chats)), "ratio": 3},
               {"name": "pr", "dataset_path": str(write_jsonl(tmp_path / "p.jsonl", pairs)), "ratio": 1}]
    config = write_config(tmp_path, default_tok_dir, None, train_datasets=entries, pack_sequences=True)
    assert main(["preprocess", config, "--inspect"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("dataset ")))
    printed = {(cells[0], cells[1]): cells[2:] for cells in (line.split() for line in lines[header + 1 : header + 5])}
    root = tmp_path / "cache" / "preprocessed"
    splits, expected = {}, {}
    for name, skipped in (("chat", 1), ("pr", 0)):
        (entry,) = root.glob(f"{name}-*")
        for split in ("train", "eval"):
            ds = splits[name, split] = datasets.load_from_disk(str(entry / split))
            lengths = [len(ids) for ids in ds["input_ids"]]
            tokens = sum(lengths)
            trained = sum(label != IGNORE_INDEX for labels in ds["labels"] for label in labels)
            expected[name, split] = [len(ds), skipped, tokens, trained, 100 * trained / tokens, tokens / len(ds),
                                     max(lengths), 100 * tokens / (64 * len(ds))]
    assert printed.keys() == expected.keys()
    for key, cells in printed.items():
        assert [float(c) for c in cells] == pytest.approx(expected[key], abs=0.05), key
    assert sum(expected["chat", s][0] for s in ("train", "eval")) < 20  # packed: fewer rows than samples
    mixture = datasets.interleave_datasets([splits["chat", "train"], splits["pr", "train"]], probabilities=[0.75, 0.25],
                                           seed=1337, stopping_strategy="all_exhausted")  # init.seed's default
    eval_rows = len(splits["chat", "eval"]) + len(splits["pr", "eval"])
    assert lines[0] == f"sft: {len(mixture)} train rows, {eval_rows} eval rows, 0 test rows of 64 tokens at most"
    assert "task sft, seq_length 64; mixture: chat 75.0%, pr 25.0%" in lines
    assert f"train rows {len(mixture)}, eval rows {eval_rows}, test rows 0" in lines
    assert "chat: 21 input rows; ok 20, no_assistant 1" in lines and "pr: 10 input rows; ok 10" in lines


PAIR = {"prompt": "p?", "chosen": "good", "rejected": "bad"}
BAD_ROLE = {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}

# id, task, the dataset file's rows (or raw text; None: no file), fields of its entry, CLI overrides, and the
# error after "error: " ({file}: the data file, {tmp}: the test's directory; both regex-escaped).
BAD_INPUTS = [
    ("missing_column", "pretrain", [{"body": "x", "id": 1}], {}, [],
     r"data\.train_datasets\[0\] 'd': no column 'text' \(a string \(pretrain text\)\); columns: body, id"),
    ("wrong_column_type", "pretrain", [{"text": 5}], {}, [],
     r"data\.train_datasets\[0\] 'd': column 'text' holds int64, expected a string \(pretrain text\)"),
    ("empty_file", "pretrain", "", {}, [], r"data\.train_datasets\[0\] 'd': {file} is empty"),
    ("empty_after_filtering_sft", "sft", [BAD_ROLE] * 3, {}, [],
     r"data\.train_datasets\[0\] 'd': no rows left after filtering \(bad_role: 3\)"),
    ("empty_after_filtering_pretrain", "pretrain", [{"text": "hi"}], {}, ["data.splits=[1.0,0.0,0.0]"],
     r"data\.train_datasets\[0\] 'd': no rows left after filtering: the documents hold fewer tokens than one block of 64"),
    ("malformed_jsonl_line", "pretrain", '{"text": "a"}\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n', {}, [],
     r"data\.train_datasets\[0\] 'd': {file} line 3 is not valid JSON \(.*\)"),
    ("dpo_row_without_chosen", "dpo", [PAIR, {"prompt": "p?", "rejected": "bad"}], {}, [],
     r"data\.train_datasets\[0\] 'd' row 1: no chosen answer \(a DPO pair needs both chosen and rejected\)"),
    ("dpo_row_with_null_chosen", "dpo", [PAIR, PAIR, {"prompt": "p?", "chosen": None, "rejected": "bad"}], {}, [],
     r"data\.train_datasets\[0\] 'd' row 2: no chosen answer \(a DPO pair needs both chosen and rejected\)"),
    ("dpo_row_without_rejected", "dpo", [{"prompt": "p?", "chosen": "good"}, PAIR], {}, [],
     r"data\.train_datasets\[0\] 'd' row 0: no rejected answer \(a DPO pair needs both chosen and rejected\)"),
    ("missing_tokenizer_path", "sft", chat_rows(4), {}, ["model.vocab_name_or_path={tmp}/no_tok"],
     r"tokenizer directory {tmp}/no_tok \(model\.vocab_name_or_path\) does not exist"),
    ("hub_tokenizer_offline", "sft", chat_rows(4), {}, ["model.vocab_name_or_path=someorg/sometok"],
     (r"tokenizer 'someorg/sometok' \(model\.vocab_name_or_path\) is not a local directory and IronCore cannot reach "
      r"the Hub; give a local path")),
    ("hub_dataset_offline", "sft", None, {"dataset_path": "someorg/some_corpus"}, [],
     (r"data\.train_datasets\[0\] 'd': cannot reach the Hub for dataset 'someorg/some_corpus'; give a local path "
      r"\(file, folder or glob\)")),
    ("all_ratios_zero", "sft", chat_rows(4), {"ratio": 0}, [],
     r"data\.train_datasets: every ratio is 0; give at least one dataset a ratio > 0"),
    ("nonexistent_split", "sft", chat_rows(4), {"split": "validation"}, [],
     r"data\.train_datasets\[0\] 'd': split 'validation' does not exist in {file}; available splits: train"),
]


@pytest.mark.parametrize("task,rows,fields,overrides,error", [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_leaves_no_cache_entry(tmp_path, default_tok_dir, capsys, caplog, task, rows,
                                                                fields, overrides, error):
    """One `error: ...` line naming the file, row or column (IronCore logs no warning besides it) and no cache entry."""
    data_file = tmp_path / "d.jsonl"
    if isinstance(rows, str):
        data_file.write_text(rows)
    elif rows is not None:
        write_jsonl(data_file, rows)
    entry = {"name": "d", "dataset_path": str(data_file), **fields}
    config = write_config(tmp_path, default_tok_dir, None, task_type=task, train_datasets=[entry])
    tmp = str(tmp_path)
    assert main(["preprocess", config, *(o.replace("{tmp}", tmp) for o in overrides)]) == 2
    captured = capsys.readouterr()
    assert captured.err.endswith("\n") and captured.err.count("\n") == 1, captured.err
    pattern = error.replace("{file}", re.escape(str(data_file))).replace("{tmp}", re.escape(tmp))
    assert re.fullmatch("error: " + pattern, captured.err.rstrip("\n")), captured.err
    assert [r.getMessage() for r in caplog.records if r.name.startswith("ironcore") and r.levelno >= logging.WARNING] == []
    root = tmp_path / "cache" / "preprocessed"
    left = sorted(p.name for p in root.iterdir()) if root.exists() else []
    assert all(name.startswith(".") and name.endswith(".lock") for name in left), left
