"""Sources: local formats, folders, globs, save_to_disk, splits, max_samples, eval/test datasets; bad input."""

from __future__ import annotations

import datasets
import pytest
from helpers_data import (  # noqa: F401
    chat_rows,
    default_tok_dir_fixture,
    default_tok_fixture,
    make_run,
    own_tok_dir_fixture,
    own_tok_fixture,
    spec,
    text_rows,
    trained_runs,
    write_jsonl,
)

from ironcore.data import load_tokenizer, prepare_data
from ironcore.data import sources as sources_module
from ironcore.data.sources import load_source
from ironcore.errors import ConfigError, DataError

TEXTS = [f"line {i} says hello" for i in range(12)]


def write_formats(tmp_path) -> dict[str, str]:
    """The same 12 texts in every supported format."""
    frame = datasets.Dataset.from_dict({"text": TEXTS})
    frame.to_json(str(tmp_path / "d.jsonl"))
    frame.to_parquet(str(tmp_path / "d.parquet"))
    frame.to_csv(str(tmp_path / "d.csv"), index=False)
    (tmp_path / "d.txt").write_text("\n".join(TEXTS) + "\n")
    (tmp_path / "d.json").write_text(__import__("json").dumps([{"text": t} for t in TEXTS]))
    frame.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    (tmp_path / "folder").mkdir()
    frame.select(range(6)).to_json(str(tmp_path / "folder" / "a.jsonl"))
    frame.select(range(6, 12)).to_json(str(tmp_path / "folder" / "b.jsonl"))
    return {"jsonl": "d.jsonl", "json": "d.json", "parquet": "d.parquet", "csv": "d.csv", "txt": "d.txt",
            "arrow": str(arrow.relative_to(tmp_path)), "save_to_disk": "saved", "folder": "folder",
            "glob": "folder/*.jsonl"}


def test_every_local_format_loads_the_same_rows(tmp_path):
    for kind, rel in write_formats(tmp_path).items():
        ds = load_source(spec(tmp_path / rel), task="pretrain", cache_dir=str(tmp_path / "hf"), label=kind)
        assert sorted(ds["text"]) == sorted(TEXTS), kind
    three = load_source(spec(tmp_path / "d.parquet", max_samples=3), task="pretrain", cache_dir=None, label="x")
    assert three["text"] == TEXTS[:3]


def test_folder_splits_and_separate_eval_datasets(tmp_path, default_tok_dir):
    write_jsonl(tmp_path / "hub_like" / "train.jsonl", text_rows(30, tag="tr"))
    write_jsonl(tmp_path / "hub_like" / "test.jsonl", text_rows(10, tag="te"))
    run = make_run(tmp_path, "pretrain", [spec(tmp_path / "hub_like", split="train")], default_tok_dir,
                   splits=(0.9, 0.1, 0.0), eval_datasets=(spec(tmp_path / "hub_like", split="test", name="heldout"),))
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    assert "tr" not in tokenizer.decode(prepared.eval[0]["input_ids"]).replace("test", "")
    assert set(prepared.stats["datasets"]) == {"hub_like", "eval:heldout"}
    assert list(prepared.stats["datasets"]["hub_like"]["splits"]) == ["train"]
    assert prepared.test is None


def answers(tokenizer, ds) -> list[str]:
    """The decoded trained spans of every SFT row, sorted."""
    return sorted(tokenizer.decode(r) for row in ds for r in trained_runs(row["input_ids"], row["labels"]))


def expected_answers(tokenizer, rows) -> list[str]:
    return sorted(r["messages"][1]["content"] + tokenizer.eos_token for r in rows)


def test_hub_name_passes_subset_and_split_and_its_rows_are_used(tmp_path, default_tok_dir, monkeypatch):
    """A Hub name goes to `datasets.load_dataset(name, subset, split=...)`; the rows it returns are what is trained."""
    rows = {"en": chat_rows(6), "fr": chat_rows(4, offset=50)}
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(rows[args[1]])

    monkeypatch.setattr(sources_module.datasets, "load_dataset", fake_load_dataset)
    for subset in ("en", "fr"):
        run = make_run(tmp_path, "sft", [spec("someorg/chats", subset=subset, split="validation")], default_tok_dir)
        tokenizer = load_tokenizer(run)
        prepared = prepare_data(run, tokenizer)
        assert calls[-1] == (("someorg/chats", subset), {"split": "validation", "cache_dir": str(tmp_path / "cache" / "datasets")})
        assert answers(tokenizer, prepared.train) == expected_answers(tokenizer, rows[subset])
        assert prepared.stats["datasets"]["chats"]["rows_in"] == len(rows[subset])
    assert len(calls) == 2


def test_separate_test_datasets_become_the_test_split(tmp_path, default_tok_dir):
    """`test_datasets` replace the test split: their rows are the test set, the test share of `splits` stays in train."""
    main, exam, quiz = chat_rows(20), chat_rows(5, offset=100), chat_rows(3, offset=200)
    run = make_run(tmp_path, "sft", [spec(write_jsonl(tmp_path / "main.jsonl", main))], default_tok_dir,
                   splits=(0.8, 0.1, 0.1),
                   test_datasets=(spec(write_jsonl(tmp_path / "exam.jsonl", exam)), spec(write_jsonl(tmp_path / "quiz.jsonl", quiz))))
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    assert answers(tokenizer, prepared.test) == expected_answers(tokenizer, exam + quiz)
    assert (len(prepared.train), len(prepared.eval), prepared.stats["test_rows"]) == (18, 2, 8)
    assert answers(tokenizer, [*prepared.train, *prepared.eval]) == expected_answers(tokenizer, main)
    assert set(prepared.stats["datasets"]) == {"main", "test:exam", "test:quiz"}
    assert list(prepared.stats["datasets"]["main"]["splits"]) == ["train", "eval"]
    assert list(prepared.stats["datasets"]["test:exam"]["splits"]) == ["test"]


def bad(tmp_path, tok, task, specs, **data):
    run = make_run(tmp_path, task, specs, tok, **data)
    return prepare_data(run, load_tokenizer(run))


def test_missing_column_lists_existing_columns(tmp_path, default_tok_dir):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "x", "id": 1}])
    with pytest.raises(DataError, match=r"'t': no column 'text' \(a string \(pretrain text\)\); columns: body, id"):
        bad(tmp_path, default_tok_dir, "pretrain", [spec(path)])
    with pytest.raises(DataError, match=r"no column 'messages' .* and no 'prompt' \+ 'response' columns; columns: body, id"):
        bad(tmp_path, default_tok_dir, "sft", [spec(path)])


def test_column_of_wrong_type(tmp_path, default_tok_dir):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": 5, "messages": "hello"}])
    with pytest.raises(DataError, match=r"column 'text' holds int64, expected a string"):
        bad(tmp_path, default_tok_dir, "pretrain", [spec(path)])
    with pytest.raises(DataError, match=r"column 'messages' holds string, expected a list of \{role, content\} messages"):
        bad(tmp_path, default_tok_dir, "sft", [spec(path)])
    mixed = write_jsonl(tmp_path / "m.jsonl", chat_rows(2) + [{"messages": "not a list"}])
    with pytest.raises(DataError, match=r"'m' row 2 column 'messages' holds str, expected a list of \{role, content\}"):
        bad(tmp_path, default_tok_dir, "sft", [spec(mixed)])


def test_empty_dataset_and_empty_after_filtering(tmp_path, default_tok_dir):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty"):
        bad(tmp_path, default_tok_dir, "pretrain", [spec(tmp_path / "empty.jsonl")])
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "hi"}])
    with pytest.raises(DataError, match=r"'short': no rows left after filtering: .* fewer tokens than one block of 64"):
        bad(tmp_path, default_tok_dir, "pretrain", [spec(short)])


def test_malformed_jsonl_line_names_file_and_line(tmp_path, default_tok_dir):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n')
    with pytest.raises(DataError, match=rf"{path} line 3 is not valid JSON"):
        bad(tmp_path, default_tok_dir, "pretrain", [spec(path)])
    assert not (tmp_path / "cache" / "preprocessed").exists() or not any(
        p.name.startswith("broken-") for p in (tmp_path / "cache" / "preprocessed").iterdir())


def test_hub_name_while_offline(tmp_path, default_tok_dir):
    with pytest.raises(DataError, match=r"cannot reach the Hub for dataset 'someorg/some_corpus'; give a local path"):
        bad(tmp_path, default_tok_dir, "pretrain", [spec("someorg/some_corpus")])


def test_unknown_split_lists_the_splits(tmp_path, default_tok_dir):
    path = write_jsonl(tmp_path / "t.jsonl", text_rows(5))
    with pytest.raises(DataError, match=r"split 'validation' does not exist in .*t.jsonl; available splits: train"):
        bad(tmp_path, default_tok_dir, "pretrain", [spec(path, split="validation")])
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                          "dev": datasets.Dataset.from_dict({"text": ["b"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"split 'test' does not exist in .*dd; available splits: train, dev"):
        bad(tmp_path, default_tok_dir, "pretrain", [spec(tmp_path / "dd", split="test")])


def test_missing_paths_and_config_mistakes(tmp_path, default_tok_dir):
    with pytest.raises(DataError, match=r"dataset file or folder .*nothere.jsonl does not exist"):
        bad(tmp_path, default_tok_dir, "pretrain", [spec(tmp_path / "nothere.jsonl")])
    with pytest.raises(DataError, match=r"no files match .*\*.parquet"):
        bad(tmp_path, default_tok_dir, "pretrain", [spec(tmp_path / "*.parquet")])
    path = write_jsonl(tmp_path / "t.jsonl", text_rows(5))
    with pytest.raises(ConfigError, match="every ratio is 0"):
        bad(tmp_path, default_tok_dir, "pretrain", [spec(path, ratio=0.0)])
    with pytest.raises(ConfigError, match=r"'builtin:chat' is not one of builtin, builtin:pretrain"):
        bad(tmp_path, default_tok_dir, "pretrain", [spec("builtin:chat")])
    with pytest.raises(ConfigError, match=r"several tasks \(data.task_type=pretrain, data.train_datasets\[0\].task_type=sft\)"):
        bad(tmp_path, default_tok_dir, "pretrain", [spec(path, task_type="sft")])
