"""From a RunConfig and a tokenizer to tokenized train / eval / test datasets, through the preprocessing cache.

Each dataset entry is tokenized once into `<preprocessed_dir>/<name>-<fingerprint>/` (one
`save_to_disk` folder per split plus `COMPLETE.json` with its statistics). The fingerprint covers
everything that changes the rows: the entry's fields (except `name` and `ratio`), its files (path,
size, mtime) or Hub name or the built-in corpus version, the tokenizer (its serialized content,
special tokens and chat template), `seq_length`, the task, the split ratios, and for SFT/DPO the
truncation rule and packing (not `num_workers`: pretrain blocks are cut from the split's whole token
stream, the same for any worker count; see `pretrain`). A later run (or
`ironcore preprocess`) with the same inputs loads the folders and tokenizes nothing; any change
builds a new entry. Mixing (`mixing.mix`) happens after loading, so changing a ratio or the seed
never re-tokenizes.

Storage: pretrain blocks are fixed-size lists of uint16 (uint32 when the tokenizer has more than 65,536
ids; `pretrain.token_dtype`), 2 (4) bytes a token where cache version 2 stored int32 lists with per-row
offsets; SFT/DPO ids and labels take 2 + 2 bytes a token where version 3 took 4 + 4 (`sft.sample_features`).
Entries of an earlier cache version (`CACHE_VERSIONS`, per task) are never read: their fingerprint differs,
so the entry is rebuilt, with a log line naming the old folder (which can then be deleted).

Streaming entries (`streaming: true`) are never cached: a training stream joins the mixture as a
`streaming.Entry` tokenized in the loader workers; an eval/test stream is read up to its `max_samples` documents
and tokenized in memory (`streaming.py`).

Splits: every training entry is split into train / eval / test rows by `data.splits` (normalised),
with a fixed seed (`SPLIT_SEED`, independent of `init.seed`, so held-out rows stay the same across
runs). Pretrain entries are split by document before blocks are cut; SFT/DPO entries by sample after
filtering. When `eval_datasets` (or `test_datasets`) are given they replace the eval (test) split
and its share stays in training. Each non-train split takes ceil(n * ratio) rows, at least one.

Multi-process: `prepare_data` is safe to call from every rank. A file lock per cache entry makes the
first caller build while the others wait and then load; under `accelerator.main_process_first()` the
main process builds and the others find the entry complete.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from ironcore.config.schema import DatasetSpec, RunConfig
from ironcore.data import dpo, mixing, pretrain, sft, streaming
from ironcore.data.cache import build_atomically, fingerprint, is_complete
from ironcore.data.sources import check_source, dataset_name, load_source, source_fingerprint
from ironcore.data.tokenizer import cache_root, tokenizer_fingerprint
from ironcore.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Per task, so that a layout change rebuilds only the entries it changes. 2: SFT skips empty answers, DPO skips
# identical pairs; 3: uint16/uint32 pretrain blocks; 4: SFT/DPO ids in uint16/uint32 and labels in int16/int32.
CACHE_VERSIONS = {"pretrain": 3, "sft": 4, "dpo": 4}
SPLIT_SEED = 1234
SPLITS = ("train", "eval", "test")


@dataclass
class PreparedData:
    """Tokenized datasets ready for the loaders; `eval` / `test` are None when no rows are held out."""

    train: datasets.Dataset | streaming.StreamMix
    eval: datasets.Dataset | None
    test: datasets.Dataset | None
    task: str
    seq_length: int
    stats: dict = field(default_factory=dict)


def required_task(run: RunConfig) -> str:
    """The resolved task (`data.task_type`, or the one its entries name): reading data needs one."""
    if run.data.task_type is None:
        raise ConfigError("data.task_type is not set (nor on any dataset entry); choose pretrain, sft or dpo")
    return run.data.task_type


def split_fractions(run: RunConfig) -> dict[str, float]:
    """Normalised train/eval/test shares of the training entries; given eval/test datasets return theirs to train."""
    splits = run.data.splits
    if len(splits) != 3 or any(s < 0 for s in splits) or sum(splits) <= 0:
        raise ConfigError(f"data.splits must be three non-negative ratios (train, eval, test), got {list(splits)}")
    train, held_eval, held_test = splits
    if run.data.eval_datasets:
        train, held_eval = train + held_eval, 0.0
    if run.data.test_datasets:
        train, held_test = train + held_test, 0.0
    if train <= 0:
        raise ConfigError(f"data.splits {list(splits)} leaves no rows for training")
    total = train + held_eval + held_test
    return {name: share / total for name, share in zip(SPLITS, (train, held_eval, held_test), strict=True) if share > 0}


def split_rows(n: int, fractions: dict[str, float], label: str) -> dict[str, np.ndarray]:
    """Row indices per split from a fixed-seed permutation; train keeps file order, held-out rows stay shuffled."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    counts = {name: max(1, math.ceil(n * share)) for name, share in fractions.items() if name != "train"}
    if "train" in fractions:
        counts = {"train": n - sum(counts.values()), **counts}
    else:
        counts = {name: n for name in counts}
    if counts.get("train", 1) <= 0:
        raise DataError(f"{label}: {n} rows are too few for data.splits {fractions}")
    out, start = {}, 0
    for name, count in counts.items():
        rows = order[start : start + count]
        out[name] = np.sort(rows) if name == "train" else rows
        start += count
    return out


def preprocessed_root(run: RunConfig) -> Path:
    return Path(run.data.preprocessed_dir).expanduser() if run.data.preprocessed_dir else cache_root(run.data) / "preprocessed"


def _datasets_cache(run: RunConfig) -> str | None:
    return str(Path(run.data.cache_dir).expanduser() / "datasets") if run.data.cache_dir else None


def prepare_data(run: RunConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Tokenized (cached) train / eval / test datasets of the run, the training entries mixed by ratio."""
    task, seq_length = required_task(run), run.data.seq_length
    if not run.data.train_datasets:
        raise ConfigError("data.train_datasets is empty; give at least one dataset (see configs/data/)")
    ratios = [spec.ratio for spec in run.data.train_datasets]
    mixing.check_ratios(ratios)  # a config mistake must not cost (or leave behind) a tokenized cache
    _check_sources(run, task)
    context = _Context(run, tokenizer, task, seq_length, tokenizer_fingerprint(tokenizer))
    fractions = split_fractions(run)
    names = _unique_names(run.data.train_datasets)
    held: dict[str, list[datasets.Dataset]] = {"eval": [], "test": []}
    train_parts, entry_stats = [], {}
    for i, (spec, name) in enumerate(zip(run.data.train_datasets, names, strict=True)):
        if spec.streaming:
            train_parts.append(context.stream(spec, name, _label("train", i, name)))
            entry_stats[name] = {"name": name, "dataset_path": spec.dataset_path, "streaming": True,
                                 "rows_in": "streamed", "status": {}, "splits": {}}  # `--inspect` reads its head
            continue
        parts, info = context.entry(spec, name, _label("train", i, name), fractions)
        train_parts.append(parts["train"])
        for split in ("eval", "test"):
            if split in parts:
                held[split].append(parts[split])
        entry_stats[name] = info
    for role in ("eval", "test"):
        specs = getattr(run.data, f"{role}_datasets") or ()
        for i, (spec, name) in enumerate(zip(specs, _unique_names(specs), strict=True)):
            if spec.streaming:  # the first max_samples documents (or the whole named split), in memory
                part, read = streaming.materialize(context.stream(spec, name, _label(role, i, name)), task, seq_length)
                held[role].append(part)
                entry_stats[f"{role}:{name}"] = {"name": name, "dataset_path": spec.dataset_path, "streaming": True,
                                                 "rows_in": read, "status": {"documents": read},
                                                 "splits": {role: split_stats(part, seq_length, task)}}
                continue
            parts, info = context.entry(spec, name, _label(role, i, name), {role: 1.0})
            held[role].append(parts[role])
            entry_stats[f"{role}:{name}"] = info
    if any(spec.streaming for spec in run.data.train_datasets):
        train = mixing.mix_streams(train_parts, ratios, names, seed=run.init.seed, task=task)
    else:
        train = mixing.mix(train_parts, ratios, names, seed=run.init.seed)
    evaluation, test = _combine(held["eval"]), _combine(held["test"])
    total = sum(ratios)
    stats = {
        "task": task,
        "seq_length": seq_length,
        "train_rows": len(train) if isinstance(train, datasets.Dataset) else "streamed",
        "eval_rows": len(evaluation) if evaluation is not None else 0,
        "test_rows": len(test) if test is not None else 0,
        "mixture": {name: (r / total if total else 0.0) for name, r in zip(names, ratios, strict=True)},
        "datasets": entry_stats,
    }
    return PreparedData(train=train, eval=evaluation, test=test, task=task, seq_length=seq_length, stats=stats)


def _unique_names(specs) -> list[str]:
    names = [dataset_name(s) for s in specs]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def _label(role: str, i: int, name: str) -> str:
    return f"data.{role}_datasets[{i}] '{name}'"


def _check_sources(run: RunConfig, task: str) -> None:
    """Every entry's path, files and format, before the first entry is tokenized: a missing eval file must
    not wait for (or leave behind) the training set's tokenization."""
    for role in SPLITS:
        specs = getattr(run.data, f"{role}_datasets") or ()
        for i, (spec, name) in enumerate(zip(specs, _unique_names(specs), strict=True)):
            check_source(spec, task=task, label=_label(role, i, name))


def _combine(parts: list[datasets.Dataset]) -> datasets.Dataset | None:
    """Held-out rows of every entry in one dataset, shuffled so the first N rows sample all entries."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return datasets.concatenate_datasets(parts).shuffle(seed=SPLIT_SEED)


@dataclass
class _Context:
    """What every cache entry of one prepare_data call shares."""

    run: RunConfig
    tokenizer: PreTrainedTokenizerBase
    task: str
    seq_length: int
    tokenizer_hash: str

    def key(self, spec: DatasetSpec, fractions: dict[str, float], version: int | None = None) -> str:
        """The entry's fingerprint; `version` gives the one an earlier cache version computed for the same inputs."""
        version = CACHE_VERSIONS[self.task] if version is None else version
        payload = {
            "version": version,
            "task": self.task,
            "seq_length": self.seq_length,
            "tokenizer": self.tokenizer_hash,
            # name and ratio do not change the tokens; a cached entry is never streaming
            "spec": {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("name", "ratio", "streaming")},
            "source": source_fingerprint(spec, self.task),
            "splits": fractions,
            "split_seed": SPLIT_SEED,
        }
        if self.task != "pretrain":
            payload["truncation"] = self.run.data.truncation
        elif version < 3:  # versions 1-2 cut blocks per worker shard
            payload["workers"] = self.run.data.num_workers
        if self.task == "sft":
            payload["pack"] = self.run.data.pack_sequences
        return fingerprint(payload)

    def stream(self, spec: DatasetSpec, name: str, label: str) -> streaming.Entry:
        """A streaming entry: its rows opened (nothing read yet) and the encoder the loader workers run."""
        rows = streaming.open_rows(spec, task=self.task, cache_dir=_datasets_cache(self.run), label=label)
        encode = streaming.encoder(spec, self.task, self.tokenizer, seq_length=self.seq_length,
                                   truncation=self.run.data.truncation, label=label)
        return streaming.Entry(name=name, label=label, spec=spec, rows=rows, encode=encode)

    def entry(self, spec: DatasetSpec, name: str, label: str, fractions: dict[str, float]):
        """The entry's split datasets (from the cache, built first if needed) and its statistics."""
        root = preprocessed_root(self.run)
        final = root / f"{name}-{self.key(spec, fractions)[:16]}"
        if not is_complete(final):
            self._note_outdated(root, spec, name, label, fractions)
        info = build_atomically(final, partial(self._build, spec, name, label, fractions))
        logger.info("%s: %s", label, ", ".join(f"{s} {info['splits'][s]['rows']} rows" for s in info["splits"]))
        return {split: datasets.load_from_disk(str(final / split)) for split in info["splits"]}, info

    def _note_outdated(self, root: Path, spec: DatasetSpec, name: str, label: str, fractions: dict) -> None:
        """Warn about the entry an earlier cache version built for the same inputs: it is rebuilt (minutes to hours
        for a big corpus, and the disk it takes twice), not read."""
        current = CACHE_VERSIONS[self.task]
        for version in range(current - 1, 0, -1):
            old = root / f"{name}-{self.key(spec, fractions, version)[:16]}"
            if is_complete(old):
                logger.warning("%s: rebuilding; %s was built by cache version %d (this is version %d) and can be deleted",
                            label, old, version, current)
                return

    def _build(self, spec: DatasetSpec, name: str, label: str, fractions: dict[str, float], tmp: Path) -> dict:
        logger.info("%s: tokenizing into %s", label, tmp)
        raw = load_source(spec, task=self.task, cache_dir=_datasets_cache(self.run), label=label)
        if len(raw) == 0:
            raise DataError(f"{label}: the dataset has no rows")
        work = tmp / "work"
        work.mkdir()
        if self.task == "pretrain":
            parts, counts = self._blocks(raw, spec, label, fractions, work)
        else:
            parts, counts = self._samples(raw, spec, label, fractions, work)
        for split, ds in parts.items():
            ds.save_to_disk(str(tmp / split))
        names = list(parts)
        del parts
        shutil.rmtree(work)
        splits = {s: split_stats(datasets.load_from_disk(str(tmp / s)), self.seq_length, self.task) for s in names}
        for s in names:
            splits[s]["bytes"] = sum(f.stat().st_size for f in (tmp / s).glob("*.arrow"))
        info = {"name": name, "label": label, "dataset_path": spec.dataset_path, "task": self.task,
                "cache_version": CACHE_VERSIONS[self.task], "rows_in": len(raw), "status": counts, "splits": splits}
        info["token_dtype"] = pretrain.token_dtype(self.tokenizer)
        if self.task != "pretrain":
            info["label_dtype"] = sft.label_dtype(self.tokenizer)
        return info

    def _blocks(self, raw, spec, label, fractions, work: Path):
        """Pretrain: split documents, then tokenize and cut each split into blocks."""
        pretrain.check_pretrain_columns(raw, spec, label)
        parts = {
            split: pretrain.tokenize_pretrain(raw.select(rows), self.tokenizer, spec=spec, seq_length=self.seq_length,
                                              num_workers=self.run.data.num_workers, label=label,
                                              cache_file=str(work / f"{split}.arrow"))
            for split, rows in split_rows(len(raw), fractions, label).items()
        }
        if len(next(iter(parts.values()))) == 0:
            raise DataError(f"{label}: no rows left after filtering: the documents hold fewer tokens "
                            f"than one block of {self.seq_length}")
        return parts, {"documents": len(raw)}

    def _samples(self, raw, spec, label, fractions, work: Path):
        """SFT / DPO: tokenize every row, drop skipped ones (counted), split, pack (SFT, if asked)."""
        tokenize = sft.tokenize_sft if self.task == "sft" else dpo.tokenize_dpo
        rows = tokenize(raw, self.tokenizer, spec=spec, seq_length=self.seq_length, truncation=self.run.data.truncation,
                        num_workers=self.run.data.num_workers, label=label, cache_file=str(work / "tokenized.arrow"))
        counts = sft.status_counts(np.asarray(rows.data.column("status")))
        kept = rows.filter(_is_kept, input_columns="status", batched=True, keep_in_memory=True).remove_columns("status")
        if len(kept) == 0:  # before the warning below: the error alone says it, on the one line a bad input gets
            reasons = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise DataError(f"{label}: no rows of {spec.dataset_path} left after filtering ({reasons})")
        skipped = {k: v for k, v in counts.items() if k not in ("ok", "truncated")}
        if skipped:
            logger.warning("%s: skipped %s", label, ", ".join(f"{v} rows ({k})" for k, v in skipped.items()))
        parts = {split: kept.select(idx) for split, idx in split_rows(len(kept), fractions, label).items()}
        if self.task == "sft" and self.run.data.pack_sequences:
            parts = {split: sft.pack(ds, seq_length=self.seq_length, cache_file=str(work / f"packed-{split}.arrow"))
                     for split, ds in parts.items()}
        return parts, counts


def _is_kept(statuses: list[int]) -> list[bool]:
    return [s in sft.KEPT for s in statuses]


def split_stats(ds: datasets.Dataset, seq_length: int, task: str) -> dict:
    """Rows, tokens, trained tokens, lengths and fill (tokens / (rows * seq_length)) of a cached split."""
    if task == "dpo":
        sides = {side: _token_stats(ds, f"{side}_input_ids", f"{side}_labels", seq_length) for side in dpo.SIDES}
        return {"rows": len(ds), **sides}
    labels = "labels" if "labels" in ds.column_names else None
    return {"rows": len(ds), **_token_stats(ds, "input_ids", labels, seq_length)}


def _token_stats(ds: datasets.Dataset, ids: str, labels: str | None, seq_length: int) -> dict:
    table = ds.data
    lengths = pc.list_value_length(table.column(ids)).to_numpy(zero_copy_only=False) if len(ds) else np.zeros(0)
    tokens = int(lengths.sum())
    trained = tokens
    if labels is not None and len(ds):
        trained = int(pc.sum(pc.not_equal(pc.list_flatten(table.column(labels)), sft.IGNORE_INDEX)).as_py() or 0)
    out = {
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_ratio": trained / tokens if tokens else 0.0,
        "mean_length": float(lengths.mean()) if len(ds) else 0.0,
        "max_length": int(lengths.max()) if len(ds) else 0,
        "fill": tokens / (len(ds) * seq_length) if len(ds) else 0.0,
    }
    if "position_ids" in ds.column_names and len(ds):
        out["samples"] = int(pc.sum(pc.equal(pc.list_flatten(table.column("position_ids")), 0)).as_py())
    return out
