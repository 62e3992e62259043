"""operation.sample_prompts: completions every eval_interval in samples_text.jsonl, TensorBoard, MLflow and W&B, under
an RNG of their own (a run with samples trains bitwise like one without, across a resume too); bad input at load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_train import REPO, cli_errors, load_example, read_metrics, series, train_in_process

from ironcore.config import load_config
from ironcore.errors import ConfigError
from ironcore.samples import SAMPLES_TEXT_FILE

PROMPTS = ["The history of", "def main("]
STALE = json.dumps({"step": 9, "prompt": "old", "text": "old run"}) + "\n"
STEPS = ["operation.train_steps=4", "operation.eval_interval=2", "optim.warmup_steps=1", "trainer.save_checkpoint_steps=2",
         "operation.eval_samples=8", "operation.test_samples=0", "model.dropout_mlp=0.2",
         "trainer.peak_tflops=1"]  # no CPU peak benchmark: its first run in a process draws from the global RNG


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same 4 steps (dropout on) without samples, and with samples from a prompts file on every tracker, started
    fresh in a directory holding an earlier start's samples, stopped by exit_interval after step 2 and resumed."""
    root = tmp_path_factory.mktemp("samples")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")  # a trailing blank line is no prompt
    train_in_process(load_example("pretrain", root / "plain", *STEPS))
    (root / "sampled").mkdir()
    (root / "sampled" / SAMPLES_TEXT_FILE).write_text(STALE)  # an earlier start's samples: set aside at step 0
    trackers = [f"operation.sample_prompts={prompts}", f"utils.tensorboard_dir={root / 'tb'}",
                f"utils.mlflow_tracking_uri=file:{root / 'mlruns'}", "utils.wandb_project=ironcore-samples"]
    train_in_process(load_example("pretrain", root / "sampled", *STEPS, *trackers, "operation.exit_interval=2"))
    train_in_process(load_example("pretrain", root / "sampled", *STEPS, *trackers, "trainer.resume=true"))
    return {"root": root, "plain": root / "plain", "sampled": root / "sampled"}


def test_samples_are_written_at_every_eval_step(runs):
    rows = [json.loads(line) for line in (runs["sampled"] / SAMPLES_TEXT_FILE).read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (2, 4) for p in PROMPTS]
    for row in rows:
        assert row["text"].startswith(row["prompt"]) and len(row["text"]) > len(row["prompt"]), row


def test_a_fresh_start_sets_the_earlier_samples_aside(runs):
    (aside,) = runs["sampled"].glob("samples_text.old-*.jsonl")
    assert aside.read_text() == STALE


def test_samples_do_not_change_training_across_a_resume(runs):
    plain, sampled = read_metrics(runs["plain"]), read_metrics(runs["sampled"])
    assert series(plain, "loss").keys() == {1, 2, 3, 4}
    assert series(sampled, "loss") == series(plain, "loss")  # bitwise: the same floats
    assert series(sampled, "eval/loss") == series(plain, "eval/loss")


def test_samples_reach_tensorboard_as_text(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = {}
    for events in (runs["root"] / "tb").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent), size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            if tag.startswith("samples/"):
                texts.update({(tag, e.step): e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)})
    assert sorted(texts) == [(f"samples/{i}/text_summary", s) for i in range(len(PROMPTS)) for s in (2, 4)]
    assert PROMPTS[0] in texts[("samples/0/text_summary", 4)]


def test_samples_reach_mlflow_as_artifacts(runs, monkeypatch):
    """Read back through the MLflow client, as a user browses them: the started and the resumed run's artifacts."""
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=f"file:{runs['root'] / 'mlruns'}")
    experiment = client.get_experiment_by_name("quickstart")
    artifacts = {}
    for found in client.search_runs([experiment.experiment_id]):
        for item in client.list_artifacts(found.info.run_id, "samples"):
            artifacts[Path(item.path).name] = client.download_artifacts(found.info.run_id, item.path, str(runs["root"]))
    assert sorted(artifacts) == ["step_0000002.jsonl", "step_0000004.jsonl"]
    rows = [json.loads(line) for line in Path(artifacts["step_0000004.jsonl"]).read_text().splitlines()]
    written = [json.loads(line) for line in (runs["sampled"] / SAMPLES_TEXT_FILE).read_text().splitlines()]
    assert rows == [r for r in written if r["step"] == 4]


def test_samples_reach_wandb_as_a_table(runs):
    tables = list((runs["sampled"] / "wandb").rglob("samples_*.table.json"))
    assert len(tables) == 2, tables  # one per eval step (offline run files)
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "text"] and [row[1] for row in table["data"]] == PROMPTS


def test_sample_prompts_as_a_list_or_a_file(tmp_path):
    config = REPO / "examples" / "pretrain.yaml"
    assert load_config(config, ["operation.sample_prompts=[a, b]"]).operation.sample_prompts == ("a", "b")
    (tmp_path / "p.txt").write_text("x\n")
    assert load_config(config, [f"operation.sample_prompts={tmp_path}/p.txt"]).operation.sample_prompts == f"{tmp_path}/p.txt"
    with pytest.raises(ConfigError, match=r"operation.sample_prompts: expected a list or a str, got dict"):
        load_config(config, ["operation.sample_prompts={a: 1}"])


def test_missing_prompts_file_is_refused_at_load(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    code, errors = cli_errors(["config", str(REPO / "examples" / "pretrain.yaml"), f"operation.sample_prompts={missing}"],
                              capsys)
    assert code == 2 and errors == [f"error: operation.sample_prompts: prompts file {missing} not found (one prompt per line)"]


def test_sample_prompts_with_a_sharded_model_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"operation.sample_prompts: not supported with parallel.use_fsdp"):
        load_config(REPO / "examples" / "pretrain.yaml", ["operation.sample_prompts=[a]", "parallel.use_fsdp=true"])
