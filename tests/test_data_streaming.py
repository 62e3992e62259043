"""Streaming datasets: the same samples as the cached path, ratios, disjoint worker and rank shards, exact resume
(in process with 2 workers; launched with 2 ranks x 2 workers, SIGKILLed and relaunched), bad inputs."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from dataclasses import replace

import datasets
import httpx
import pytest
import torch
from transformers import AutoTokenizer
from helpers_dist import (BASELINE, DROPOUT, assert_bitwise_equal, launch_state, read_jsonl, run, run_until_signal,
                          shared_run)
from helpers_data import (
    chat_rows,
    default_tok_dir_fixture,  # noqa: F401
    default_tok_fixture,  # noqa: F401
    make_run,
    spec,
    text_rows,
    write_jsonl,
)
from helpers_train import generate_in_plain_transformers

from ironcore.config.resolve import resolve
from ironcore.data import prepare_data
from ironcore.data.cli import preprocess
from ironcore.data.loader import build_train_loader
from ironcore.data.streaming import SampleStream
from ironcore.errors import ConfigError, DataError
from ironcore.models import load_pretrained


def shards(tmp_path, n_files: int, rows: int, *, tag: str = "doc", words: int = 30):
    """`n_files` jsonl files of `rows` documents each, every document marked `<tag><global index> ...`."""
    folder = tmp_path / f"{tag}-shards"
    for k in range(n_files):
        docs = text_rows(rows * n_files, words=words, tag=tag)[k * rows : (k + 1) * rows]
        write_jsonl(folder / f"part-{k}.jsonl", docs)
    return folder


def batches(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


def test_stream_gives_the_cached_blocks_in_order(tmp_path, default_tok_dir, default_tok):
    data = write_jsonl(tmp_path / "docs.jsonl", text_rows(40))
    cached = prepare_data(make_run(tmp_path, "pretrain", [spec(data)], default_tok_dir), default_tok).train
    built = sorted((tmp_path / "cache" / "preprocessed").iterdir())
    streamed = prepare_data(make_run(tmp_path, "pretrain", [spec(data, streaming=True)], default_tok_dir), default_tok)
    assert sorted((tmp_path / "cache" / "preprocessed").iterdir()) == built  # nothing cached for the stream
    stream = SampleStream(streamed.train, rank=0, world_size=1, num_workers=0)
    blocks = [s["input_ids"] for s in itertools.islice(iter(stream), len(cached) + 1)]
    assert blocks[: len(cached)] == cached["input_ids"]
    assert blocks[len(cached)] == cached["input_ids"][0]  # the next epoch starts over, the tail block dropped as cached


def test_group_streaming_is_the_default_an_entry_overrides(tmp_path, default_tok_dir):
    run = make_run(tmp_path, "pretrain", [spec("a.jsonl"), spec("b.jsonl", streaming=False)], default_tok_dir,
                   streaming=True)
    assert [s.streaming for s in run.data.train_datasets] == [True, False]


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_stream_gives_the_cached_samples(tmp_path, default_tok_dir, default_tok, task):
    if task == "sft":
        rows = chat_rows(12) + [{"messages": [{"role": "user", "content": "no answer"}]}]
    else:
        rows = [{"prompt": f"q{i}?", "chosen": f"yes {i}", "rejected": f"no {i * 3}"} for i in range(12)]
    data = write_jsonl(tmp_path / f"{task}.jsonl", rows)
    cached = prepare_data(make_run(tmp_path, task, [spec(data)], default_tok_dir), default_tok).train
    streamed = prepare_data(make_run(tmp_path, task, [spec(data, streaming=True)], default_tok_dir), default_tok)
    samples = list(itertools.islice(iter(SampleStream(streamed.train, rank=0, world_size=1, num_workers=0)), len(cached)))
    for column in cached.column_names:
        assert [s[column] for s in samples] == cached[column], column


def test_two_workers_read_disjoint_shards_and_resume_exactly(tmp_path, default_tok_dir, default_tok):
    folder = shards(tmp_path, 4, 40, words=4)  # 160 documents of ~33 tokens: 10 batches (2,560 tokens) stay in epoch 0
    run = make_run(tmp_path, "pretrain", [spec(folder, streaming=True)], default_tok_dir, loader_workers=2)
    data = prepare_data(run, default_tok)
    loader = build_train_loader(data.train, run, rank=0, tokenizer=default_tok)
    stream = iter(loader)
    first = list(itertools.islice(stream, 4))
    state = json.loads(json.dumps(loader.state_dict()))  # what the checkpoint stores
    rest = list(itertools.islice(stream, 6))
    resumed = build_train_loader(data.train, run, rank=0, tokenizer=default_tok)
    resumed.load_state_dict(state)
    again = batches(resumed, 6)
    for a, b in zip(rest, again, strict=True):
        assert a["input_ids"].equal(b["input_ids"]) and a["sample_ids"].equal(b["sample_ids"])
    # within the epoch no document is read twice, and both workers' shards (files 0, 2 and 1, 3) are read
    text = [default_tok.decode(row) for b in first + rest for row in b["input_ids"]]
    seen = Counter(int(m) for t in text for m in re.findall(r"doc(\d+) word0 ", t))
    assert max(seen.values()) == 1 and len(seen) >= 70
    assert {doc // 40 for doc in seen} == {0, 1, 2, 3}
    ids = [i for b in first + rest for i in b["sample_ids"].tolist()]
    assert len(set(ids)) == len(ids)


def test_stream_and_cached_mix_by_ratio(tmp_path, default_tok_dir, default_tok):
    streamed = shards(tmp_path, 2, 60, tag="alpha", words=8)
    cached = write_jsonl(tmp_path / "beta.jsonl", text_rows(60, tag="beta", words=8))
    run = make_run(tmp_path, "pretrain", [spec(streamed, streaming=True, ratio=3), spec(cached, ratio=1)],
                   default_tok_dir)
    stream = SampleStream(prepare_data(run, default_tok).train, rank=0, world_size=1, num_workers=0)
    sources = Counter()
    for sample in itertools.islice(iter(stream), 2000):
        text = default_tok.decode(sample["input_ids"])
        sources["alpha" if "alpha" in text else "beta"] += 1
        assert ("alpha" in text) != ("beta" in text)  # a block comes from one entry
    assert sources["alpha"] / 2000 == pytest.approx(0.75, abs=0.03)


def test_resume_refuses_another_dataset_list(tmp_path, default_tok_dir, default_tok):
    a, b = shards(tmp_path, 2, 5, tag="a"), shards(tmp_path, 2, 5, tag="b")
    run = make_run(tmp_path, "pretrain", [spec(a, streaming=True)], default_tok_dir)
    loader = build_train_loader(prepare_data(run, default_tok).train, run, rank=0, tokenizer=default_tok)
    batches(loader, 1)
    other = make_run(tmp_path, "pretrain", [spec(b, streaming=True)], default_tok_dir)
    changed = build_train_loader(prepare_data(other, default_tok).train, other, rank=0, tokenizer=default_tok)
    with pytest.raises(DataError, match=r"another dataset list: it has a-shards .* this run has b-shards"):
        changed.load_state_dict(loader.state_dict())
    cached = make_run(tmp_path, "pretrain", [spec(a)], default_tok_dir)
    cached_loader = build_train_loader(prepare_data(cached, default_tok).train, cached, rank=0, tokenizer=default_tok)
    with pytest.raises(DataError, match=r"for the streams a-shards .* but this run reads cached datasets only"):
        cached_loader.load_state_dict(loader.state_dict())
    with pytest.raises(DataError, match=r"is for cached datasets, but this run streams a-shards"):
        loader.load_state_dict(cached_loader.state_dict())


@pytest.mark.parametrize(("task", "missing"), [("pretrain", "no column 'text'"), ("sft", "no column 'messages'"),
                                              ("dpo", "no column 'chosen'")])
def test_missing_column_is_found_on_the_first_row(tmp_path, default_tok_dir, default_tok, task, missing):
    data = write_jsonl(tmp_path / "body.jsonl", [{"body": "some text"}] * 4)
    run = make_run(tmp_path, task, [spec(data, streaming=True)], default_tok_dir)
    with pytest.raises(DataError, match=rf"data.train_datasets\[0\] 'body': {missing}.*columns: body"):
        prepare_data(run, default_tok)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_without_text_is_refused(tmp_path, default_tok_dir, default_tok, workers):
    for k in range(2):
        write_jsonl(tmp_path / "empty" / f"part-{k}.jsonl", [{"text": ""}] * 4)
    run = make_run(tmp_path, "pretrain", [spec(tmp_path / "empty", streaming=True)], default_tok_dir,
                   loader_workers=workers)
    loader = build_train_loader(prepare_data(run, default_tok).train, run, rank=0, tokenizer=default_tok)
    with pytest.raises(DataError) as raised:  # raised in a worker, it is still one line
        batches(loader, 1)
    assert re.fullmatch(r"data.train_datasets\[0\] 'empty': the stream yields no text: .*", str(raised.value))


def test_too_few_shards_for_the_workers_is_refused(tmp_path, default_tok_dir, default_tok):
    data = write_jsonl(tmp_path / "one.jsonl", text_rows(10))
    run = make_run(tmp_path, "pretrain", [spec(data, streaming=True)], default_tok_dir, loader_workers=2)
    with pytest.raises(DataError, match=r"'one': 1 shard\(s\) give 1 per rank, fewer than trainer.num_workers=2"):
        build_train_loader(prepare_data(run, default_tok).train, run, rank=0, tokenizer=default_tok)


def test_streaming_eval_needs_an_end(tmp_path, default_tok_dir):
    run = make_run(tmp_path, "pretrain", [spec("x.jsonl")], default_tok_dir)
    hub = replace(run.data, eval_datasets=(spec("someone/corpus", streaming=True),))
    with pytest.raises(ConfigError, match=r"data.eval_datasets\[0\].max_samples: .*has no end"):
        resolve(replace(run, data=hub))
    resolve(replace(run, data=replace(hub, eval_datasets=(spec("someone/corpus", streaming=True, max_samples=8),))))


def test_streaming_eval_is_the_first_documents(tmp_path, default_tok_dir, default_tok):
    train, held = write_jsonl(tmp_path / "t.jsonl", text_rows(20)), write_jsonl(tmp_path / "e.jsonl", text_rows(30))
    run = make_run(tmp_path, "pretrain", [spec(train)], default_tok_dir,
                   eval_datasets=(spec(held, streaming=True, max_samples=10),))
    streamed = prepare_data(run, default_tok).eval
    first = prepare_data(make_run(tmp_path, "pretrain", [spec(held, max_samples=10)], default_tok_dir), default_tok)
    assert streamed["input_ids"] == first.train["input_ids"]


class _FlakyRead:
    """A file whose reads raise httpx.ConnectError (what a dropped Hub connection raises) `failures` times."""

    def __init__(self, fh, budget: dict):
        self.fh, self.budget = fh, budget

    def read(self, *args):
        if self.budget["failures"] > 0:
            self.budget["failures"] -= 1
            raise httpx.ConnectError("connection reset by peer")
        return self.fh.read(*args)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _flaky_shard(monkeypatch, name: str, budget: dict) -> None:
    """The json reader's `open` of the streaming shard `name` becomes a flaky one: only the network is mocked."""
    from datasets.packaged_modules.json import json as json_module

    real = open

    def flaky_open(path, *args, **kwargs):
        fh = real(path, *args, **kwargs)
        return _FlakyRead(fh, budget) if str(path).endswith(name) else fh

    monkeypatch.setattr(json_module, "open", flaky_open, raising=False)
    monkeypatch.setattr("ironcore.data.streaming.RETRY_SECONDS", 0.0)


def test_network_errors_are_retried_then_one_line(tmp_path, default_tok_dir, default_tok, monkeypatch):
    folder = shards(tmp_path, 2, 10)
    run = make_run(tmp_path, "pretrain", [spec(folder, streaming=True)], default_tok_dir)
    data = prepare_data(run, default_tok)
    reference = batches(build_train_loader(data.train, run, rank=0, tokenizer=default_tok), 8)

    budget = {"failures": 2}  # fewer than RETRIES: the run goes on with the same samples
    _flaky_shard(monkeypatch, "part-1.jsonl", budget)
    retried = batches(build_train_loader(data.train, run, rank=0, tokenizer=default_tok), 8)
    assert budget["failures"] == 0
    assert all(a["input_ids"].equal(b["input_ids"]) for a, b in zip(reference, retried, strict=True))

    budget["failures"] = 100
    loader = build_train_loader(data.train, run, rank=0, tokenizer=default_tok)
    got = []
    with pytest.raises(DataError, match=r"'doc-shards': reading .* failed 4 times at sample \d+ \(ConnectError"):
        for batch in loader:
            got.append(batch)
            state = json.loads(json.dumps(loader.state_dict()))
    monkeypatch.undo()
    resumed = build_train_loader(data.train, run, rank=0, tokenizer=default_tok)
    resumed.load_state_dict(state)  # the last position saved before the failure is usable
    after = batches(resumed, 8 - len(got))
    assert all(a["input_ids"].equal(b["input_ids"]) for a, b in zip(reference[len(got) :], after, strict=True))


def test_ranks_read_disjoint_shards(tmp_path, default_tok_dir, default_tok):
    folder = shards(tmp_path, 4, 10, words=4)
    run_2 = make_run(tmp_path, "pretrain", [spec(folder, streaming=True)], default_tok_dir, world_size=2)
    mix = prepare_data(run_2, default_tok).train
    per_rank = []
    for rank in (0, 1):
        stream = SampleStream(mix, rank=rank, world_size=2, num_workers=0)
        text = "".join(default_tok.decode(s["input_ids"]) for s in itertools.islice(iter(stream), 8))
        per_rank.append({int(m) for m in re.findall(r"doc(\d+) word0 ", text)})
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]


# 2 ranks x 2 DataLoader workers, the built-in corpus streamed (4 shards: one per rank and worker), dropout on
STREAMED = [*BASELINE, *DROPOUT, "data.streaming=true", "data.splits=[1,0,0]", "trainer.num_workers=2",
            "trainer.do_eval=false"]


@pytest.fixture(scope="module")
def streamed_baseline(tmp_path_factory):
    """The uninterrupted streaming run, through `accelerate launch` (gloo)."""
    return shared_run(tmp_path_factory, "streamed-2ranks",
                      lambda d: run(d, STREAMED, nproc=2, fresh=True, launcher="accelerate"))


def test_killed_streaming_run_resumes_bitwise(tmp_path, streamed_baseline):
    """SIGKILLed inside step 5 (its newest checkpoint is step 4's), relaunched (torchrun): every loss and every step's
    sample ids equal the uninterrupted run's. (test_resume.py puts the cached loaders through every way a run stops;
    here what is under test is the streams' state, which one kill between checkpoints exercises.)"""
    run_dir = tmp_path / "run"
    run_until_signal(run_dir, STREAMED, {"IRONCORE_TEST_HANG_MID_STEP": "5"}, nproc=2)
    killed = launch_state(run_dir, 0)
    assert killed["steps"] == [1, 2, 3, 4] and killed["latest"] == "step_4"
    before = len(read_jsonl(run_dir / "metrics.jsonl"))
    run(run_dir, STREAMED, nproc=2)
    assert launch_state(run_dir, before)["steps"] == [5, 6]
    assert_bitwise_equal(run_dir, streamed_baseline)


def test_a_streaming_runs_export_generates_in_plain_transformers(streamed_baseline):
    """The export of the streamed run loads in a process that never imports IronCore, and its greedy continuation is
    the one IronCore's own loader gives from the same directory."""
    export = streamed_baseline / "export"
    prompt = "the quick brown fox"
    got = generate_in_plain_transformers(export, prompt)
    model = load_pretrained(export).eval()
    ids = AutoTokenizer.from_pretrained(export)(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert got == want[0].tolist() and len(got) == ids.shape[1] + 8


def test_inspect_reports_the_first_documents_of_a_stream(tmp_path, default_tok_dir, capsys):
    data = write_jsonl(tmp_path / "docs.jsonl", text_rows(50))
    run = make_run(tmp_path, "pretrain", [spec(data, streaming=True)], default_tok_dir)
    assert preprocess(run, inspect=True, inspect_documents=20, preview=1) == 0
    out = capsys.readouterr().out
    head = prepare_data(make_run(tmp_path, "pretrain", [spec(data, max_samples=20)], default_tok_dir),
                        AutoTokenizer.from_pretrained(str(default_tok_dir))).train
    rows = [line.split() for line in out.splitlines() if line.startswith("docs ")]
    assert rows and rows[0][:7] == ["docs", "first", "20", "documents", str(len(head)), "0", str(len(head) * 64)], out
    assert "train row 0" in out


def test_hub_stream_is_opened_streaming(tmp_path, default_tok_dir, default_tok, monkeypatch):
    """A Hub name goes to `load_dataset(name, subset, split=..., streaming=True)` (the Hub itself is mocked)."""
    rows = datasets.Dataset.from_list(text_rows(20)).to_iterable_dataset(num_shards=2)
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    run = make_run(tmp_path, "pretrain", [spec("someorg/web", subset="en", split="train", streaming=True)],
                   default_tok_dir)
    stream = SampleStream(prepare_data(run, default_tok).train, rank=0, world_size=1, num_workers=0)
    assert calls == [(("someorg/web", "en"), {"split": "train", "streaming": True})]
    assert "doc0 word0" in default_tok.decode(next(iter(stream))["input_ids"])


@pytest.mark.parametrize(("data", "message"), [
    ({"splits": (0.9, 0.1, 0.0)}, r"data.splits \[0.9, 0.1, 0.0\] holds eval rows out, which a stream cannot"),
    ({"task_type": "sft", "pack_sequences": True}, r"data.pack_sequences packs a cached split"),
])
def test_what_a_stream_cannot_honour_is_refused_at_load(tmp_path, default_tok_dir, data, message):
    with pytest.raises(ConfigError, match=r"data.train_datasets\[0\] streams: " + message):
        make_run(tmp_path, data.pop("task_type", "pretrain"), [spec("a.jsonl", streaming=True)], default_tok_dir, **data)
