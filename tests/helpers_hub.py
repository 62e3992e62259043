"""A Hugging Face Hub cache written in the Hub's own layout, so Hub names resolve offline through the real
huggingface_hub code (tests/conftest.py sets HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
from transformers import AutoTokenizer

REVISION = "0123456789abcdef0123456789abcdef01234567"


def checkpoint_dir(path: Path, model, tok_dir: Path | None) -> Path:
    model.save_pretrained(path)
    if tok_dir is not None:
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path)
    return path


def into_hub_cache(cache: Path, repo_id: str, model_dir: Path, revision: str = REVISION) -> Path:
    """Files of `model_dir` laid out as the Hub's cache holds a download: blobs, a snapshot of links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / revision
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(model_dir.iterdir()):
        blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture(name="hub_cache")
def hub_cache_fixture(tmp_path, monkeypatch) -> Path:
    """An empty HF cache for this test (the constant huggingface_hub reads HF_HUB_CACHE into at import)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache
