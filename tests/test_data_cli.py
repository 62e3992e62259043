"""`ironcore preprocess CONFIG --inspect --preview N` through the real CLI entry point; every bad input is one line."""

from __future__ import annotations

import gzip
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml
from helpers_data import (  # noqa: F401
    chat_rows,
    default_tok_dir_fixture,
    default_tok_fixture,
    own_tok_dir_fixture,
    own_tok_fixture,
    trained_runs,
    write_jsonl,
)
from transformers import AutoTokenizer

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
CHAT = [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "hello."}]
NULL_REPLY = {"role": "assistant", "content": None}
EMPTY_ANSWER = {"messages": CHAT + [{"role": "user", "content": "and?"}, {"role": "assistant", "content": ""}]}

# id, task, the dataset file's rows (or raw text; None: no file), fields of its entry, CLI overrides, and the
# error after "error: " ({file}: the data file, {tmp}: the test's directory; both regex-escaped).
BAD_INPUTS = [
    ("missing_column", "pretrain", [{"body": "x", "id": 1}], {}, [],
     r"data\.train_datasets\[0\] 'd': no column 'text' \(a string \(pretrain text\)\); columns: body, id"),
    ("wrong_column_type", "pretrain", [{"text": 5}], {}, [],
     r"data\.train_datasets\[0\] 'd': column 'text' holds int64, expected a string \(pretrain text\)"),
    ("empty_file", "pretrain", "", {}, [], r"data\.train_datasets\[0\] 'd': {file} is empty"),
    ("empty_after_filtering_sft", "sft", [BAD_ROLE] * 3, {}, [],
     r"data\.train_datasets\[0\] 'd': no rows of {file} left after filtering \(bad_role: 3\)"),
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
    ("sft_every_answer_empty", "sft", [EMPTY_ANSWER, {**EMPTY_ANSWER, "messages": CHAT[:1] + [NULL_REPLY]}] * 2, {}, [],
     r"data\.train_datasets\[0\] 'd': no rows of {file} left after filtering \(empty_answer: 4\)"),
    ("dpo_every_pair_identical", "dpo", [{"prompt": "p?", "chosen": "same", "rejected": "same"}] * 3, {}, [],
     r"data\.train_datasets\[0\] 'd': no rows of {file} left after filtering \(identical_pair: 3\)"),
    ("vocabulary_larger_than_the_model", "sft", chat_rows(4), {}, ["data.vocab_size=700"],
     (r"data\.vocab_size 700 is smaller than the tokenizer's vocabulary \(768 tokens of '.*', model\.vocab_name_or_path\); "
      r"set data\.vocab_size >= 768 or choose a smaller tokenizer")),
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
    assert_one_error_line(capsys.readouterr().err, error.replace("{file}", re.escape(str(data_file))), tmp_path, caplog)


def assert_one_error_line(err: str, pattern: str, tmp_path, caplog=None) -> None:
    """stderr is exactly `error: <pattern>` ({tmp}: the test's directory), no IronCore warning was logged besides it,
    and the preprocessing cache holds nothing but lock files."""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert re.fullmatch("error: " + pattern.replace("{tmp}", re.escape(str(tmp_path))), err.rstrip("\n")), err
    if caplog is not None:
        assert [r.getMessage() for r in caplog.records if r.name.startswith("ironcore") and r.levelno >= logging.WARNING] == []
    root = tmp_path / "cache" / "preprocessed"
    left = sorted(p.name for p in root.iterdir()) if root.exists() else []
    assert all(name.startswith(".") and name.endswith(".lock") for name in left), left


JSONL = "".join(json.dumps({"text": f"row {i} says hello"}) + "\n" for i in range(20))


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_parquet(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"text": [f"row {i} says hello " * 20 for i in range(40)]}).to_parquet(str(path))
    return path


def cut(path: Path) -> Path:
    """Keep the first half of the file, as an interrupted download or copy does."""
    return write_bytes(path, path.read_bytes()[: path.stat().st_size // 2])


def saved(path: Path) -> Path:
    datasets.Dataset.from_dict({"text": [f"row {i} says hello" for i in range(20)]}).save_to_disk(str(path))
    return path


def glob_with_one_cut_parquet(tmp: Path) -> tuple[str, Path]:
    for k in range(3):
        write_parquet(tmp / "parts" / f"p{k}.parquet")
    return str(tmp / "parts" / "*.parquet"), cut(tmp / "parts" / "p1.parquet")


def saved_with_cut_shard(tmp: Path) -> tuple[Path, Path]:
    folder = saved(tmp / "saved")
    return folder, cut(next(folder.glob("*.arrow")))


def saved_without_state(tmp: Path) -> Path:
    folder = saved(tmp / "saved")
    (folder / "state.json").unlink()
    return folder


def cut_arrow_file(tmp: Path) -> Path:
    shard = next(saved(tmp / "saved").glob("*.arrow"))
    return cut(write_bytes(tmp / "d.arrow", shard.read_bytes()))


NOT_PARQUET = r"{file} cannot be read as parquet \(Parquet magic bytes not found in footer\. .*\)"
# id, a maker of the entry's dataset_path in the test's directory (or of (dataset_path, the file the error names)),
# and the error after "error: data.train_datasets[0] 'd': " ({file}: the named file, regex-escaped).
UNREADABLE = [
    ("jsonl_gz_not_gzip", lambda tmp: write_bytes(tmp / "d.jsonl.gz", JSONL.encode()),
     r"{file} cannot be read as gzip-compressed json \(Not a gzipped file \(b'\{\"'\)\)"),
    ("jsonl_gz_truncated", lambda tmp: write_bytes(tmp / "d.jsonl.gz", gzip.compress(JSONL.encode())[:-12]),
     r"{file} cannot be read as gzip-compressed json \(Compressed file ended before the end-of-stream marker was reached\)"),
    ("parquet_truncated", lambda tmp: cut(write_parquet(tmp / "d.parquet")), NOT_PARQUET),
    ("text_named_parquet", lambda tmp: write_bytes(tmp / "d.parquet", JSONL.encode()), NOT_PARQUET),
    ("one_truncated_parquet_of_a_glob", glob_with_one_cut_parquet, NOT_PARQUET),
    ("arrow_garbage", lambda tmp: write_bytes(tmp / "d.arrow", bytes(range(256)) * 4),
     r"{file} cannot be read as arrow \(Not an Arrow file\)"),
    ("arrow_truncated", cut_arrow_file, r"{file} cannot be read as arrow \(.+\)"),
    ("jsonl_whitespace_only", lambda tmp: write_bytes(tmp / "d.jsonl", b" \n\n\t \n"), r"{file} holds no rows"),
    ("jsonl_not_utf8", lambda tmp: write_bytes(tmp / "d.jsonl", JSONL.encode() + '{"text": "café"}\n'.encode("latin-1")),
     r"{file} line 21 is not UTF-8 text \(byte 0xe9 at column 14\)"),
    ("save_to_disk_without_state", saved_without_state,
     r"{file} is an incomplete save_to_disk folder: it holds dataset_info\.json but no state\.json "
     r"\(write it again with Dataset\.save_to_disk\)"),
    ("save_to_disk_truncated_shard", saved_with_cut_shard, r"{file} cannot be read as arrow \(.+\)"),
]


def unreadable_config(tmp_path, tok_dir, make) -> tuple[str, Path]:
    made = make(tmp_path)
    path, named = made if isinstance(made, tuple) else (made, made)
    entry = {"name": "d", "dataset_path": str(path)}
    return write_config(tmp_path, tok_dir, None, task_type="pretrain", train_datasets=[entry]), named


@pytest.mark.parametrize("make,error", [pytest.param(*case[1:], id=case[0]) for case in UNREADABLE])
def test_unreadable_data_file_is_one_line_naming_it(tmp_path, default_tok_dir, capsys, caplog, make, error):
    """A corrupt, truncated, misnamed, blank, non-UTF-8 or incomplete data file: one line naming that file."""
    config, named = unreadable_config(tmp_path, default_tok_dir, make)
    assert main(["preprocess", config]) == 2
    pattern = r"data\.train_datasets\[0\] 'd': " + error.replace("{file}", re.escape(str(named)))
    assert_one_error_line(capsys.readouterr().err, pattern, tmp_path, caplog)


def test_unreadable_file_is_one_line_on_the_real_stderr(tmp_path, default_tok_dir):
    """datasets logs its own line about a bad parquet file before raising; run as a user runs it, stderr still holds
    IronCore's one line only."""
    config, named = unreadable_config(tmp_path, default_tok_dir, lambda tmp: cut(write_parquet(tmp / "d.parquet")))
    proc = subprocess.run([sys.executable, "-m", "ironcore.cli", "preprocess", config], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    pattern = r"data\.train_datasets\[0\] 'd': " + NOT_PARQUET.replace("{file}", re.escape(str(named)))
    assert_one_error_line(proc.stderr, pattern, tmp_path)


@pytest.mark.parametrize("role,entry,error", [
    ("eval", {"name": "dev", "dataset_path": "{tmp}/nope.jsonl"},
     r"data\.eval_datasets\[0\] 'dev': dataset file or folder {tmp}/nope\.jsonl does not exist"),
    ("test", {"name": "exam", "dataset_path": "{tmp}/held/*.jsonl"},
     r"data\.test_datasets\[0\] 'exam': no files match {tmp}/held/\*\.jsonl"),
    ("test", {"name": "exam", "dataset_path": "{tmp}/exam.docx"},
     r"data\.test_datasets\[0\] 'exam': {tmp}/exam\.docx is not a supported data file \(use .*\)"),
], ids=["eval_file_missing", "test_glob_matches_nothing", "test_file_unsupported"])
def test_a_bad_held_out_entry_is_found_before_anything_is_tokenized(tmp_path, default_tok_dir, capsys, caplog, role,
                                                                     entry, error):
    """Every entry's files are checked first: the training entry is not tokenized (nor cached) for nothing."""
    (tmp_path / "exam.docx").write_bytes(b"PK\x03\x04")
    entry = {k: v.replace("{tmp}", str(tmp_path)) for k, v in entry.items()}
    config = write_config(tmp_path, default_tok_dir, write_jsonl(tmp_path / "c.jsonl", chat_rows(8)),
                          **{f"{role}_datasets": [entry]})
    assert main(["preprocess", config]) == 2
    assert_one_error_line(capsys.readouterr().err, error, tmp_path, caplog)


def test_empty_answers_and_identical_pairs_are_skipped_counted_and_shown(tmp_path, default_tok_dir, capsys, caplog):
    """Never trained (as a bare end-of-turn token, or as a pair with nothing to prefer); logged and shown by --inspect."""
    reply = {"role": "assistant", "content": " \n"}
    chats = chat_rows(6) + [EMPTY_ANSWER, {"messages": CHAT[:1] + [NULL_REPLY]}, {"messages": CHAT[:1] + [reply]}]
    config = write_config(tmp_path, default_tok_dir, write_jsonl(tmp_path / "c.jsonl", chats), splits=[1.0, 0.0, 0.0])
    assert main(["preprocess", config, "--inspect"]) == 0
    out = capsys.readouterr().out
    assert "chat: 9 input rows; ok 6, empty_answer 3" in out
    assert next(line.split() for line in out.splitlines() if line.startswith("chat "))[2:4] == ["6", "3"]
    assert "skipped 3 rows (empty_answer)" in caplog.text
    (entry,) = (tmp_path / "cache" / "preprocessed").glob("chat-*")
    tokenizer = AutoTokenizer.from_pretrained(str(default_tok_dir))
    trained = [tokenizer.decode(run) for row in datasets.load_from_disk(str(entry / "train"))
               for run in trained_runs(row["input_ids"], row["labels"])]
    assert sorted(trained) == sorted(f"answer {i} is {i * 7}.{tokenizer.eos_token}" for i in range(6))

    pairs = [{"prompt": f"p{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    pairs += [{"prompt": "p?", "chosen": "same", "rejected": "same"}] * 2
    config = write_config(tmp_path, default_tok_dir, write_jsonl(tmp_path / "pairs.jsonl", pairs), task_type="dpo",
                          splits=[1.0, 0.0, 0.0], train_datasets=[{"name": "prefs", "dataset_path": str(tmp_path / "pairs.jsonl")}])
    assert main(["preprocess", config, "--inspect"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dpo: 4 train rows") and "prefs: 6 input rows; ok 4, identical_pair 2" in out
    assert "skipped 2 rows (identical_pair)" in caplog.text


def test_inspect_shows_the_stored_token_type_and_bytes_per_token(tmp_path, default_tok_dir, capsys):
    """Issue 16: pretrain blocks of a 768-id vocabulary are uint16; --inspect prints the bytes per token on disk."""
    rows = [{"text": " ".join(f"doc{i} word{j}" for j in range(40))} for i in range(60)]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    config = write_config(tmp_path, default_tok_dir, None, task_type="pretrain",
                          train_datasets=[{"name": "t", "dataset_path": str(data)}])
    assert main(["preprocess", config, "--inspect"]) == 0
    out = capsys.readouterr().out
    (entry,) = (tmp_path / "cache" / "preprocessed").glob("t-*")
    tokens = {split: len(datasets.load_from_disk(str(entry / split))) * 64 for split in ("train", "eval")}
    stored = {split: sum(f.stat().st_size for f in (entry / split).glob("*.arrow")) / tokens[split] for split in tokens}
    assert f"t: tokens stored as uint16; bytes per token on disk: train {stored['train']:.3f}, eval {stored['eval']:.3f}" in out
    assert 2 < stored["train"] < 2.2
