"""Loaders: deterministic, disjoint across ranks, and resumable mid-epoch to exactly the same batches."""

from __future__ import annotations

import itertools
from dataclasses import replace

import datasets
import pytest
import torch
from helpers_data import default_tok_dir_fixture, default_tok_fixture, make_run, own_tok_dir_fixture, own_tok_fixture  # noqa: F401

from ironcore.config.resolve import resolve
from ironcore.data import build_eval_loader, build_train_loader
from ironcore.errors import DataError

N = 50


@pytest.fixture()
def rows() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": [[i, i + 1, i + 2] for i in range(N)]})


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_restored_loader_yields_the_uninterrupted_batches(tmp_path, default_tok_dir, default_tok, rows, loader_workers):
    run = make_run(tmp_path, "pretrain", [], default_tok_dir, seq_length=3, loader_workers=loader_workers)
    reference = take(build_train_loader(rows, run, rank=0, tokenizer=default_tok), 30)
    first = build_train_loader(rows, run, rank=0, tokenizer=default_tok)
    assert same(take(first, 17), reference[:17])
    state = first.state_dict()
    assert state["epoch"] == 1 and state["cursor"] == (17 - first.steps_per_epoch) * 4
    resumed = build_train_loader(rows, run, rank=0, tokenizer=default_tok)
    resumed.load_state_dict(state)
    assert same(take(resumed, 13), reference[17:])


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_iterating_leaves_torch_global_rng_alone(tmp_path, default_tok_dir, default_tok, rows, loader_workers):
    """Dropout draws from torch's global RNG. A DataLoader without a generator of its own draws its workers' base seed
    from it on every `iter()`, which a resumed run does right after restoring that RNG (issue 11)."""
    run = make_run(tmp_path, "pretrain", [], default_tok_dir, seq_length=3, loader_workers=loader_workers)
    loader = build_train_loader(rows, run, rank=0, tokenizer=default_tok)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    take(loader, 3)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_restored_loader_continues_the_global_rng_stream(tmp_path, default_tok_dir, default_tok, rows):
    """A resume in miniature: the loader position and torch's RNG saved after 2 batches, both restored in a new
    loader, which then yields the uninterrupted batches with the uninterrupted draws (the stand-in for dropout)."""
    run = make_run(tmp_path, "pretrain", [], default_tok_dir, seq_length=3)

    def steps(batches, n: int) -> list[tuple[dict, torch.Tensor]]:
        return [(next(batches), torch.rand(4)) for _ in range(n)]

    torch.manual_seed(0)
    uninterrupted = build_train_loader(rows, run, rank=0, tokenizer=default_tok)
    batches = iter(uninterrupted)
    steps(batches, 2)
    rng, position = torch.get_rng_state(), uninterrupted.state_dict()
    reference = steps(batches, 3)

    torch.manual_seed(1)  # the relaunch seeds at start-up, then restores the checkpoint's RNG state
    resumed = build_train_loader(rows, run, rank=0, tokenizer=default_tok)
    resumed.load_state_dict(position)
    torch.set_rng_state(rng)
    continued = steps(iter(resumed), 3)
    assert same([b for b, _ in continued], [b for b, _ in reference])
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(continued, reference, strict=True))


def test_ranks_are_disjoint_and_resume_with_their_own_rows(tmp_path, default_tok_dir, default_tok, rows):
    run = make_run(tmp_path, "pretrain", [], default_tok_dir, seq_length=3, micro_batch_size=3, world_size=2)
    ranks = [build_train_loader(rows, run, rank=r, tokenizer=default_tok) for r in (0, 1)]
    batches = [take(loader, 8) for loader in ranks]
    single = make_run(tmp_path, "pretrain", [], default_tok_dir, seq_length=3, micro_batch_size=6)
    whole = take(build_train_loader(rows, single, rank=0, tokenizer=default_tok), 8)
    for step in range(8):
        ids0, ids1 = (batches[r][step]["sample_ids"].tolist() for r in (0, 1))
        assert not set(ids0) & set(ids1)
        assert ids0 + ids1 == whole[step]["sample_ids"].tolist()
    epoch = [i for step in range(8) for r in (0, 1) for i in batches[r][step]["sample_ids"].tolist()]
    assert len(set(epoch)) == 48
    state = ranks[1].state_dict()
    resumed = build_train_loader(rows, run, rank=1, tokenizer=default_tok)
    resumed.load_state_dict(state)
    continued = take(build_train_loader(rows, run, rank=1, tokenizer=default_tok), 11)[8:]
    assert same(take(resumed, 3), continued)


def test_order_depends_on_seed_and_rows_match_sample_ids(tmp_path, default_tok_dir, default_tok, rows):
    loaders = [build_train_loader(rows, make_run(tmp_path, "pretrain", [], default_tok_dir, seq_length=3, seed=s),
                                  rank=0, tokenizer=default_tok) for s in (1, 1, 2)]
    a, b, c = (take(loader, 5) for loader in loaders)
    assert same(a, b) and not same(a, c)
    for batch in a:
        assert batch["input_ids"].dtype == torch.long and batch["sample_ids"].dtype == torch.long
        assert batch["input_ids"][:, 0].tolist() == batch["sample_ids"].tolist()


def test_saved_position_for_other_data_is_refused(tmp_path, default_tok_dir, default_tok, rows):
    run = make_run(tmp_path, "pretrain", [], default_tok_dir, seq_length=3)
    loader = build_train_loader(rows, run, rank=0, tokenizer=default_tok)
    with pytest.raises(DataError, match="saved data position is for 49 training rows"):
        loader.load_state_dict({"epoch": 0, "cursor": 4, "seed": run.init.seed, "num_samples": 49})
    two_ranks = make_run(tmp_path, "pretrain", [], default_tok_dir, seq_length=3, world_size=2)
    with pytest.raises(DataError, match="fewer than one global micro-batch"):
        build_train_loader(rows.select(range(5)), two_ranks, rank=0, tokenizer=default_tok)


def test_eval_loader_is_finite_deterministic_and_split_over_ranks(tmp_path, default_tok_dir, default_tok, rows):
    run = make_run(tmp_path, "pretrain", [], default_tok_dir, seq_length=3, micro_batch_size=4, world_size=2)
    per_rank = [list(build_eval_loader(rows, run, rank=r, max_samples=21, tokenizer=default_tok)) for r in (0, 1)]
    ids = [[i for batch in batches for i in batch["sample_ids"].tolist()] for batches in per_rank]
    assert ids == [list(range(10)), list(range(10, 20))]
    assert len(build_eval_loader(rows, run, rank=0, max_samples=21, tokenizer=default_tok)) == 3
    again = list(build_eval_loader(rows, run, rank=0, max_samples=21, tokenizer=default_tok))
    assert same(per_rank[0], again)
    assert list(build_eval_loader(None, run, rank=0, max_samples=5, tokenizer=default_tok)) == []


def test_epochs_hold_whole_optimizer_steps(tmp_path, default_tok_dir, default_tok, rows):
    """Rows per optimizer step do not depend on how train_batch_size splits into micro-batches."""
    def step_rows(micro: int) -> list[set[int]]:
        run = make_run(tmp_path, "pretrain", [], default_tok_dir, seq_length=3, micro_batch_size=micro)
        run = resolve(replace(run, trainer=replace(run.trainer, train_batch_size=12, gradient_accumulation_steps=None)))
        loader = build_train_loader(rows, run, rank=0, tokenizer=default_tok)
        ids = [i for batch in take(loader, 60 // micro) for i in batch["sample_ids"].tolist()]
        return [set(ids[k : k + 12]) for k in range(0, len(ids), 12)]

    small, large = step_rows(3), step_rows(6)
    assert small == large
    assert len(small) == 5 and len(set().union(*small[:4])) == 48  # epoch 0: 4 whole steps, 2 rows left out
