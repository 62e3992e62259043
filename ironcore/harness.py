"""Benchmarks through lm-evaluation-harness (`ironcore eval`, `operation.benchmark_tasks`): the export, loaded by the
harness's own Hugging Face model class, scored on its tasks (hellaswag, arc_easy, mmlu, ... or local task YAMLs).

lm_eval is an optional extra (`ironcore[eval]`) and a heavy import, so it is imported inside the functions only.
Results go to `eval_results.json` in the run directory: next to `export/` when given a run or its export, inside
the model directory when given a model directory that belongs to no run.
"""

from __future__ import annotations

import functools
import json
import os
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from ironcore.errors import CheckpointError, ConfigError, DataError

RESULTS_FILE = "eval_results.json"
INSTALL_HINT = "pip install -e '.[eval]'"


def require_lm_eval() -> None:
    """lm_eval importable, else one line saying which extra installs it."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(f"benchmarks need lm-evaluation-harness, which is not installed: {INSTALL_HINT}") from None


def locate(src: str | Path) -> tuple[Path, Path]:
    """(model directory, results file) of `ironcore eval SRC`: a run directory means its `export/`, an export or
    other model directory itself; the results go to the run directory (the export's parent) when there is one."""
    src = Path(src)
    if (src / "config.json").is_file():
        run_dir = src.parent if (src.parent / "config.yaml").is_file() else src
        return src, run_dir / RESULTS_FILE
    if (src / "export" / "config.json").is_file():
        return src / "export", src / RESULTS_FILE
    if (src / "config.yaml").is_file():
        raise CheckpointError(f"{src}: the run has no export/ yet (training did not finish); write one with "
                              f"`ironcore export {src} --out {src / 'export'}`")
    raise CheckpointError(f"{src}: neither a run directory with export/ nor a model directory with config.json")


def task_manager(include_path: str | Path | None = None):
    """The harness's task index: its own tasks plus the YAMLs under `include_path` (local tasks)."""
    require_lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path}: not a directory of task YAMLs")
    return _task_manager(None if include_path is None else str(Path(include_path).resolve()))


@functools.cache
def _task_manager(include_path: str | None):
    """Indexing the harness's ~15k task YAMLs takes half a minute on 2 cores: once per process and directory
    (training checks the names before its first step and evaluates with the same index at the end)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_tasks(tasks: list[str], manager, where: str = "--tasks") -> None:
    """Every name a task, group or tag the harness knows; an unknown one is refused with the close names."""
    if not tasks:
        raise ConfigError(f"{where}: name at least one lm-evaluation-harness task (hellaswag, arc_easy, ...)")
    known = manager.all_tasks
    for name in tasks:
        if name not in known:
            close = get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else "; `lm-eval ls tasks` lists them"
            raise ConfigError(f"{where}: unknown lm-evaluation-harness task {name!r}{hint}")


def evaluate(src: str | Path, tasks: list[str], *, limit: int | None = None, batch_size: int = 8,
             include_path: str | Path | None = None, where: str = "--tasks") -> tuple[dict[str, Any], Path]:
    """Run the tasks on the model behind `src` (float32, CPU unless CUDA is here); write and return the harness's
    results and where they were written. `where` names the tasks' origin in errors (an option or a config field)."""
    model_dir, results_file = locate(src)
    manager = task_manager(include_path)
    check_tasks(tasks, manager, where)
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    import ironcore.models  # noqa: F401  (registers model_type "ironcore" with the Auto classes)
    from ironcore.export import load_model_dir_tokenizer

    # Loaded here and handed over: given a directory, HFLM builds its own Accelerator and, inside a multi-process
    # training launch, would shard the requests over ranks that are not evaluating; given a model it runs alone.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    model = HFLM(pretrained=loaded, tokenizer=load_model_dir_tokenizer(model_dir), backend="causal",
                 batch_size=batch_size)
    try:
        with torch.random.fork_rng(devices=[]):  # the harness seeds torch; leave the caller's RNG as it was
            results = simple_evaluate(model=model, tasks=tasks, limit=limit, task_manager=manager, log_samples=False)
    except (ConnectionError, FileNotFoundError) as err:  # the task's dataset: a Hub download or a local data file
        raise DataError(f"{where} {','.join(tasks)}: the task data does not load ({err}); the harness's own tasks "
                        "download their datasets from the Hub (network or a datasets cache needed)") from None
    write_results(results, results_file)
    return results, results_file


def write_results(results: dict[str, Any], path: Path) -> None:
    """The results as JSON, written to a temporary file and renamed, so a killed write leaves no half file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def scores(results: dict[str, Any]) -> dict[str, float]:
    """`benchmark/<task>/<metric>` -> value for the trackers: the harness's numeric metrics, its default filter
    (`acc,none`) named by the metric alone, another filter as `<metric>_<filter>`; stderrs left out."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            out[f"benchmark/{task}/{name}"] = float(value)
    return out


def table(results: dict[str, Any]) -> str:
    """The harness's own results table (markdown), as `lm_eval` prints it."""
    from lm_eval.utils import make_table

    return make_table(results)
