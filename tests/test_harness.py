"""Benchmarks through the real lm-evaluation-harness on a tiny export, offline: a local multiple-choice task (a task
YAML over a jsonl written here), `ironcore eval` on a run and on its export, `operation.benchmark_tasks` at the end
of training, and the bad inputs (unknown task, no lm_eval, a run without export)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers_train import REPO, cli_errors, load_example, read_metrics, train_in_process

from ironcore.errors import ConfigError
from ironcore.harness import RESULTS_FILE

ROWS = [("The cat sat on the", ["mat", "sky", "moon", "tree"]), ("Water is", ["wet", "dry", "loud", "square"]),
        ("One plus one is", ["two", "seven", "blue", "cold"]), ("The sun rises in the", ["east", "west", "sea", "box"]),
        ("Birds can", ["fly", "swim", "read", "melt"]), ("Ice is", ["cold", "hot", "green", "fast"]),
        ("A dog says", ["woof", "meow", "moo", "quack"]), ("Fire is", ["hot", "cold", "wet", "quiet"])]


def write_task(directory: Path) -> Path:
    """A harness task `tiny_mc` over 8 local rows: the question, four choices, the first one right."""
    directory.mkdir()
    data = directory / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": 0}) + "\n" for q, c in ROWS))
    (directory / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_target: label\ndoc_to_choice: choices\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return directory


@pytest.fixture(scope="module")
def benchmarked(tmp_path_factory) -> dict[str, Path]:
    """A 2-step tiny run whose config runs `tiny_mc` at the end, logging to TensorBoard."""
    root = tmp_path_factory.mktemp("harness")
    tasks = write_task(root / "tasks")
    run_dir = root / "run"
    train_in_process(load_example(
        "pretrain", run_dir, "operation.train_steps=2", "optim.warmup_steps=1", "trainer.do_eval=false",
        "operation.test_samples=0", "operation.benchmark_tasks=[tiny_mc]", f"operation.benchmark_include_path={tasks}",
        f"utils.tensorboard_dir={root / 'tb'}",
    ))
    return {"run": run_dir, "tasks": tasks, "root": root}


def choice_accuracy(export: Path) -> float:
    """The task's accuracy computed with plain transformers: the choice whose tokens, after the question and a
    space, have the highest summed log-probability."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ironcore.models  # noqa: F401

    tokenizer, model = AutoTokenizer.from_pretrained(export), AutoModelForCausalLM.from_pretrained(export).eval()
    right = 0
    for question, choices in ROWS:
        context = tokenizer(question)["input_ids"]
        scores = []
        for choice in choices:
            ids = tokenizer(f"{question} {choice}")["input_ids"]
            with torch.no_grad():
                logps = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            scores.append(sum(logps[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
        right += max(range(len(choices)), key=scores.__getitem__) == 0
    return right / len(ROWS)


def test_benchmark_tasks_at_the_end_of_training_write_and_log_the_scores(benchmarked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = json.loads((benchmarked["run"] / RESULTS_FILE).read_text())
    acc = results["results"]["tiny_mc"]["acc,none"]
    assert results["n-samples"]["tiny_mc"]["effective"] == len(ROWS)
    assert acc == pytest.approx(choice_accuracy(benchmarked["run"] / "export"), abs=1e-9)
    last = read_metrics(benchmarked["run"])[-1]
    assert last["step"] == 2 and last["benchmark/tiny_mc/acc"] == pytest.approx(acc)
    logged = {}
    for events in (benchmarked["root"] / "tb").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        if "benchmark/tiny_mc/acc" in accumulator.Tags()["scalars"]:
            logged = {e.step: e.value for e in accumulator.Scalars("benchmark/tiny_mc/acc")}
    assert logged == {2: pytest.approx(acc)}


def test_eval_prints_the_table_and_writes_results_in_the_run_dir(benchmarked, capsys):
    from ironcore import cli

    run_dir = benchmarked["run"]
    (run_dir / RESULTS_FILE).unlink()
    args = ["--tasks", "tiny_mc", "--limit", "4", "--batch-size", "2", "--include-path", str(benchmarked["tasks"])]
    assert cli.main(["eval", str(run_dir / "export"), *args]) == 0  # an export of a run: results beside it
    out = capsys.readouterr().out
    assert "|tiny_mc|" in out and "|acc" in out and f"results written to {run_dir / RESULTS_FILE}" in out
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    assert results["n-samples"]["tiny_mc"]["effective"] == 4 and 0 <= results["results"]["tiny_mc"]["acc,none"] <= 1
    assert not (run_dir / "export" / RESULTS_FILE).exists()


def test_unknown_task_lists_the_close_names(benchmarked, capsys):
    code, errors = cli_errors(["eval", str(benchmarked["run"]), "--tasks", "tiny_m", "--include-path",
                               str(benchmarked["tasks"])], capsys)
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("error: --tasks: unknown lm-evaluation-harness task 'tiny_m'; close names: tiny_mc")


def test_without_lm_eval_the_extra_to_install_is_named(benchmarked, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError, as when not installed
    code, errors = cli_errors(["eval", str(benchmarked["run"]), "--tasks", "tiny_mc"], capsys)
    assert code == 2 and errors == ["error: benchmarks need lm-evaluation-harness, which is not installed: "
                                    "pip install -e '.[eval]'"]
    code, errors = cli_errors(["config", str(REPO / "examples" / "pretrain.yaml"), "operation.benchmark_tasks=[x]"],
                              capsys)
    assert code == 2 and errors == ["error: operation.benchmark_tasks: lm-evaluation-harness is not installed: "
                                    "pip install -e '.[eval]'"]


def test_a_run_without_export_names_ironcore_export(benchmarked, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text((benchmarked["run"] / "config.yaml").read_text())
    code, errors = cli_errors(["eval", str(run_dir), "--tasks", "tiny_mc"], capsys)
    assert code == 2 and len(errors) == 1 and f"`ironcore export {run_dir} --out {run_dir / 'export'}`" in errors[0]


def test_a_hub_task_without_network_is_one_line(benchmarked, capsys):
    """The harness's own tasks read their data from the Hub, as a real user's run does; offline that is one line."""
    code, errors = cli_errors(["eval", str(benchmarked["run"]), "--tasks", "arc_easy", "--limit", "2",
                               "--include-path", str(benchmarked["tasks"])], capsys)
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("error: --tasks arc_easy: the task data does not load (Couldn't reach 'allenai/ai2_arc'")


def test_an_unknown_benchmark_task_stops_training_before_the_first_step(benchmarked, tmp_path):
    run = load_example("pretrain", tmp_path / "run", "operation.train_steps=2", "optim.warmup_steps=1",
                       "operation.benchmark_tasks=[tiny_m]", f"operation.benchmark_include_path={benchmarked['tasks']}")
    with pytest.raises(ConfigError, match=r"^operation.benchmark_tasks: unknown lm-evaluation-harness task 'tiny_m'; "
                                          r"close names: tiny_mc"):
        train_in_process(run)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "export").exists()
