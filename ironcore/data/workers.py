"""Preprocessing worker processes: a split's rows cut into ranges, each range mapped by one of `data.num_workers`
processes, the answers yielded in row order.

Every task (pretrain documents, SFT conversations, DPO pairs) tokenizes through `map_ranges`, so one set of rules
holds for all of them:
- a task is a row range, two integers: each worker reads its rows itself from the Arrow table it inherits
  (forked; pickled by file reference under spawn), so no text is pickled to the workers, and the answers are
  compact (a uint16 array, an Arrow table), so little is pickled back;
- at most `2 * num_workers` ranges are in flight: every worker stays busy and memory stays flat however big
  the split;
- the answers come back in row order, so what is built from them is the same for any worker count;
- the tokenizer runs on one thread in every tokenizing process (`TOKENIZERS_PARALLELISM=false`, the parent too
  when it tokenizes itself with one worker): `num_workers` is then exactly the number of cores preprocessing
  takes. With its thread pool on, every worker would start one thread per core on top of the others (N x cores
  threads on N cores, each evicting the others' caches), and a fork after the parent's pool was used makes the
  tokenizer warn and turn it off anyway.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import datasets
import pyarrow.compute as pc

PARALLELISM = "TOKENIZERS_PARALLELISM"
LENGTH_BATCH = 10_000  # rows whose text lengths are read at a time to cut byte ranges

Result = TypeVar("Result")
RangeFn = Callable[[datasets.Dataset, int, int], Result]


@contextmanager
def one_thread():
    """The tokenizer on one thread in this process for the duration (the variable is read at every call)."""
    before = os.environ.get(PARALLELISM)
    os.environ[PARALLELISM] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ[PARALLELISM]
        else:
            os.environ[PARALLELISM] = before


def byte_ranges(ds: datasets.Dataset, column: str, *, max_bytes: int, max_rows: int) -> Iterator[tuple[int, int]]:
    """Row ranges [start, stop) holding about `max_bytes` of text of `column` (at most `max_rows` rows), cut from
    the column's byte lengths read as Arrow: no text reaches Python here."""
    start, size = 0, 0
    batches = ds.select_columns([column]).with_format("arrow").iter(batch_size=LENGTH_BATCH)
    for offset, batch in enumerate(batches):
        lengths = pc.fill_null(pc.binary_length(batch.column(0)), 0).to_numpy()
        for k, length in enumerate(lengths.tolist(), start=offset * LENGTH_BATCH):
            size += length
            if size >= max_bytes or k + 1 - start >= max_rows:
                yield start, k + 1
                start, size = k + 1, 0
    if start < len(ds):
        yield start, len(ds)


def row_ranges(n: int, rows: int) -> Iterator[tuple[int, int]]:
    """[0, n) in ranges of `rows` rows."""
    for start in range(0, n, rows):
        yield start, min(start + rows, n)


_worker: tuple[datasets.Dataset, RangeFn] | None = None


def _start_worker(ds: datasets.Dataset, fn: RangeFn) -> None:
    global _worker
    _worker = (ds, fn)


def _run(rows: tuple[int, int]):
    ds, fn = _worker
    return fn(ds, *rows)


def map_ranges(ds: datasets.Dataset, ranges: Iterator[tuple[int, int]], fn: RangeFn, num_workers: int
               ) -> Iterator[Result]:
    """`fn(ds, start, stop)` of every range, in order, computed by `num_workers` processes (1: this one)."""
    with one_thread():
        if num_workers == 1:
            yield from (fn(ds, start, stop) for start, stop in ranges)
            return
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with context.Pool(num_workers, initializer=_start_worker, initargs=(ds, fn)) as pool:
            pending = deque()
            for rows in ranges:
                pending.append(pool.apply_async(_run, (rows,)))
                if len(pending) >= 2 * num_workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
