"""Shared pieces of the loop tests: tiny configs from the examples, in-process runs, metrics.jsonl readers.

Every run reads one of `examples/*.yaml` (the user's path: presets, data configs, overrides) and shrinks the
model with `TINY`; caches live in the repo's `.cache/ironcore` (ignored by git) so nothing writes to HOME and
the built-in tokenizer and tokenized corpus are built once per machine, not per test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from accelerate.state import AcceleratorState, GradientState

from ironcore.config import RunConfig, load_config

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "ironcore"

# ~60k parameters at vocab 2048: GPT-2-shaped (n_embd = heads x head_dim) so it also exports as GPT2LMHeadModel.
TINY = (
    "model.d_model=64", "model.d_ffn=256", "model.num_attention_heads=4", "model.head_dim=16", "model.max_seq_len=64",
    "data.seq_length=32", "trainer.micro_batch_size=4", "trainer.gradient_accumulation_steps=1",
    "trainer.log_interval=1", "trainer.num_workers=0",
)


def example_overrides(run_dir: Path, *overrides: str) -> list[str]:
    """Overrides that make an example tiny, fresh and cached in the repo, then the test's own."""
    return [f"trainer.model_path={run_dir}", f"data.cache_dir={CACHE}", "trainer.resume=false", *TINY, *overrides]


def load_example(name: str, run_dir: Path, *overrides: str) -> RunConfig:
    """`examples/<name>.yaml` with `example_overrides`."""
    return load_config(REPO / "examples" / f"{name}.yaml", example_overrides(run_dir, *overrides))


def reset_accelerate() -> None:
    """Forget the process-wide Accelerate state, so each in-process run builds its Accelerator as a new process would."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@contextmanager
def restored_environ() -> Iterator[None]:
    """`build_accelerator` sets tracker variables (MLFLOW_*) on purpose; keep them from leaking into later tests."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def train_in_process(run: RunConfig) -> Path:
    """`ironcore.train.train(run)` in this process, with a fresh Accelerate state and environment."""
    from ironcore.loop import train

    reset_accelerate()
    with restored_environ():
        return train(run)


def cli_errors(args: list[str], capsys) -> tuple[int, list[str]]:
    """`ironcore ARGS` through `ironcore.cli.main` in this process (fresh Accelerate state and environment): the exit
    code and the `error:` lines on stderr. A traceback on stderr fails the test."""
    from ironcore import cli

    reset_accelerate()
    with restored_environ():
        code = cli.main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line.strip() for line in re.split(r"[\r\n]", err) if line.strip().startswith("error:")]


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of run_dir/metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def series(records: list[dict], key: str) -> dict[int, float]:
    """step -> value of `key` over the records that have it (the last record per step wins, as after a resume)."""
    return {r["step"]: r[key] for r in records if key in r}


PLAIN_GENERATE = """\
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompt = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
ids = AutoTokenizer.from_pretrained(path, trust_remote_code=True)(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=8, do_sample=False)
print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith("ironcore.models")), "ids": out[0].tolist()}))
"""


def generate_in_plain_transformers(export: Path, prompt: str) -> list[int]:
    """The greedy 8-token continuation of `prompt` by `export`, loaded with trust_remote_code in a fresh process
    that never imports ironcore.models (the model classes come from the export's own files)."""
    proc = subprocess.run([sys.executable, "-c", PLAIN_GENERATE, str(export), prompt], capture_output=True, text=True,
                          timeout=120, cwd=export.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["modules"] == [], got["modules"]
    return got["ids"]


def assert_plain_transformers_generates_as_ironcore(export: Path, prompt: str = "the quick brown fox") -> None:
    """`export`'s greedy 8-token continuation of `prompt` in plain transformers (`generate_in_plain_transformers`)
    equals the one of IronCore's own loader of the same export."""
    import torch
    from transformers import AutoTokenizer

    from ironcore.models import load_pretrained

    got = generate_in_plain_transformers(export, prompt)
    ids = AutoTokenizer.from_pretrained(export)(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        want = load_pretrained(export).eval().generate(ids, max_new_tokens=8, do_sample=False)
    assert got == want[0].tolist() and len(got) == ids.shape[1] + 8
