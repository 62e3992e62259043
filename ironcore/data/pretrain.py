"""Pretraining rows: tokenize documents, end each with EOS, concatenate, cut into seq_length blocks.

Labels are the input ids themselves (the model shifts them), so no `labels` column is stored; the
collator adds it. Documents keep the tokenizer's own special tokens (a LLaMA tokenizer adds BOS, GPT-2
adds nothing); EOS is appended unless the tokenizer already ends documents with it. With
`data.reset_position_ids` the collator restarts position ids after every EOS.

Scaling: the documents of a split go out as row ranges of about `CHUNK_BYTES` of text to
`data.num_workers` processes (`workers.map_ranges`: each reads its documents from the Arrow table, tokenizes
them on one thread and sends back one uint16 array), their ids come back in document order, and the parent
cuts the whole split's stream into blocks in one pass: only the split's last partial block is dropped, and
the blocks are the same for any worker count. Fast tokenizers encode through `encode_batch_fast` (no
character offsets; the same ids as `tokenizer(texts)`).

Storage: blocks are fixed-size lists of `token_dtype(tokenizer)`: uint16 when every id fits in 65,536
(2 bytes a token, no per-row offsets), uint32 otherwise; the collator widens them to int64.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from functools import partial

import datasets
import numpy as np
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from ironcore.config.schema import DatasetSpec
from ironcore.data.sources import is_string, require_column
from ironcore.data.workers import byte_ranges, map_ranges

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 18  # text per task: about 0.1 s of tokenizing, so the last task keeps a worker waiting only
# briefly, while a task's own cost (a row range out, a compact array back) stays noise next to it
DOCS_PER_CHUNK = 1000
UINT16_IDS = 2**16


def id_count(tokenizer: PreTrainedTokenizerBase) -> int:
    """One more than the largest id `tokenizer` can produce (added tokens included)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=0) + 1)


def token_dtype(tokenizer: PreTrainedTokenizerBase) -> str:
    """The narrowest unsigned type holding every id of `tokenizer`."""
    return "uint16" if id_count(tokenizer) <= UINT16_IDS else "uint32"


def block_features(dtype: str, seq_length: int) -> datasets.Features:
    return datasets.Features({"input_ids": datasets.List(datasets.Value(dtype), length=seq_length)})


def backend_encoder(tokenizer: PreTrainedTokenizerBase) -> Tokenizer | None:
    """A copy of a fast tokenizer's Rust backend set as `tokenizer(texts)` sets it (no truncation or padding, special
    tokens split or not as configured), for `encode_batch_fast`: the same ids without the character offsets that
    `tokenizer(texts)` computes and drops, about a fifth less CPU. None for a tokenizer without one."""
    backend = tokenizer.backend_tokenizer if tokenizer.is_fast else None
    if backend is None:
        return None
    backend = Tokenizer.from_str(backend.to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return backend


def _encode(texts: list[str | None], *, tokenizer, backend: Tokenizer | None, eos_id: int, dtype: str) -> np.ndarray:
    """The ids of `texts` (empty ones skipped), each document ended by EOS, as one flat array."""
    texts = [t for t in texts if t]
    if not texts:
        return np.zeros(0, dtype=dtype)
    if backend is not None:
        docs = [encoding.ids for encoding in backend.encode_batch_fast(texts)]
    else:
        docs = tokenizer(texts, return_attention_mask=False)["input_ids"]
    docs = [ids for ids in docs if ids]
    if not docs:
        return np.zeros(0, dtype=dtype)
    ends = np.cumsum([len(ids) for ids in docs])
    flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=int(ends[-1]))
    return np.insert(flat, ends[[ids[-1] != eos_id for ids in docs]], eos_id)  # EOS where the tokenizer put none


def _encode_rows(ds: datasets.Dataset, start: int, stop: int, *, column: str, encode: Callable[[list], np.ndarray]
                 ) -> np.ndarray:
    return encode(ds[start:stop][column])


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
    encode = partial(_encode, tokenizer=tokenizer, backend=backend_encoder(tokenizer), eos_id=tokenizer.eos_token_id,
                     dtype=dtype)
    carry, blocks = np.zeros(0, dtype=dtype), 0
    with ArrowWriter(features=block_features(dtype, seq_length), path=cache_file) as writer:
        texts = ds.select_columns([spec.text_column])
        ranges = byte_ranges(texts, spec.text_column, max_bytes=CHUNK_BYTES, max_rows=DOCS_PER_CHUNK)
        read_and_encode = partial(_encode_rows, column=spec.text_column, encode=encode)
        for ids in map_ranges(texts, ranges, read_and_encode, num_workers):
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
