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

import bz2
import glob
import gzip
import json
import logging
import lzma
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError

from ironcore.config.schema import DatasetSpec
from ironcore.data import builtin_corpus
from ironcore.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".arrow": "arrow"}
_COMPRESSION = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
_SAVED_FILES = ("state.json", "dataset_info.json")  # what `Dataset.save_to_disk` writes beside its arrow shards
# What reading a user's file can raise: from datasets, pyarrow, the decompressors and the codecs (UnicodeDecodeError is
# a ValueError). Raised anywhere inside a load, they are turned into one DataError naming the file.
_READ_ERRORS = (DatasetGenerationError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, pa.ArrowException)


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


def check_source(spec: DatasetSpec, *, task: str, label: str) -> None:
    """What can be checked without reading the data: a path is given, its files exist, in one supported format.

    `prepare_data` runs it on every entry before tokenizing the first, so a missing eval file is
    reported at once rather than after the training set has been tokenized.
    """
    if not spec.dataset_path:
        raise ConfigError(f"{label}: dataset_path is empty")
    if builtin_kind(spec, task):
        return
    try:
        files = local_files(spec.dataset_path)
    except DataError as err:
        raise DataError(f"{label}: {err}") from None
    if files is None:  # a Hub name: only loading it tells
        return
    folder = Path(spec.dataset_path).expanduser()
    if folder.is_dir():
        if _is_saved_folder(folder, label):
            return
        files = _data_files(folder, label)
    _builder(files, label)


def load_source(spec: DatasetSpec, *, task: str, cache_dir: str | None, label: str) -> datasets.Dataset:
    """The raw rows of one dataset entry (first `max_samples` rows when set)."""
    check_source(spec, task=task, label=label)
    kind = builtin_kind(spec, task)
    if kind:
        ds = builtin_corpus.builtin_dataset(kind)
    else:
        files = local_files(spec.dataset_path)
        if files is None:
            ds = load_hub(spec, cache_dir, label)
        elif Path(spec.dataset_path).expanduser().is_dir():
            ds = _load_folder(Path(spec.dataset_path).expanduser(), spec, cache_dir, label)
        else:
            ds = _load_files(files, spec, cache_dir, label)
    if spec.max_samples is not None and len(ds) > spec.max_samples:
        ds = ds.select(range(spec.max_samples))
    logger.info("%s: %d rows from %s", label, len(ds), spec.dataset_path)
    return ds


def local_format(spec: DatasetSpec, label: str) -> tuple[str, list[Path]] | None:
    """The `datasets` builder and data files of a local entry (a folder: its data files), None for a Hub name."""
    files = local_files(spec.dataset_path)
    if files is None:
        return None
    folder = Path(spec.dataset_path).expanduser()
    files = _data_files(folder, label) if folder.is_dir() else files
    return _builder(files, label), files


def _builder(files: list[Path], label: str) -> str:
    formats = {_format_of(f) for f in files}
    if None in formats:
        bad = next(f for f in files if _format_of(f) is None)
        raise DataError(f"{label}: {bad} is not a supported data file (use {', '.join(sorted(FORMATS))})")
    if len(formats) > 1:
        raise DataError(f"{label}: files of several formats ({', '.join(sorted(formats))}); use one format per dataset entry")
    return formats.pop()


def _data_files(folder: Path, label: str) -> list[Path]:
    files = [f for f in local_files(str(folder)) or [] if _format_of(f)]
    if not files:
        raise DataError(f"{label}: folder {folder} holds no data files ({', '.join(sorted(FORMATS))})")
    return files


def _is_saved_folder(folder: Path, label: str) -> bool:
    """Whether `folder` was written by `save_to_disk`; a DataError for one that lacks a file it needs (read as a
    folder of data files instead, it would be refused as "files of several formats", which misleads)."""
    if (folder / "dataset_dict.json").is_file():
        return True
    present = [name for name in _SAVED_FILES if (folder / name).is_file()]
    missing = [name for name in _SAVED_FILES if name not in present]
    if present and missing:
        raise DataError(f"{label}: {folder} is an incomplete save_to_disk folder: it holds {present[0]} but no "
                        f"{missing[0]} (write it again with Dataset.save_to_disk)")
    return bool(present)


def _load_files(files: list[Path], spec: DatasetSpec, cache_dir: str | None, label: str) -> datasets.Dataset:
    builder = _builder(files, label)
    if all(f.stat().st_size == 0 for f in files):
        raise DataError(f"{label}: {', '.join(map(str, files))} is empty")
    return _read(builder, files, ", ".join(map(str, files)), spec, label, cache_dir=cache_dir,
                 data_files={"train": [str(f) for f in files]})


def _load_folder(folder: Path, spec: DatasetSpec, cache_dir: str | None, label: str) -> datasets.Dataset:
    if _is_saved_folder(folder, label):
        return _load_saved(folder, spec, label)
    files = _data_files(folder, label)
    return _read(_builder(files, label), files, str(folder), spec, label, cache_dir=cache_dir, data_dir=str(folder))


def _read(builder: str, files: list[Path], source: str, spec: DatasetSpec, label: str, **where) -> datasets.Dataset:
    """`load_dataset(builder, ...)` of local files, validated; any failure to read them is one DataError."""
    try:
        with _quiet_builder(builder):
            ds = datasets.load_dataset(builder, split=spec.split, **where)
        ds.data.validate(full=True)  # invalid UTF-8 passes the JSON reader; found here, not by the tokenizer later
    except _READ_ERRORS as err:
        raise _read_error(err, files, source, spec, label) from None
    return ds


def _load_saved(folder: Path, spec: DatasetSpec, label: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if spec.split not in loaded:
                names = ", ".join(loaded)
                raise DataError(f"{label}: split '{spec.split}' does not exist in {folder}; available splits: {names}")
            loaded = loaded[spec.split]
        loaded.data.validate(full=True)
    except _READ_ERRORS as err:
        files = sorted(f for f in folder.rglob("*") if f.suffix in (".json", ".arrow"))
        raise _read_error(err, files, str(folder), spec, label) from None
    return loaded


@contextmanager
def _quiet_builder(builder: str) -> Iterator[None]:
    """datasets' file builders log each read error before raising it; raised, it becomes our one line, so only that
    line reaches the user. (They log nothing else with the arguments given here.)"""
    log = logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def load_hub(spec: DatasetSpec, cache_dir: str | None, label: str, *, streaming: bool = False
             ) -> datasets.Dataset | datasets.IterableDataset:
    """A Hub dataset's split (streamed: nothing downloaded up front); unreachable, unknown or no such split: one line."""
    try:
        if streaming:
            return datasets.load_dataset(spec.dataset_path, spec.subset, split=spec.split, streaming=True)
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


# ---- naming the file that cannot be read ---------------------------------------------------------


def _read_error(err: BaseException, files: list[Path], source: str, spec: DatasetSpec, label: str) -> DataError:
    """One line for a failed load: the unknown split, no rows, or the first file that cannot be read and why.

    datasets often says only "An error occurred while generating the dataset" or pyarrow's reason
    without the file, so each file is read through once more (on this failure path only) to find it.
    """
    if isinstance(err, ValueError) and "Should be one of" in str(err):
        return _split_error(err, spec, label)
    if "corresponds to no data" in str(err):
        return DataError(f"{label}: {source} holds no rows")
    for path in files:
        problem = _file_problem(path)
        if problem:
            return DataError(f"{label}: {path} {problem}")
    return DataError(f"{label}: cannot read {source}: {_cause(err)}")


def _file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as data of its format (`line 3 is not valid JSON (...)`), None when it can."""
    fmt = _format_of(path)
    compression = _COMPRESSION.get(path.suffix.lower())
    kind = f"{compression}-compressed {fmt}" if compression else fmt
    try:
        if fmt in ("parquet", "arrow"):
            with _open_data(path) as fh:
                _read_columnar(fh, fmt)
            return None
        return _lines_problem(path, fmt)
    except ImportError as err:
        return f"cannot be read as {kind}: {err}"
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, pa.ArrowException) as err:
        return f"cannot be read as {kind} ({_first(err)})"


def _open_data(path: Path) -> BinaryIO:
    """The file's bytes, decompressed by its suffix (as datasets does)."""
    suffix = path.suffix.lower()
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise ImportError("reading .zst files needs the zstandard package (pip install zstandard)") from None
        return zstandard.open(path, "rb")
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(suffix, open)
    return opener(path, "rb")


def _read_columnar(fh: BinaryIO, fmt: str) -> None:
    """Read and fully validate every batch of a parquet or arrow (IPC stream or file) file."""
    if fmt == "parquet":
        parquet = pq.ParquetFile(fh)
        for group in range(parquet.num_row_groups):
            parquet.read_row_group(group).validate(full=True)
        return
    try:
        batches = iter(pa.ipc.open_stream(fh))
    except (OSError, pa.ArrowInvalid):
        reader = pa.ipc.open_file(fh)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    for batch in batches:
        batch.validate(full=True)


def _lines_problem(path: Path, fmt: str) -> str | None:
    """The first line that is not UTF-8 (or, for JSON Lines, not JSON); for csv, what pandas cannot parse."""
    with _open_data(path) as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number} is not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
            if fmt != "json" or not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                if _is_json_document(path):
                    return None
                return f"line {number} is not valid JSON ({err.msg})"
    return _csv_problem(path) if fmt == "csv" else None


def _is_json_document(path: Path) -> bool:
    with _open_data(path) as fh:
        try:
            json.loads(fh.read().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
    return True


def _csv_problem(path: Path) -> str | None:
    import pandas as pd  # datasets' csv builder reads with pandas; only a failed load gets here

    try:
        for _ in pd.read_csv(path, chunksize=10_000):
            pass
    except ValueError as err:  # pandas' ParserError and EmptyDataError are ValueErrors
        return f"cannot be read as csv ({_first(err)})"
    return None


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
