"""Mixing: ratios are the proportions of drawn training samples, seeded, with small datasets repeated."""

from __future__ import annotations

from collections import Counter

import datasets
import pytest
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
from ironcore.data.mixing import mix
from ironcore.errors import ConfigError


def marked(marker: int, n: int) -> datasets.Dataset:
    """Rows whose first token tells which dataset they came from, the second which row."""
    return datasets.Dataset.from_dict({"input_ids": [[marker, i % 500, 7, 7] for i in range(n)]})


SIZES, RATIOS = (400, 2500, 900), (5.0, 3.0, 2.0)


def test_drawn_proportions_match_ratios(tmp_path, default_tok_dir, default_tok):
    parts = [marked(m, n) for m, n in zip((101, 102, 103), SIZES, strict=True)]
    train = mix(parts, list(RATIOS), ["a", "b", "c"], seed=7)
    run = make_run(tmp_path, "pretrain", [], default_tok_dir, seq_length=4, micro_batch_size=10)
    counts, drawn = Counter(), 0
    for batch in build_train_loader(train, run, rank=0, tokenizer=default_tok):
        counts.update(batch["input_ids"][:, 0].tolist())
        drawn += len(batch["sample_ids"])
        if drawn >= 10_000:
            break
    for marker, ratio in zip((101, 102, 103), RATIOS, strict=True):
        assert abs(counts[marker] / drawn - ratio / sum(RATIOS)) < 0.02, (marker, counts)


def test_mixture_is_seeded_and_uses_every_row():
    parts = [marked(m, n) for m, n in zip((101, 102, 103), SIZES, strict=True)]
    first = mix(parts, list(RATIOS), ["a", "b", "c"], seed=7)["input_ids"]
    assert first == mix(parts, list(RATIOS), ["a", "b", "c"], seed=7)["input_ids"]
    assert first != mix(parts, list(RATIOS), ["a", "b", "c"], seed=8)["input_ids"]
    rows = Counter((ids[0], ids[1]) for ids in first)
    for marker, size in zip((101, 102, 103), SIZES, strict=True):
        assert {i for m, i in rows if m == marker} == set(range(min(size, 500)))
    repeats_of_small = Counter(ids[1] for ids in first if ids[0] == 101)
    assert min(repeats_of_small.values()) >= 2


def test_ratio_zero_is_left_out_and_all_zero_is_an_error():
    parts = [marked(101, 50), marked(102, 50)]
    assert {ids[0] for ids in mix(parts, [1.0, 0.0], ["a", "b"], seed=0)["input_ids"]} == {101}
    with pytest.raises(ConfigError, match="every ratio is 0"):
        mix(parts, [0.0, 0.0], ["a", "b"], seed=0)


def test_tiny_ratio_on_big_dataset_is_refused():
    with pytest.raises(ConfigError, match=r"'b' \(5000 rows at 0\.10%\) would need a mixture"):
        mix([marked(101, 10), marked(102, 5000)], [999.0, 1.0], ["a", "b"], seed=0)


def test_prepare_data_mixes_entries_by_ratio(tmp_path, default_tok_dir):
    a = write_jsonl(tmp_path / "a.jsonl", text_rows(40, words=10, tag="alpha"))
    b = write_jsonl(tmp_path / "b.jsonl", text_rows(40, words=10, tag="beta"))
    run = make_run(tmp_path, "pretrain", [spec(a, ratio=3), spec(b, ratio=1)], default_tok_dir, seq_length=16)
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    assert prepared.stats["mixture"] == {"a": 0.75, "b": 0.25}
    sizes = {name: info["splits"]["train"]["rows"] for name, info in prepared.stats["datasets"].items()}
    assert len(prepared.train) >= max(sizes["a"] / 0.75, sizes["b"] / 0.25) * 0.8
    texts = [tokenizer.decode(ids) for ids in prepared.train["input_ids"]]
    share = sum("alpha" in t and "beta" not in t for t in texts) / len(texts)
    assert 0.6 < share < 0.9
