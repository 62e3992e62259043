"""Test-wide settings: never touch the Hub, keep every tool's files inside the test's temp dirs."""

import os
from pathlib import Path

_CACHE = Path(__file__).resolve().parent.parent / ".cache"

os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    WANDB_MODE="offline",
    MLFLOW_DISABLE_TELEMETRY="true",
    DS_ACCELERATOR="cpu",
    TOKENIZERS_PARALLELISM="false",
)
# The suite runs two xdist workers on two cores: one intra-op thread each (and in every process they start), or
# the workers' OpenMP pools oversubscribe the cores. Set before torch is imported, which reads it once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HOME", str(_CACHE / "hf"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_CACHE / "torch_extensions"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_CACHE / "torchinductor"))  # trainer.torch_compile's kernels
os.environ.setdefault("WANDB_DIR", str(_CACHE / "wandb"))

REPO_ROOT = Path(__file__).resolve().parent.parent
