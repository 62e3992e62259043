"""`ironcore preprocess` and `ironcore tokenizer train`: argparse wiring and handlers (the only printing code here).

`register(subparsers)` adds both subcommands; each sets `func`, a handler taking the parsed args and
returning an exit code. User mistakes surface as `IronCoreError`s for the top-level CLI to print.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from pathlib import Path

from ironcore.config.schema import DatasetSpec, RunConfig
from ironcore.data import report
from ironcore.data.prepare import prepare_data, required_task
from ironcore.data.sources import is_string, load_source, require_column
from ironcore.data.streaming import StreamMix
from ironcore.data.tokenizer import load_tokenizer, train_tokenizer
from ironcore.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `preprocess` and `tokenizer` subcommands."""
    pre = subparsers.add_parser("preprocess", help="tokenize a config's datasets once into the preprocessing cache")
    pre.add_argument("config", help="run config YAML")
    pre.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_length=512")
    pre.add_argument("--inspect", action="store_true", help="print counts, token statistics, fill and trained-token ratio")
    pre.add_argument("--inspect-documents", type=int, default=1000, metavar="N",
                     help="streaming entries: --inspect statistics over their first N documents")
    pre.add_argument("--preview", type=int, default=0, metavar="N", help="print N decoded training rows, trained spans in ⟦ ⟧")
    pre.set_defaults(func=preprocess_command)

    tok = subparsers.add_parser("tokenizer", help="tokenizer tools")
    actions = tok.add_subparsers(dest="tokenizer_command", required=True)
    train = actions.add_parser("train", help="train a byte-level BPE tokenizer (with chat template) into a directory")
    train.add_argument("output", help="directory to write (loadable with AutoTokenizer.from_pretrained)")
    train.add_argument("--vocab-size", type=int, default=8192)
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--files", nargs="+", default=(), help="json/jsonl/parquet/csv/txt/arrow files or globs")
    train.add_argument("--text-column", default="text", help="column of --files to read")
    train.add_argument("--config", help="run config whose train_datasets supply the text")
    train.add_argument("--override", action="append", default=[], help="dotted override for --config (repeatable)")
    train.add_argument("--max-texts", type=int, default=None, help="use at most this many texts")
    train.add_argument("--special-token", action="append", default=[], help="extra special token (repeatable)")
    train.add_argument("--force", action="store_true", help="overwrite an existing tokenizer in OUTPUT")
    train.set_defaults(func=tokenizer_train_command)


def _load_config(path: str, overrides) -> RunConfig:
    from ironcore.config import load_config

    return load_config(path, tuple(overrides))


def preprocess_command(args: argparse.Namespace) -> int:
    return preprocess(_load_config(args.config, args.overrides), inspect=args.inspect, preview=args.preview,
                      inspect_documents=args.inspect_documents)


def preprocess(run: RunConfig, *, inspect: bool = False, preview: int = 0, inspect_documents: int = 1000) -> int:
    """Build (or find) the cache entries of `run` and print a summary, statistics and previews (streaming entries
    are not cached: their statistics cover their first `inspect_documents` documents)."""
    if inspect_documents < 1:
        raise ConfigError(f"--inspect-documents must be at least 1, got {inspect_documents}")
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    if inspect and isinstance(prepared.train, StreamMix):
        for entry in prepared.train.entries:
            if entry.spec is not None:
                prepared.stats["datasets"][entry.name] = report.stream_stats(entry, prepared, inspect_documents)
    print(f"{prepared.task}: {prepared.stats['train_rows']} train rows, {prepared.stats['eval_rows']} eval rows, "
          f"{prepared.stats['test_rows']} test rows of {prepared.seq_length} tokens at most")
    if inspect:
        print(report.format_inspect(prepared))
    for k, text in enumerate(report.preview(prepared.train, tokenizer, preview)):
        print(f"===== train row {k} =====\n{text}")
    return 0


def tokenizer_train_command(args: argparse.Namespace) -> int:
    out = Path(args.output).expanduser()
    if (out / "tokenizer.json").exists() and not args.force:
        raise ConfigError(f"{out} already holds a tokenizer; pass --force to overwrite it")
    if args.files and args.config:
        raise ConfigError("give --files or --config, not both")
    if args.files:
        texts, source = _file_texts(args.files, args.text_column), f"{len(args.files)} file argument(s)"
    elif args.config:
        texts, source = _config_texts(_load_config(args.config, args.override)), args.config
    else:
        from ironcore.data.builtin_corpus import pretrain_texts

        texts, source = iter(pretrain_texts()), "the built-in corpus"
    if args.max_texts is not None:
        texts = itertools.islice(texts, args.max_texts)
    tokenizer = train_tokenizer(texts, out, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                                extra_special_tokens=tuple(args.special_token))
    print(f"Trained a byte-level BPE of {len(tokenizer)} tokens from {source} into {out}")
    print(f"special tokens: {', '.join(tokenizer.all_special_tokens)}; chat template: {out / 'chat_template.jinja'}")
    print(f"use it with model.vocab_name_or_path: {out} (and data.vocab_size >= {len(tokenizer)})")
    return 0


def _file_texts(patterns, column: str) -> Iterator[str]:
    for pattern in patterns:
        label = f"--files {pattern}"
        ds = load_source(DatasetSpec(dataset_path=pattern, text_column=column), task="pretrain", cache_dir=None, label=label)
        require_column(ds, column, label, "a string (pass --text-column)", is_string)
        yield from (t for t in ds[column] if t)


def _config_texts(run: RunConfig) -> Iterator[str]:
    """Every string of the config's training datasets: text, message contents, prompts and answers."""
    task = required_task(run)
    for i, spec in enumerate(run.data.train_datasets or ()):
        ds = load_source(spec, task=task, cache_dir=None, label=f"data.train_datasets[{i}]")
        columns = [c for c in dict.fromkeys((spec.text_column, spec.messages_column, spec.prompt_column, spec.response_column,
                                             spec.chosen_column, spec.rejected_column)) if c in ds.column_names]
        for row in ds.select_columns(columns):
            for value in row.values():
                yield from _strings(value)


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        yield from _strings(value.get("content", value.get("value")))
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)
