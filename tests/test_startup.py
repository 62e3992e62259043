"""What `ironcore train` loads before its first step (issue 14): the optional backends only when the config uses them.

deepspeed, mlflow, wandb and tensorboard each cost about a second to import (deepspeed also logs "Setting
accelerator to CPU" on every CPU run), so a run that does not use them must never import them. The run is a real
`ironcore train` subprocess under `python -X importtime`, which lists every module the process imported.
"""

import os
import subprocess
import sys

import pytest

from helpers_train import REPO, example_overrides

OPTIONAL_BACKENDS = ("deepspeed", "mlflow", "wandb", "tensorboard", "torch.utils.tensorboard", "tensorboardX")


def imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from `-X importtime` lines: `import time: self | cumulative | <indent>name`."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime_stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.fixture(scope="module")
def plain_run_imports(tmp_path_factory) -> set[str]:
    run_dir = tmp_path_factory.mktemp("startup") / "run"
    overrides = example_overrides(run_dir, "operation.train_steps=2", "optim.warmup_steps=0", "operation.no_save=true",
                                  "trainer.do_eval=false", "operation.test_samples=0")
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ironcore.cli", "train", str(REPO / "examples" / "pretrain.yaml"),
         *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "export" / "config.json").is_file()  # it trained and exported: every phase ran
    return imported_modules(proc.stderr)


def test_importtime_lines_are_read(plain_run_imports):
    # the parser must see the run's real imports, or the absence checks below could never fail
    assert {"torch", "transformers", "accelerate", "ironcore.loop"} <= plain_run_imports


@pytest.mark.parametrize("backend", OPTIONAL_BACKENDS)
def test_a_run_without_the_backend_never_imports_it(plain_run_imports, backend):
    loaded = sorted(name for name in plain_run_imports if name == backend or name.startswith(f"{backend}."))
    assert not loaded, f"{backend} imported by a run that does not use it: {loaded[:5]}"
