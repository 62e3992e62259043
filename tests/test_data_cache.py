"""Preprocessing cache: reused without tokenizing, rebuilt on any change, never half-written, safe to share."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import pytest
import torch
from helpers_data import (  # noqa: F401
    chat_rows,
    default_tok_dir_fixture,
    default_tok_fixture,
    make_run,
    own_tok_dir_fixture,
    own_tok_fixture,
    spec,
    text_rows,
    write_jsonl,
)

from ironcore.data import build_train_loader, dpo, load_tokenizer, prepare_data, pretrain, sft
from ironcore.data import prepare as prepare_module
from ironcore.data.cache import MARKER

HELPER = Path(__file__).resolve().parent / "helpers_data.py"
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"


@pytest.fixture()
def calls(monkeypatch) -> dict:
    """Counts of tokenizing passes (any task) and raw-source loads."""
    counts = {"tokenize": 0, "load": 0}

    def counting(key, real):
        def fn(*args, **kwargs):
            counts[key] += 1
            return real(*args, **kwargs)
        return fn

    for module, name in ((sft, "tokenize_sft"), (dpo, "tokenize_dpo"), (pretrain, "tokenize_pretrain")):
        monkeypatch.setattr(module, name, counting("tokenize", getattr(module, name)))
    monkeypatch.setattr(prepare_module, "load_source", counting("load", prepare_module.load_source))
    return counts


def entries(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache" / "preprocessed").iterdir() if not p.name.endswith(".lock"))


def build(run):
    return prepare_data(run, load_tokenizer(run))


def test_second_build_tokenizes_nothing_and_changes_rebuild(tmp_path, default_tok_dir, own_tok_dir, calls):
    data = write_jsonl(tmp_path / "c.jsonl", chat_rows(20))
    run = make_run(tmp_path, "sft", [spec(data)], default_tok_dir, splits=(0.8, 0.2, 0.0))
    first = build(run)
    assert calls["tokenize"] >= 1 and calls["load"] == 1
    calls.update(tokenize=0, load=0)
    again = build(run)
    assert calls == {"tokenize": 0, "load": 0}
    assert again.train["input_ids"] == first.train["input_ids"] and again.eval["labels"] == first.eval["labels"]
    assert build(dataclasses.replace(run, data=dataclasses.replace(run.data, train_datasets=(spec(data, ratio=5),))))
    assert calls == {"tokenize": 0, "load": 0} and len(entries(tmp_path)) == 1
    changes = [
        dataclasses.replace(run, data=dataclasses.replace(run.data, seq_length=48)),
        make_run(tmp_path, "sft", [spec(data)], own_tok_dir, splits=(0.8, 0.2, 0.0)),
        dataclasses.replace(run, data=dataclasses.replace(run.data, chat_template=PLAIN_TEMPLATE)),
    ]
    for n, changed in enumerate(changes, start=2):
        calls.update(tokenize=0, load=0)
        build(changed)
        assert calls["tokenize"] >= 1 and calls["load"] == 1 and len(entries(tmp_path)) == n
    time.sleep(0.01)
    write_jsonl(data, chat_rows(21))
    assert len(build(run).train) + len(build(run).eval) == 21


def test_incomplete_entries_are_rebuilt_not_reused(tmp_path, default_tok_dir, calls):
    run = make_run(tmp_path, "pretrain", [spec(write_jsonl(tmp_path / "t.jsonl", text_rows(30)))], default_tok_dir)
    rows = build(run).train["input_ids"]
    (entry,) = entries(tmp_path)
    (entry / MARKER).unlink()
    stale = entry.parent / f".tmp-{entry.name}-999-dead"
    stale.mkdir()
    (stale / "junk").write_text("half")
    calls.update(tokenize=0, load=0)
    assert build(run).train["input_ids"] == rows
    assert calls["load"] == 1 and (entry / MARKER).is_file() and not stale.exists()


def test_a_failed_build_leaves_nothing_that_looks_complete(tmp_path, default_tok_dir, monkeypatch):
    run = make_run(tmp_path, "pretrain", [spec(write_jsonl(tmp_path / "t.jsonl", text_rows(30)))], default_tok_dir,
                   splits=(0.8, 0.2, 0.0))
    real_save = datasets.Dataset.save_to_disk

    def crash_on_eval(self, path, *args, **kwargs):
        if path.endswith("eval"):
            raise KeyboardInterrupt
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", crash_on_eval)
    with pytest.raises(KeyboardInterrupt):
        build(run)
    assert entries(tmp_path) == []
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", real_save)
    assert len(build(run).eval) > 0 and (entries(tmp_path)[0] / MARKER).is_file()


def test_a_killed_preprocess_is_rebuilt(tmp_path, default_tok_dir):
    data = write_jsonl(tmp_path / "t.jsonl", text_rows(30))
    signal_file = tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": str(HELPER.parent.parent)}
    child = subprocess.Popen([sys.executable, str(HELPER), str(tmp_path), str(default_tok_dir), str(data), str(signal_file)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not signal_file.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert signal_file.exists(), "the child never started tokenizing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    leftovers = entries(tmp_path)
    assert leftovers and all(p.name.startswith(".tmp-") for p in leftovers)
    run = make_run(tmp_path, "pretrain", [spec(data)], default_tok_dir)
    assert len(build(run).train) > 0
    (entry,) = entries(tmp_path)
    assert (entry / MARKER).is_file()


def test_concurrent_callers_build_once(tmp_path, default_tok_dir, calls):
    run = make_run(tmp_path, "pretrain", [spec(write_jsonl(tmp_path / "t.jsonl", text_rows(30)))], default_tok_dir)
    tokenizer = load_tokenizer(run)
    results, errors = [], []

    def rank():
        try:
            results.append(prepare_data(run, tokenizer).train["input_ids"])
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=rank) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and calls["load"] == 1
    assert results[0] == results[1] == results[2]


def test_worker_processes(tmp_path, default_tok_dir, calls, monkeypatch):
    """Neither SFT rows nor pretrain blocks depend on the worker count (blocks are cut from the split's whole token
    stream), so the count is not part of the key: a build with 2 workers reuses one built with 1."""
    data = write_jsonl(tmp_path / "c.jsonl", chat_rows(40))
    one = build(make_run(tmp_path / "one", "sft", [spec(data)], default_tok_dir, pack_sequences=True))
    two = build(make_run(tmp_path / "two", "sft", [spec(data)], default_tok_dir, pack_sequences=True, num_workers=2))
    assert one.train["input_ids"] == two.train["input_ids"] and one.train["labels"] == two.train["labels"]
    pairs = write_jsonl(tmp_path / "d.jsonl", pair_rows(40))
    monkeypatch.setattr(sft, "ROWS_PER_TASK", 8)  # five ranges for the two workers
    one = build(make_run(tmp_path / "one", "dpo", [spec(pairs)], default_tok_dir)).train
    two = build(make_run(tmp_path / "two", "dpo", [spec(pairs)], default_tok_dir, num_workers=2)).train
    assert len(one) == 40 and one.to_dict() == two.to_dict()
    monkeypatch.setattr(pretrain, "CHUNK_BYTES", 500)  # about 20 chunks for the workers to share
    text = write_jsonl(tmp_path / "t.jsonl", text_rows(40))
    one = build(make_run(tmp_path / "one", "pretrain", [spec(text)], default_tok_dir)).train
    two = build(make_run(tmp_path / "two", "pretrain", [spec(text)], default_tok_dir, num_workers=2)).train
    assert len(one) > 0 and one["input_ids"] == two["input_ids"]
    calls.update(load=0, tokenize=0)
    again = build(make_run(tmp_path / "one", "pretrain", [spec(text)], default_tok_dir, num_workers=2)).train
    assert calls == {"load": 0, "tokenize": 0} and again["input_ids"] == one["input_ids"]


def test_num_workers_tokenize_in_that_many_processes(tmp_path, default_tok_dir, monkeypatch):
    """`data.num_workers: 2`: two worker processes (not this one) tokenize, SFT and pretrain alike (one pool,
    `workers.map_ranges`), each with the tokenizer's own threads off."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()

    def recording(real, pause=0.0):
        def batch_fn(*args, **kwargs):
            (pid_dir / f"{real.__module__}-{os.getpid()}").write_text(os.environ.get("TOKENIZERS_PARALLELISM", ""))
            time.sleep(pause)  # a worker that finishes at once could take every chunk before the other starts
            return real(*args, **kwargs)
        return batch_fn

    monkeypatch.setattr(sft, "_sft_batch", recording(sft._sft_batch, pause=0.2))
    monkeypatch.setattr(sft, "ROWS_PER_TASK", 2)
    monkeypatch.setattr(pretrain, "_encode", recording(pretrain._encode, pause=0.2))
    monkeypatch.setattr(pretrain, "CHUNK_BYTES", 300)
    build(make_run(tmp_path, "sft", [spec(write_jsonl(tmp_path / "c.jsonl", chat_rows(8)))], default_tok_dir, num_workers=2))
    build(make_run(tmp_path, "pretrain", [spec(write_jsonl(tmp_path / "t.jsonl", text_rows(8)))], default_tok_dir,
                   num_workers=2))
    for module in ("ironcore.data.sft", "ironcore.data.pretrain"):
        pids = {int(p.name.rpartition("-")[2]) for p in pid_dir.glob(f"{module}-*")}
        assert len(pids) == 2 and os.getpid() not in pids, (module, pids)
    assert {p.read_text() for p in pid_dir.glob("ironcore.data.*")} == {"false"}


def old_sample_features(tokenizer, prefixes=("",)) -> dict:
    """Cache version 3's SFT/DPO columns: int32 ids and labels, whatever the vocabulary."""
    return {f"{p}{c}": datasets.List(datasets.Value("int32")) for p in prefixes for c in ("input_ids", "labels")}


def pair_rows(n: int) -> list[dict]:
    return [{"prompt": f"p{i}?", "chosen": f"good {i} " * (1 + i % 3), "rejected": f"bad {i}"} for i in range(n)]


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_version_3_entries_are_rebuilt_compact_and_batches_are_unchanged(tmp_path, default_tok_dir, monkeypatch,
                                                                         caplog, task):
    """An SFT/DPO entry of cache version 3 (int32 ids and labels) is not read: the same inputs build a version-4
    entry with the log line naming the old folder; it takes half the bytes and collates to the same int64 batches."""
    rows = chat_rows(24) if task == "sft" else pair_rows(24)
    run = make_run(tmp_path, task, [spec(write_jsonl(tmp_path / "c.jsonl", rows))], default_tok_dir)
    tokenizer = load_tokenizer(run)
    with monkeypatch.context() as old:
        old.setattr(prepare_module, "CACHE_VERSIONS", {task: 3})
        old.setattr(sft, "sample_features", old_sample_features)
        old.setattr(dpo, "sample_features", old_sample_features)
        before = prepare_data(run, tokenizer)
    with caplog.at_level(logging.INFO, logger="ironcore.data.prepare"):
        after = prepare_data(run, tokenizer)
    old_dir, new_dir = sorted(entries(tmp_path), key=lambda p: p.stat().st_mtime)
    rebuilt = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    assert rebuilt == [f"data.train_datasets[0] 'c': rebuilding; {old_dir} was built by cache version 3 "
                       "(this is version 4) and can be deleted"]
    assert {str(before.train.data.column(c).type) for c in before.train.column_names} == {"list<item: int32>"}
    assert {str(after.train.data.column(c).type) for c in after.train.column_names} == {"list<item: uint16>",
                                                                                         "list<item: int16>"}
    old_bytes, new_bytes = (before.stats["datasets"]["c"]["splits"]["train"]["bytes"],
                            after.stats["datasets"]["c"]["splits"]["train"]["bytes"])
    assert new_bytes < 0.6 * old_bytes
    loaders = [build_train_loader(p.train, run, rank=0, tokenizer=tokenizer) for p in (before, after)]
    for old_batch, new_batch in itertools.islice(zip(*loaders), 4):
        assert old_batch.keys() == new_batch.keys()
        for key, value in new_batch.items():
            assert value.dtype == torch.int64 and torch.equal(value, old_batch[key]), key
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ironcore.data.prepare"):
        prepare_data(run, tokenizer)
    assert not [r for r in caplog.records if "rebuilding" in r.getMessage()] and (new_dir / MARKER).is_file()
