"""Pretraining rows: tokenize documents, end each with EOS, concatenate, cut into seq_length blocks.

Labels are the input ids themselves (the model shifts them), so no `labels` column is stored; the
collator adds it. Documents keep the tokenizer's own special tokens (a LLaMA tokenizer adds BOS, GPT-2
adds nothing); EOS is appended unless the tokenizer already ends documents with it. With
`data.reset_position_ids` the collator restarts position ids after every EOS.

Scaling: the documents of a split are handed out in chunks of about `CHUNK_CHARS` characters to
`data.num_workers` processes (a bounded window of chunks in flight, so memory stays flat however big
the split), their ids come back in document order, and the parent cuts the whole split's stream into
blocks in one pass: only the split's last partial block is dropped, and the blocks are the same for
any worker count. Every tokenizing process runs the tokenizer on one thread
(`TOKENIZERS_PARALLELISM=false`, the parent too when it tokenizes itself with one worker): then
`num_workers` is exactly the number of cores preprocessing takes, and N processes do not each start a
thread pool of all cores on top of one another.

Storage: blocks are fixed-size lists of `token_dtype(tokenizer)`: uint16 when every id fits in 65,536
(2 bytes a token, no per-row offsets), uint32 otherwise; the collator widens them to int64.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import datasets
import numpy as np
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter
from transformers import PreTrainedTokenizerBase

from ironcore.config.schema import DatasetSpec
from ironcore.data.sources import is_string, require_column

logger = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 20  # text per task: IPC and scheduling cost is noise next to tokenizing it, and 2 workers stay busy
DOCS_PER_CHUNK = 1000
READ_BATCH = 256  # documents read from the Arrow table at a time
UINT16_IDS = 2**16
PARALLELISM = "TOKENIZERS_PARALLELISM"


def token_dtype(tokenizer: PreTrainedTokenizerBase) -> str:
    """The narrowest unsigned type holding every id of `tokenizer` (added tokens included)."""
    ids = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=0) + 1)
    return "uint16" if ids <= UINT16_IDS else "uint32"


def block_features(dtype: str, seq_length: int) -> datasets.Features:
    return datasets.Features({"input_ids": datasets.List(datasets.Value(dtype), length=seq_length)})


def _encode(texts: list[str | None], *, tokenizer, eos_id: int, dtype: str) -> np.ndarray:
    """The ids of `texts` (empty ones skipped), each document ended by EOS, as one flat array."""
    texts = [t for t in texts if t]
    docs = tokenizer(texts, return_attention_mask=False)["input_ids"] if texts else []
    docs = [ids if ids[-1:] == [eos_id] else ids + [eos_id] for ids in docs if ids]
    return np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype)


def _chunks(ds: datasets.Dataset, column: str) -> Iterator[list[str | None]]:
    """The split's texts in order, in lists of about CHUNK_CHARS characters (at most DOCS_PER_CHUNK documents)."""
    chunk, size = [], 0
    for batch in ds.select_columns([column]).iter(batch_size=READ_BATCH):
        for text in batch[column]:
            chunk.append(text)
            size += len(text or "")
            if size >= CHUNK_CHARS or len(chunk) >= DOCS_PER_CHUNK:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


@contextmanager
def _one_thread():
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


_worker_encode: Callable[[list], np.ndarray] | None = None


def _start_worker(encode: Callable[[list], np.ndarray]) -> None:
    global _worker_encode
    _worker_encode = encode


def _encode_in_worker(texts: list) -> np.ndarray:
    return _worker_encode(texts)


def _encoded(chunks: Iterator[list], encode: Callable[[list], np.ndarray], num_workers: int) -> Iterator[np.ndarray]:
    """`encode(chunk)` of every chunk, in order, computed by `num_workers` processes (1: this one). The workers
    inherit the one-thread setting (set before they start, so the tokenizer never warns about a fork after
    its thread pool was used)."""
    if num_workers == 1:
        with _one_thread():
            yield from map(encode, chunks)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with _one_thread(), context.Pool(num_workers, initializer=_start_worker, initargs=(encode,)) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * num_workers:  # keeps every worker busy; a bounded window keeps memory flat
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def tokenize_pretrain(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    spec: DatasetSpec,
    seq_length: int,
    num_workers: int,
    label: str,
    cache_file: str,
) -> datasets.Dataset:
    """Blocks of exactly `seq_length` token ids (`input_ids`), documents separated by EOS, written to `cache_file`."""
    check_pretrain_columns(ds, spec, label)
    dtype = token_dtype(tokenizer)
    encode = partial(_encode, tokenizer=tokenizer, eos_id=tokenizer.eos_token_id, dtype=dtype)
    carry, blocks = np.zeros(0, dtype=dtype), 0
    with ArrowWriter(features=block_features(dtype, seq_length), path=cache_file) as writer:
        for ids in _encoded(_chunks(ds, spec.text_column), encode, num_workers):
            flat = np.concatenate([carry, ids])
            n = len(flat) // seq_length
            if n:
                column = pa.FixedSizeListArray.from_arrays(flat[: n * seq_length], seq_length)
                writer.write_table(pa.table({"input_ids": column}))
            carry, blocks = flat[n * seq_length :], blocks + n
        writer.finalize()
    logger.info("%s: %d documents tokenized into %d blocks (%d workers)", label, len(ds), blocks, num_workers)
    return datasets.Dataset.from_file(cache_file)


def check_pretrain_columns(ds: datasets.Dataset, spec: DatasetSpec, label: str) -> None:
    require_column(ds, spec.text_column, label, "a string (pretrain text)", is_string)
