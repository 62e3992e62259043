"""Atomic, locked, fingerprinted cache directories (tokenized datasets, the built-in tokenizer).

A cache entry is a directory that is complete only when it holds `COMPLETE.json`. It is built in a
temporary sibling directory, the marker is written last, and the directory is renamed into place, so
a killed build leaves either nothing or a `.tmp-*` directory that the next build deletes. A file lock
per entry makes concurrent builders (several ranks, two runs) wait for the first one and then reuse
its result; with `accelerator.main_process_first()` the lock is simply never contended.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

logger = logging.getLogger(__name__)

MARKER = "COMPLETE.json"


def fingerprint(payload: Any) -> str:
    """A stable hex digest of a JSON-serialisable description of everything that shapes a result."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def build_atomically(final: Path, build: Callable[[Path], dict]) -> dict:
    """Return the marker of `final`, building it first with `build(tmp_dir) -> info` when incomplete.

    `build` writes into the empty directory it is given; its returned dict becomes the marker.
    Anything left by an earlier, interrupted build (a `.tmp-*` sibling, or `final` without a marker)
    is deleted first, so it can never be mistaken for a result.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if is_complete(final):
            return read_marker(final)
        if final.exists():
            logger.warning("Removing incomplete cache entry %s (an earlier build was interrupted)", final)
            shutil.rmtree(final)
        for stale in final.parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            info = build(tmp)
            (tmp / MARKER).write_text(json.dumps(info, indent=1, sort_keys=True, default=str))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return info
