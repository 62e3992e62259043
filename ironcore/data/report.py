"""What `ironcore preprocess --inspect / --preview` shows: per-dataset statistics and decoded samples.

Statistics come from the cache entries' `COMPLETE.json` (computed once at build time; a streaming entry: from the
samples of its first `--inspect-documents` rows, tokenized for the report): rows, skipped
rows by reason, tokens, trained tokens and their ratio, mean / max row length, and fill (tokens /
(rows * seq_length): the packing efficiency of packed or padded rows), and for pretrain the stored
token type and bytes per token on disk. Previews decode rows with the
trained spans between `TRAIN_OPEN` and `TRAIN_CLOSE` and packed samples separated by `SAMPLE_BREAK`.
"""

from __future__ import annotations

import itertools

import datasets
from transformers import PreTrainedTokenizerBase

from ironcore.data.prepare import PreparedData, split_stats
from ironcore.data.streaming import Entry, SampleStream, StreamMix, materialize
from ironcore.data.sft import IGNORE_INDEX

TRAIN_OPEN, TRAIN_CLOSE = "⟦", "⟧"
SAMPLE_BREAK = "\n─── next packed sample ───\n"
_COLUMNS = ("dataset", "split", "rows", "skipped", "tokens", "trained", "trained%", "mean len", "max len", "fill%")


def inspect_table(prepared: PreparedData) -> list[tuple]:
    """One row per dataset entry and split (DPO: per side), in `_COLUMNS` order."""
    table = []
    for name, info in prepared.stats["datasets"].items():
        skipped = sum(v for k, v in info["status"].items() if k not in ("ok", "truncated", "documents"))
        for split, stats in info["splits"].items():
            sides = [(split, stats)] if "tokens" in stats else [(f"{split}/{s}", stats[s]) for s in ("chosen", "rejected")]
            for label, s in sides:
                table.append((name, label, stats["rows"], skipped, s["tokens"], s["trained_tokens"],
                              100 * s["trained_ratio"], s["mean_length"], s["max_length"], 100 * s["fill"]))
    return table


def format_inspect(prepared: PreparedData) -> str:
    """A plain-text table of `inspect_table` plus the mixture and totals."""
    rows = [_COLUMNS] + [tuple(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r) for r in inspect_table(prepared)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.rjust(w) if i > 1 else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    stats = prepared.stats
    mixture = ", ".join(f"{k} {v:.1%}" for k, v in stats["mixture"].items())
    lines.append(f"task {stats['task']}, seq_length {stats['seq_length']}; mixture: {mixture}")
    lines.append(f"train rows {stats['train_rows']}, eval rows {stats['eval_rows']}, test rows {stats['test_rows']}")
    for name, info in stats["datasets"].items():
        lines.append(f"{name}: {info['rows_in']} input rows; " + ", ".join(f"{k} {v}" for k, v in info["status"].items()))
        stored = [(split, st["bytes"] / st["tokens"]) for split, st in info["splits"].items()
                  if st.get("tokens") and "bytes" in st]  # a stream stores nothing
        if "token_dtype" in info and stored:
            per_token = ", ".join(f"{split} {b:.3f}" for split, b in stored)
            lines.append(f"{name}: tokens stored as {info['token_dtype']}; bytes per token on disk: {per_token}")
    return "\n".join(lines)


def stream_stats(entry: Entry, prepared: PreparedData, documents: int) -> dict:
    """A streaming entry's statistics in a cache entry's layout, over the samples of its first `documents` rows."""
    head, read = materialize(entry, prepared.task, prepared.seq_length, documents=documents)
    stats = split_stats(head, prepared.seq_length, prepared.task)
    return {"name": entry.name, "rows_in": read, "status": {"documents": read},
            "splits": {f"first {read} documents": stats}}


def mark_trained(ids: list[int], labels: list[int] | None, tokenizer: PreTrainedTokenizerBase,
                 positions: list[int] | None = None) -> str:
    """Decoded text with trained runs wrapped in TRAIN_OPEN/TRAIN_CLOSE and packed samples separated."""
    out, run, trained = [], [], None
    for k, token in enumerate(ids):
        is_trained = labels is not None and labels[k] != IGNORE_INDEX
        starts_sample = positions is not None and k > 0 and positions[k] == 0
        if run and (is_trained != trained or starts_sample):
            out.append(_decoded(run, trained, tokenizer))
            run = []
        if starts_sample:
            out.append(SAMPLE_BREAK)
        run.append(token)
        trained = is_trained
    if run:
        out.append(_decoded(run, trained, tokenizer))
    return "".join(out)


def _decoded(run: list[int], trained: bool, tokenizer) -> str:
    text = tokenizer.decode(run)
    return f"{TRAIN_OPEN}{text}{TRAIN_CLOSE}" if trained else text


def preview(dataset: datasets.Dataset | StreamMix, tokenizer: PreTrainedTokenizerBase, n: int) -> list[str]:
    """The first `n` rows decoded (a stream: its first `n` mixed samples); pretrain rows are fully trained, so they
    are shown unmarked."""
    out = []
    if isinstance(dataset, StreamMix):
        rows = itertools.islice(iter(SampleStream(dataset, rank=0, world_size=1, num_workers=0)), n)
    else:
        rows = (dataset[k] for k in range(min(n, len(dataset))))
    for row in rows:
        if "chosen_input_ids" in row:
            chosen = mark_trained(row["chosen_input_ids"], row["chosen_labels"], tokenizer)
            rejected = mark_trained(row["rejected_input_ids"], row["rejected_labels"], tokenizer)
            out.append(f"[chosen]\n{chosen}\n[rejected]\n{rejected}")
        else:
            out.append(mark_trained(row["input_ids"], row.get("labels"), tokenizer, row.get("position_ids")))
    return out
