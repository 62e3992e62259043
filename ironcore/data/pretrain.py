"""Pretraining rows: tokenize documents, end each with EOS, concatenate, cut into seq_length blocks.

Labels are the input ids themselves (the model shifts them), so no `labels` column is stored; the
collator adds it. Blocks are cut within each `datasets.map` batch of 1000 documents (as in
transformers' `run_clm`), so at most one partial block per 1000 documents is dropped. Documents keep
the tokenizer's own special tokens (a LLaMA tokenizer adds BOS, GPT-2 adds nothing); EOS is appended
unless the tokenizer already ends documents with it. With `data.reset_position_ids` the collator
restarts position ids after every EOS.
"""

from __future__ import annotations

import itertools
from functools import partial

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from ironcore.config.schema import DatasetSpec
from ironcore.data.sft import TOKEN_FEATURE
from ironcore.data.sources import is_string, require_column

DOCS_PER_BATCH = 1000


def _blocks(batch, *, tokenizer, column: str, seq_length: int, eos_id: int) -> dict:
    texts = [t for t in batch[column] if t]
    docs = tokenizer(texts)["input_ids"] if texts else []
    docs = [ids if ids[-1:] == [eos_id] else ids + [eos_id] for ids in docs if ids]
    flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int32)
    n = len(flat) // seq_length
    return {"input_ids": flat[: n * seq_length].reshape(n, seq_length)}


def tokenize_pretrain(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    spec: DatasetSpec,
    seq_length: int,
    num_proc: int | None,
    label: str,
    cache_file: str,
) -> datasets.Dataset:
    """Blocks of exactly `seq_length` token ids (`input_ids`), documents separated by EOS."""
    check_pretrain_columns(ds, spec, label)
    fn = partial(_blocks, tokenizer=tokenizer, column=spec.text_column, seq_length=seq_length,
                 eos_id=tokenizer.eos_token_id)
    return ds.map(fn, batched=True, batch_size=DOCS_PER_BATCH, remove_columns=ds.column_names,
                  features=datasets.Features({"input_ids": TOKEN_FEATURE}), num_proc=num_proc,
                  cache_file_name=cache_file, desc=f"Pretrain tokenize {label}")


def check_pretrain_columns(ds: datasets.Dataset, spec: DatasetSpec, label: str) -> None:
    require_column(ds, spec.text_column, label, "a string (pretrain text)", is_string)
