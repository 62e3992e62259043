"""Train and eval loaders: deterministic, sharded by rank, and resumable mid-epoch.

Order: epoch e visits the training rows in `np.random.default_rng([seed, e]).permutation(n)`. Each
micro-step consumes one global micro-batch of `micro_batch_size * world_size` consecutive rows of that
order; rank r takes the r-th slice of `micro_batch_size` rows, so ranks see disjoint rows. The rows
left over at the end of an epoch (fewer than one optimizer step's global batch, `train_batch_size`)
are skipped, and the next epoch starts: epochs hold whole optimizer steps, so step k trains on the same
rows whatever the split into micro-batch x processes x accumulation (1 process x 2 accumulation steps
and 2 processes x 1 see the same set). The position is (epoch, cursor) with the cursor counted in
global rows, so `state_dict()` is the same on every rank, and restoring it (even with another world
size) continues with exactly the rows that come next, without reading the consumed ones.
`sample_ids` are row indices of the dataset. Iterating never draws from torch's global RNG, so a resumed
run's dropout continues the restored stream exactly.

A run with a streaming entry gets `StreamingTrainLoader` instead: no length, no epoch permutation; the order is
the streams' (mixed by ratio), sharded by rank and worker, and the position is every rank's stream state.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from ironcore.config.schema import RunConfig
from ironcore.data.collate import DPOCollator, LMCollator
from ironcore.data.streaming import SampleStream, StreamMix
from ironcore.errors import DataError


class _Rows(torch.utils.data.Dataset):
    """A `datasets.Dataset` read a micro-batch at a time, each row tagged with its `sample_id`."""

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        columns = self.dataset[list(indices)]
        rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        for row, index in zip(rows, indices, strict=True):
            row["sample_id"] = index
        return rows

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]


def _rank_generator(seed: int, rank: int) -> torch.Generator:
    """The DataLoader's own RNG, seeded from (seed, rank). Without one, starting an iterator draws the workers'
    base seed from torch's global generator, the one dropout uses: a resumed run would draw it right after its
    RNG state was restored, where the uninterrupted run is mid-stream, and every later dropout mask would shift."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0]))


class TrainLoader:
    """Infinite iterator of this rank's micro-batches with `state_dict` / `load_state_dict`."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        collate: Callable[[list[dict]], dict],
        *,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int = 0,
        samples_per_step: int | None = None,
    ):
        self.dataset, self.collate = dataset, collate
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.seed, self.num_workers = seed, num_workers
        self.global_batch = micro_batch_size * world_size
        step_batch = samples_per_step or self.global_batch
        if step_batch % self.global_batch:
            raise ValueError(f"samples_per_step={step_batch} is not a multiple of micro_batch_size x world_size")
        if len(dataset) < step_batch:
            raise DataError(
                f"the training data has {len(dataset)} rows, fewer than one global micro-batch "
                f"({micro_batch_size} x {world_size} ranks) x {step_batch // self.global_batch} accumulation steps"
            )
        self.usable = len(dataset) // step_batch * step_batch  # rows per epoch: whole optimizer steps only
        self.epoch, self.cursor = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.usable // self.global_batch

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def _index_batches(self, epoch: int, cursor: int) -> Iterator[list[int]]:
        while True:
            order = self._order(epoch)
            while cursor + self.global_batch <= self.usable:
                start = cursor + self.rank * self.micro_batch_size
                yield order[start : start + self.micro_batch_size].tolist()
                cursor += self.global_batch
            epoch, cursor = epoch + 1, 0

    def _advance(self) -> None:
        self.cursor += self.global_batch
        if self.cursor + self.global_batch > self.usable:
            self.epoch, self.cursor = self.epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        loader = DataLoader(
            _Rows(self.dataset),
            batch_sampler=self._index_batches(self.epoch, self.cursor),
            collate_fn=self.collate,
            num_workers=self.num_workers,
            generator=_rank_generator(self.seed, self.rank),
        )
        for batch in loader:
            self._advance()
            yield batch

    def state_dict(self) -> dict:
        """The position after the last batch handed out (prefetched batches do not count)."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_samples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if "streams" in state:
            raise DataError(f"the checkpoint's data position is for the streams {', '.join(state['streams'])}, but "
                            "this run reads cached datasets only; the dataset list changed")
        if state["num_samples"] != len(self.dataset) or state["seed"] != self.seed:
            raise DataError(
                f"the saved data position is for {state['num_samples']} training rows with seed {state['seed']}, "
                f"but this run has {len(self.dataset)} rows with seed {self.seed}; the data or its mixture changed"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        if self.cursor + self.global_batch > self.usable:
            self.epoch, self.cursor = self.epoch + 1, 0


class EvalLoader:
    """The first `max_samples` rows (all when None), split evenly over ranks, in fixed order."""

    def __init__(self, dataset: datasets.Dataset | None, collate, *, batch_size: int, rank: int, world_size: int,
                 max_samples: int | None):
        total = 0 if dataset is None else len(dataset) if max_samples is None else min(max_samples, len(dataset))
        per_rank = total // world_size
        self.rows = None if dataset is None else _Rows(dataset)
        self.indices = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.collate, self.batch_size = collate, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield self.collate(self.rows.__getitems__(self.indices[start : start + self.batch_size]))


def make_collator(run: RunConfig, tokenizer: PreTrainedTokenizerBase | None):
    """The collator of the run's task, with the pad id of `data.pad_token_id` (-1: the tokenizer's EOS)."""
    if tokenizer is None:
        from ironcore.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(run)
    eos_id = tokenizer.eos_token_id
    pad_id = run.data.pad_token_id if run.data.pad_token_id >= 0 else eos_id
    data = run.data
    if data.task_type == "dpo":
        return DPOCollator(pad_id, data.seq_length, data.pad_to_max_length)
    reset = eos_id if data.task_type == "pretrain" and data.reset_position_ids else None
    return LMCollator(pad_id, data.seq_length, data.pad_to_max_length, reset)


def build_train_loader(
    dataset: datasets.Dataset | StreamMix,
    run: RunConfig,
    *,
    rank: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> TrainLoader | StreamingTrainLoader:
    """This rank's infinite, resumable micro-batch iterator over `dataset` (pass `tokenizer` to skip reloading it),
    for the data-parallel size the run was resolved for; a streaming mixture gets the streaming loader."""
    if isinstance(dataset, StreamMix):
        return StreamingTrainLoader(dataset, make_collator(run, tokenizer), micro_batch_size=run.trainer.micro_batch_size,
                                    rank=rank, world_size=run.derived.data_parallel_size, seed=run.init.seed,
                                    num_workers=run.trainer.num_workers)
    return TrainLoader(
        dataset,
        make_collator(run, tokenizer),
        micro_batch_size=run.trainer.micro_batch_size,
        rank=rank,
        world_size=run.derived.data_parallel_size,
        seed=run.init.seed,
        num_workers=run.trainer.num_workers,
        samples_per_step=run.trainer.train_batch_size,
    )


def build_eval_loader(
    dataset: datasets.Dataset | None,
    run: RunConfig,
    *,
    rank: int,
    max_samples: int | None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> EvalLoader:
    """This rank's finite eval batches of `trainer.eval_batch_size`; empty when `dataset` is None."""
    return EvalLoader(
        dataset,
        make_collator(run, tokenizer),
        batch_size=run.trainer.eval_batch_size,
        rank=rank,
        world_size=run.derived.data_parallel_size,
        max_samples=max_samples,
    )


# torchdata 0.11 calls torch.set_vital, deprecated in torch 2.13 (a no-op kept for compatibility): one warning per
# iterator started, about torchdata's code, that says nothing to the user
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


class StreamingTrainLoader:
    """This rank's endless micro-batches of a streaming mixture (`streaming.SampleStream`), resumable.

    The position is torchdata's `StatefulDataLoader` state (each worker's stream state and which worker hands out
    the next batch). Ranks read different shards, so their states differ: `state_dict` gathers every rank's
    (collective, like the checkpoint save that calls it) and `load_state_dict` takes this rank's.
    """

    def __init__(self, mix: StreamMix, collate: Callable[[list[dict]], dict], *, micro_batch_size: int, rank: int,
                 world_size: int, seed: int, num_workers: int = 0):
        self.mix, self.rank, self.world_size = mix, rank, world_size
        self.stream = SampleStream(mix, rank=rank, world_size=world_size, num_workers=num_workers)
        self.stream.check_shards()
        self.loader = StatefulDataLoader(self.stream, batch_size=micro_batch_size, collate_fn=collate,
                                         num_workers=num_workers, generator=_rank_generator(seed, rank))
        self.batches = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        try:
            for batch in self.loader:
                self.batches += 1
                yield batch
        except DataError as err:  # raised in a worker, it comes back wrapped with the worker's traceback
            message = str(err).strip().splitlines()[-1].removeprefix("ironcore.errors.DataError: ")
            raise DataError(f"{message} (micro-batch {self.batches + 1} of this run)") from None

    def state_dict(self) -> dict:
        state = {"streams": self.mix.describe(), "world_size": self.world_size,
                 "num_workers": self.loader.num_workers, "loader": self.loader.state_dict()}
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.world_size > 1:
            ranks: list = [None] * self.world_size
            torch.distributed.all_gather_object(ranks, state["loader"])
            state["loader"] = ranks
        else:
            state["loader"] = [state["loader"]]
        return state

    def load_state_dict(self, state: dict) -> None:
        if "streams" not in state:
            raise DataError("the checkpoint's data position is for cached datasets, but this run streams "
                            f"{', '.join(self.mix.describe())}; the dataset list changed")
        if state["streams"] != self.mix.describe():
            old, new = set(state["streams"]), set(self.mix.describe())
            raise DataError(f"the checkpoint's stream state belongs to another dataset list: it has "
                            f"{', '.join(sorted(old - new)) or 'the same entries in another order'}, this run has "
                            f"{', '.join(sorted(new - old)) or 'the same entries in another order'}")
        now = {"world_size": self.world_size, "num_workers": self.loader.num_workers}
        for key, value in now.items():
            if state[key] != value:
                raise DataError(f"the checkpoint's stream state was saved with {key}={state[key]}, this run has "
                                f"{value}: streams are sharded by both, so resume with the same")
        self.loader.load_state_dict(state["loader"][self.rank])
