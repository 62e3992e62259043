"""Streaming datasets: entries read as `datasets.IterableDataset`, tokenized and packed on the fly, never cached.

An entry with `streaming: true` (or in a data group with it) is opened with `load_dataset(..., streaming=True)`
(local files through their format's builder, Hub names as they are). Inside each DataLoader worker
(`trainer.num_workers`) its documents become samples exactly as the cached path makes them:
- pretrain: each document tokenized and ended by EOS, the ids concatenated, cut into `seq_length` blocks
  (the carry between documents kept), so with one worker a stream yields the cached split's blocks in order;
- SFT / DPO: each row's features as the cached rows have them; skipped rows (no answer, ...) are skipped.

Mixing: every sample is drawn from entry i with probability ratio_i (a seeded generator per rank and worker);
an entry that ends starts its next epoch (`set_epoch`), so the proportions hold for as long as training runs.
A cached entry mixed with streams joins as `Dataset.to_iterable_dataset`, its rows already samples.

Sharding: each entry is split by rank (`split_dataset_by_node`) and, inside the rank, by worker (the
IterableDataset's own worker sharding): ranks and workers read disjoint shards (files), and no sample is
seen twice within an epoch. A rank needs at least one shard per worker; fewer is refused when the loader starts.

Resume: the stream's position is the source's `state_dict()` (shard and row inside it) before the document being
handed out, the carry of tokens before it (under `seq_length`) and how many of its samples were handed out, per
worker, collected by torchdata's `StatefulDataLoader` after every batch (torchdata earns its place here: a plain
DataLoader's workers cannot report their datasets' state, and which worker hands out the next batch must be
restored too); all ranks' states go into the checkpoint, each rank restores its own. On resume only the one
current document is tokenized again; the reader re-opens the current shard and skips its consumed rows at the
Arrow level (datasets' own resume), without tokenizing them.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import datasets
import httpx
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from transformers import PreTrainedTokenizerBase

from ironcore.config.schema import DatasetSpec
from ironcore.data import builtin_corpus, dpo, pretrain, sft
from ironcore.data.sources import builtin_kind, check_source, load_hub, local_format
from ironcore.errors import DataError

logger = logging.getLogger(__name__)

RETRIES = 3  # reads of a Hub stream retried after a network error before the run stops
RETRY_SECONDS = 1.0
# what a Hub read raises once datasets' own read retries gave up (it re-raises ConnectionError), or before them
NETWORK_ERRORS = (ConnectionError, TimeoutError, httpx.TransportError)


@dataclass
class Entry:
    """One mixed source: a stream of documents (`encode` makes samples) or of ready samples (a cached entry)."""

    name: str
    label: str
    spec: DatasetSpec | None
    rows: datasets.IterableDataset = field(repr=False)
    encode: Callable | None = field(repr=False)  # None: rows are samples already


@dataclass
class StreamMix:
    """The training data of a run with at least one streaming entry: entries and their normalised ratios."""

    entries: list[Entry]
    probabilities: list[float]
    seed: int

    def describe(self) -> list[str]:
        """What the checkpoint records to refuse a resume over another dataset list."""
        return [f"{e.name} ({e.spec.dataset_path if e.spec else 'cached'}, {p:.6g})"
                for e, p in zip(self.entries, self.probabilities, strict=True)]


def open_rows(spec: DatasetSpec, *, task: str, cache_dir: str | None, label: str) -> datasets.IterableDataset:
    """The entry's raw rows as an IterableDataset (first `max_samples` when set)."""
    check_source(spec, task=task, label=label)
    kind = builtin_kind(spec, task)
    if kind:
        rows = builtin_corpus.builtin_dataset(kind).to_iterable_dataset(num_shards=4)
    else:
        local = local_format(spec, label)
        if local is None:
            rows = load_hub(spec, cache_dir, label, streaming=True)
        else:
            builder, files = local
            rows = datasets.load_dataset(builder, data_files={"train": [str(f) for f in files]}, split=spec.split,
                                         streaming=True)
    return rows.take(spec.max_samples) if spec.max_samples is not None else rows


def encoder(spec: DatasetSpec, task: str, tokenizer: PreTrainedTokenizerBase, *, seq_length: int, truncation: str,
            label: str) -> Callable:
    """`encode(row, index, carry) -> (samples, carry)`: the samples one row adds (pretrain: the blocks it completes)."""
    if task == "pretrain":
        dtype = pretrain.token_dtype(tokenizer)
        encode = partial(pretrain._encode, tokenizer=tokenizer, backend=pretrain.backend_encoder(tokenizer),
                         eos_id=tokenizer.eos_token_id, dtype=dtype)
        return partial(_blocks, encode=encode, column=spec.text_column, seq_length=seq_length, dtype=dtype)
    batch = sft._sft_batch if task == "sft" else dpo._dpo_batch
    check = sft.check_sft_columns if task == "sft" else dpo.check_dpo_columns
    return partial(_sample, batch=batch, check=check, spec=spec, tokenizer=tokenizer, seq_length=seq_length,
                   truncation=truncation, label=label)


def _blocks(row: dict, index: int, carry: list[int], *, encode, column: str, seq_length: int, dtype: str):
    flat = np.concatenate([np.asarray(carry, dtype=dtype), encode([row[column]])])
    n = len(flat) // seq_length
    blocks = [{"input_ids": flat[k * seq_length : (k + 1) * seq_length].tolist()} for k in range(n)]
    return blocks, flat[n * seq_length :].tolist()


def _sample(row: dict, index: int, carry: list[int], *, batch, check, spec, tokenizer, seq_length, truncation, label):
    columns = check(datasets.Dataset.from_list([row]), spec, label) if index == 0 else _columns(check, spec, row, label)
    out = batch({k: [v] for k, v in row.items()}, [index], tokenizer=tokenizer, template=tokenizer.chat_template,
                columns=columns, seq_length=seq_length, truncation=truncation, label=label)
    if out["status"][0] not in sft.KEPT:
        return [], carry
    return [{k: v[0] for k, v in out.items() if k != "status"}], carry


def _columns(check, spec: DatasetSpec, row: dict, label: str) -> tuple:
    """The columns the first row was checked for (rows of one stream share their columns)."""
    if check is sft.check_sft_columns:
        return (spec.messages_column,) if spec.messages_column in row else (spec.prompt_column, spec.response_column)
    return (spec.prompt_column if spec.prompt_column in row else None, spec.chosen_column, spec.rejected_column)


def check_first_row(entry: Entry, task: str) -> None:
    """The entry's columns, from its first row (a stream has no schema before it is read): DataError naming it."""
    if entry.encode is None:
        return
    first = next(iter(_retrying(entry, entry.rows, where="its first row")), None)
    if first is None:
        raise DataError(f"{entry.label}: the stream {entry.spec.dataset_path} yields no rows")
    if task == "pretrain":
        pretrain.check_pretrain_columns(datasets.Dataset.from_list([first]), entry.spec, entry.label)
    else:
        entry.encode(first, 0, [])  # SFT / DPO: checks the row's columns as the first row of a worker does


def _retrying(entry: Entry, rows: datasets.IterableDataset, *, where: str | Callable[[], str]) -> Iterator[dict]:
    """`rows`, re-opened at its last position after a network error, RETRIES times, then one DataError line."""
    failures, iterator = 0, iter(rows)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except NETWORK_ERRORS as err:
            failures += 1
            if failures > RETRIES:
                raise DataError(f"{entry.label}: reading {entry.spec.dataset_path if entry.spec else entry.name} "
                                f"failed {failures} times at {where() if callable(where) else where} "
                                f"({type(err).__name__}: {err}); the last checkpoint is intact, resume from it"
                                ) from None
            logger.warning("%s: network error (%s), retry %d of %d", entry.label, err, failures, RETRIES)
            time.sleep(RETRY_SECONDS * failures)
            rows.load_state_dict(rows.state_dict())
            iterator = iter(rows)
            continue
        failures = 0
        yield row  # outside the try: closing the generator must not run the except clause


def materialize(entry: Entry, task: str, seq_length: int, *, documents: int | None = None
                ) -> tuple[datasets.Dataset, int]:
    """The samples of a stream's first `documents` rows (None: all, i.e. its `max_samples`) as an in-memory Dataset,
    and how many rows were read: a streaming eval/test entry, or the head `preprocess --inspect` reports on."""
    check_first_row(entry, task)
    rows = entry.rows if documents is None else entry.rows.take(documents)
    samples, carry, index = [], [], 0
    for index, row in enumerate(_retrying(entry, rows, where="its first rows"), start=1):
        new, carry = entry.encode(row, index - 1, carry)
        samples.extend(new)
    if not samples:
        raise DataError(f"{entry.label}: the stream {entry.spec.dataset_path} yields no text (no sample of at most "
                        f"{seq_length} tokens in its first {index} rows)")
    return datasets.Dataset.from_list(samples), index


class SampleStream(torch.utils.data.IterableDataset):
    """This rank's endless mixed samples, each tagged with a `sample_id` unique across ranks and workers.

    Stateful (`state_dict` / `load_state_dict`, called by StatefulDataLoader in the worker that iterates it): the
    state after the last sample handed out is every entry's epoch, reader position, carry and samples handed out of
    the current row, the mixing generator and the count of samples."""

    def __init__(self, mix: StreamMix, *, rank: int, world_size: int, num_workers: int):
        self.mix, self.rank, self.world_size, self.num_workers = mix, rank, world_size, num_workers
        self.rows = [split_dataset_by_node(e.rows, rank=rank, world_size=world_size) for e in mix.entries]
        self._state: dict | None = None
        self._live: dict | None = None

    def check_shards(self) -> None:
        """A worker without a shard would read nothing: refused in one line naming the entry."""
        for entry in self.mix.entries:
            shards = entry.rows.num_shards
            per_rank = shards // self.world_size if shards % self.world_size == 0 else shards
            if per_rank < max(1, self.num_workers):
                raise DataError(f"{entry.label}: {shards} shard(s) give {per_rank} per rank, fewer than "
                                f"trainer.num_workers={self.num_workers}; split the data into more files or "
                                "lower trainer.num_workers")

    def state_dict(self) -> dict:
        return copy.deepcopy(self._live if self._live is not None else self._state or {})

    def load_state_dict(self, state: dict) -> None:
        self._state = copy.deepcopy(state)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        saved = self._state or {}
        entries = saved.get("entries") or [{"epoch": 0, "rows": None, "carry": [], "index": 0, "skip": 0,
                                            "started": False} for _ in self.mix.entries]
        rng = np.random.default_rng([self.mix.seed, self.rank, worker])
        if "rng" in saved:
            rng.bit_generator.state = saved["rng"]
        self._live = {"entries": entries, "rng": rng.bit_generator.state, "count": saved.get("count", 0)}
        sources = [self._samples(i, entries[i]) for i in range(len(entries))]
        stride = self.world_size * workers
        while True:
            i = int(rng.choice(len(sources), p=self.mix.probabilities)) if len(sources) > 1 else 0
            sample = next(sources[i])
            count = self._live["count"]
            sample["sample_id"] = count * stride + self.rank * workers + worker
            self._live["count"] = count + 1
            self._live["rng"] = rng.bit_generator.state
            yield sample

    def _samples(self, i: int, state: dict) -> Iterator[dict]:
        """Entry i's samples, epoch after epoch, `state` kept current after each one handed out: the reader's
        position before the row being handed out, the carry of tokens before it, and how many of the row's samples
        were handed out (a long document gives many blocks: a resume re-encodes that one row and skips them, so
        the state stays a few hundred tokens however long the document)."""
        entry, rows = self.mix.entries[i], self.rows[i]
        while True:
            rows.set_epoch(state["epoch"])
            if state["rows"] is not None:
                rows.load_state_dict(state["rows"])
            for row in _retrying(entry, rows, where=lambda: f"sample {self._live['count']}"):
                if entry.encode is None:
                    new, carry = [dict(row)], []
                else:
                    new, carry = entry.encode(row, state["index"], state["carry"])
                for k in range(state["skip"], len(new)):
                    state.update(skip=k + 1, started=True)
                    yield new[k]
                state.update(rows=rows.state_dict(), carry=carry, index=state["index"] + 1, skip=0)
            if not state["started"]:
                raise DataError(f"{entry.label}: the stream yields no text: a whole pass over its shards gave no sample")
            state.update(epoch=state["epoch"] + 1, rows=None, carry=[], index=0, skip=0, started=False)
