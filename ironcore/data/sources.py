"""Dataset sources: a hub name, local files / folders / globs, or the built-in corpus, all as `datasets.Dataset`.

`dataset_path` is read as:
- `builtin` or `builtin:pretrain|sft|dpo`: the built-in corpus (`builtin` alone follows the task);
- a glob (`data/*.jsonl`), an existing file or an existing folder: local data. Files load through the
  `datasets` builder of their extension (json/jsonl, parquet, csv, txt (one row per line), arrow);
  a folder through `load_dataset(folder)` (which infers train/test splits from file names), or
  `load_from_disk` when it was written by `save_to_disk`;
- anything else: a Hub dataset name, with `subset` and `split`.
Every failure becomes one `DataError` line naming the dataset entry and the file, line or split.
"""

from __future__ import annotations

import glob
import json
import logging
import re
from pathlib import Path

import datasets
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError

from ironcore.config.schema import DatasetSpec
from ironcore.data import builtin_corpus
from ironcore.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".arrow": "arrow"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


def dataset_name(spec: DatasetSpec) -> str:
    """The entry's `name`, else a short name derived from its path, safe for a directory name."""
    raw = spec.name or Path(spec.dataset_path.rstrip("/*")).name.split(".")[0] or spec.dataset_path
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).strip("_") or "dataset"


def builtin_kind(spec: DatasetSpec, task: str) -> str | None:
    """`pretrain|sft|dpo` for a built-in entry, None for any other source."""
    path = spec.dataset_path
    if path != "builtin" and not path.startswith("builtin:"):
        return None
    kind = path.partition(":")[2] or task
    if kind not in builtin_corpus.KINDS:
        choices = ", ".join(f"builtin:{k}" for k in builtin_corpus.KINDS)
        raise ConfigError(f"dataset_path '{path}' is not one of builtin, {choices}")
    return kind


def _format_of(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s not in _COMPRESSION]
    return FORMATS.get(suffixes[-1].lower()) if suffixes else None


def local_files(path: str) -> list[Path] | None:
    """The files a local `dataset_path` names (a folder: every file under it), None for a Hub name."""
    expanded = Path(path).expanduser()
    if any(c in path for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(expanded), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"no files match {path}")
        return files
    if expanded.is_file():
        return [expanded]
    if expanded.is_dir():
        return sorted(p for p in expanded.rglob("*") if p.is_file() and not p.name.startswith("."))
    if path.startswith(("/", "./", "../", "~")) or _format_of(expanded):
        raise DataError(f"dataset file or folder {path} does not exist")
    return None


def source_fingerprint(spec: DatasetSpec, task: str) -> dict:
    """What identifies the raw data without reading it: corpus version, file stats, or the Hub name."""
    if builtin_kind(spec, task):
        return builtin_corpus.corpus_fingerprint()
    files = local_files(spec.dataset_path)
    if files is None:
        return {"hub": spec.dataset_path}
    return {"files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]}


def load_source(spec: DatasetSpec, *, task: str, cache_dir: str | None, label: str) -> datasets.Dataset:
    """The raw rows of one dataset entry (first `max_samples` rows when set)."""
    if not spec.dataset_path:
        raise ConfigError(f"{label}: dataset_path is empty")
    kind = builtin_kind(spec, task)
    if kind:
        ds = builtin_corpus.builtin_dataset(kind)
    else:
        files = local_files(spec.dataset_path)
        if files is None:
            ds = _load_hub(spec, cache_dir, label)
        elif Path(spec.dataset_path).expanduser().is_dir():
            ds = _load_folder(Path(spec.dataset_path).expanduser(), spec, cache_dir, label)
        else:
            ds = _load_files(files, spec, cache_dir, label)
    if spec.max_samples is not None and len(ds) > spec.max_samples:
        ds = ds.select(range(spec.max_samples))
    logger.info("%s: %d rows from %s", label, len(ds), spec.dataset_path)
    return ds


def _builder(files: list[Path], label: str) -> str:
    formats = {_format_of(f) for f in files}
    if None in formats:
        bad = next(f for f in files if _format_of(f) is None)
        raise DataError(f"{label}: {bad} is not a supported data file (use {', '.join(sorted(FORMATS))})")
    if len(formats) > 1:
        raise DataError(f"{label}: files of several formats ({', '.join(sorted(formats))}); use one format per dataset entry")
    return formats.pop()


def _load_files(files: list[Path], spec: DatasetSpec, cache_dir: str | None, label: str) -> datasets.Dataset:
    builder = _builder(files, label)
    if all(f.stat().st_size == 0 for f in files):
        raise DataError(f"{label}: {', '.join(map(str, files))} is empty")
    data_files = {"train": [str(f) for f in files]}
    try:
        return datasets.load_dataset(builder, data_files=data_files, split=spec.split, cache_dir=cache_dir)
    except DatasetGenerationError as err:
        if builder == "json":
            _raise_bad_json_line(files, label)
        raise DataError(f"{label}: cannot read {', '.join(map(str, files))}: {_cause(err)}") from None
    except ValueError as err:
        raise _split_error(err, spec, label) from None


def _load_folder(folder: Path, spec: DatasetSpec, cache_dir: str | None, label: str) -> datasets.Dataset:
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if spec.split not in loaded:
                names = ", ".join(loaded)
                raise DataError(f"{label}: split '{spec.split}' does not exist in {folder}; available splits: {names}")
            return loaded[spec.split]
        return loaded
    files = [f for f in local_files(str(folder)) or [] if _format_of(f)]
    if not files:
        raise DataError(f"{label}: folder {folder} holds no data files ({', '.join(sorted(FORMATS))})")
    builder = _builder(files, label)
    try:
        return datasets.load_dataset(builder, data_dir=str(folder), split=spec.split, cache_dir=cache_dir)
    except DatasetGenerationError as err:
        if builder == "json":
            _raise_bad_json_line(files, label)
        raise DataError(f"{label}: cannot read {folder}: {_cause(err)}") from None
    except ValueError as err:
        raise _split_error(err, spec, label) from None


def _load_hub(spec: DatasetSpec, cache_dir: str | None, label: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(spec.dataset_path, spec.subset, split=spec.split, cache_dir=cache_dir)
    except ConnectionError:
        raise DataError(
            f"{label}: cannot reach the Hub for dataset '{spec.dataset_path}'; give a local path (file, folder or glob)"
        ) from None
    except DatasetNotFoundError as err:
        raise DataError(f"{label}: dataset '{spec.dataset_path}' is neither a local path nor on the Hub: {_first(err)}") from None
    except ValueError as err:
        raise _split_error(err, spec, label) from None


def _split_error(err: ValueError, spec: DatasetSpec, label: str) -> DataError:
    found = re.search(r"Should be one of (\[.*?\])", str(err))
    if not found:
        return DataError(f"{label}: {_first(err)}")
    names = ", ".join(json.loads(found.group(1).replace("'", '"')))
    return DataError(f"{label}: split '{spec.split}' does not exist in {spec.dataset_path}; available splits: {names}")


def _raise_bad_json_line(files: list[Path], label: str) -> None:
    """Find the first line that is not valid JSON and name it (datasets only says 'error generating')."""
    for path in files:
        if path.suffix.lower() == ".json" and _is_json_document(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{label}: {path} line {number} is not valid JSON ({err.msg})") from None


def _is_json_document(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


def _cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return _first(err)


def _first(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# ---- column checks -------------------------------------------------------------------------------


def describe(feature) -> str:
    """A short human name for a `datasets` feature type."""
    if isinstance(feature, datasets.Value):
        return feature.dtype
    if isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
        return f"list of {describe(feature.feature)}"
    if isinstance(feature, dict):
        return "struct{" + ", ".join(feature) + "}"
    return type(feature).__name__.lower()


def is_string(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def is_messages(feature) -> bool:
    """A list of {role, content} (or ShareGPT {from, value}) structs."""
    if not isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
        return False
    inner = feature.feature
    return isinstance(inner, dict) and ({"role", "content"} <= set(inner) or {"from", "value"} <= set(inner))


def is_json(feature) -> bool:
    """Columns whose rows mix types (say strings and message lists) load as `Json`; rows are checked one by one."""
    return isinstance(feature, datasets.Json)


def require_column(ds: datasets.Dataset, column: str, label: str, expected: str, check) -> None:
    """DataError unless `column` exists and `check(feature)` accepts its type."""
    if column not in ds.column_names:
        raise DataError(f"{label}: no column '{column}' ({expected}); columns: {', '.join(ds.column_names)}")
    feature = ds.features[column]
    if not check(feature):
        raise DataError(f"{label}: column '{column}' holds {describe(feature)}, expected {expected}")
