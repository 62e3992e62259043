"""The CPU quickstarts (examples/*.yaml) run as a user runs them (`ironcore train examples/X.yaml`), at their real
model size, with fewer steps to keep CI short, and learn: the loss falls clearly, and DPO prefers the chosen answer
on held-out pairs. Full length (1000 / 300 / 200 steps) they take about 110 / 90 / 70 s on 2 idle cores.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from helpers_train import CACHE, REPO, read_metrics, reset_accelerate, restored_environ, series
from ironcore import cli


def quickstart(name: str, run_dir, *overrides: str) -> list[dict]:
    """`ironcore train examples/<name>.yaml <overrides> --fresh` in process, into `run_dir`, with the repo's cache."""
    args = ["train", str(REPO / "examples" / f"{name}.yaml"), f"trainer.model_path={run_dir}",
            f"data.cache_dir={CACHE}", "trainer.log_interval=5", *overrides, "--fresh"]
    reset_accelerate()
    with restored_environ():
        assert cli.main(args) == 0
    assert (run_dir / "export" / "model.safetensors").is_file()
    return read_metrics(run_dir)


def short(steps: int) -> tuple[str, ...]:
    return (f"operation.train_steps={steps}", f"operation.eval_interval={steps}", f"trainer.save_checkpoint_steps={steps}")


def test_sft_quickstart_loss_falls(tmp_path):
    records = quickstart("sft", tmp_path / "run", *short(30))
    losses = series(records, "loss")
    assert losses[5] > 7.0 and losses[30] < losses[5] - 0.8
    assert 0 < series(records, "eval/token_accuracy")[30] <= 1


def test_dpo_quickstart_prefers_chosen_on_held_out_pairs(tmp_path):
    """The live reference instead of the example's precomputed one: for 30 steps that is cheaper than scoring all
    2.8k pairs first (test_train checks the two give the same losses)."""
    records = quickstart("dpo", tmp_path / "run", *short(30), "optim.dpo_precompute_ref=false")
    losses = series(records, "loss")
    assert losses[5] < 0.7 and losses[30] < losses[5] - 0.15
    assert series(records, "eval/reward_accuracy")[30] > 0.5
    assert series(records, "eval/reward_margin")[30] > 0


def test_readme_quickstart_script_trains_exports_generates_and_plots(tmp_path):
    """`bash examples/quickstart.sh` as the README's main command runs it, shortened by its override arguments, from
    a copy of examples/ so the run lands in the copy's runs/quickstart; presets come from the installed package.
    The pretrain quickstart learns: the loss falls clearly and the eval loss is well below the uniform 7.6. The
    script prints what was learned, a sample and the plot's path, and its logs are quiet: no DeepSpeed import on a
    run without it, no shared-tensor warning per checkpoint, no warning a user could not act on, and no log line
    written into the progress bar's line."""
    examples = tmp_path / "examples"
    examples.mkdir()
    for name in ("quickstart.sh", "pretrain.yaml"):
        shutil.copy(REPO / "examples" / name, examples / name)
    env = {**os.environ, "IRONCORE_CACHE": str(CACHE), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    script = ["bash", str(examples / "quickstart.sh"), *short(40), "trainer.log_interval=5"]
    result = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    export = tmp_path / "runs" / "quickstart" / "export"
    assert (export / "model.safetensors").is_file()
    assert result.stdout.count("model exported to") == 1
    sample = result.stdout.split("---\n")[1]  # between the script's "--- a sample ... ---" and "---" lines
    assert sample.startswith("The return value of") and len(sample.split()) > len("The return value of".split())
    records = read_metrics(tmp_path / "runs" / "quickstart")
    assert max(r["step"] for r in records) == 40
    losses = series(records, "loss")
    assert losses[5] > 7.0 and losses[40] < losses[5] - 0.8
    assert series(records, "eval/loss")[40] < 6.6
    assert not any(key.startswith("test/") for r in records for key in r)  # splits hold no test rows
    *_, learned, evaluated, plotted = result.stdout.splitlines()
    assert learned == f"train loss {losses[5]:.3f} at step 5 -> {losses[40]:.3f} at step 40", learned
    assert re.fullmatch(r"eval loss \d+\.\d+, perplexity \d+\.\d at step 40", evaluated), evaluated
    assert plotted == "plot written to runs/quickstart/loss.png"
    assert (tmp_path / "runs" / "quickstart" / "loss.png").read_bytes().startswith(b"\x89PNG")
    logs = result.stdout + result.stderr
    assert "Setting accelerator to CPU" not in logs and "Removed shared tensor" not in logs
    warnings = [line for line in re.split(r"[\r\n]", result.stderr) if "WARNING" in line]
    assert all("set trainer.peak_tflops" in line for line in warnings), warnings  # a loaded machine's MFU peak
    log_lines = [line for line in re.split(r"[\r\n]", result.stderr) if re.search(r" (INFO|WARNING) ", line)]
    assert log_lines and all(re.match(r"\d{4}-\d\d-\d\d ", line) for line in log_lines), log_lines


def test_offline_pipeline_script_chains_pretrain_sft_dpo_through_native_exports(tmp_path):
    """`bash examples/pipeline.sh --short` from a copy of examples/: pretrain -> GPT-2 export -> SFT from it -> export
    -> DPO from that -> export -> a chat reply, one stdout line per stage. Every export is a plain GPT-2 checkpoint
    that AutoModelForCausalLM loads, and the SFT export's tokenizer carries the chat template it was trained with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(REPO / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("runs"))
    env = {**os.environ, "IRONCORE_CACHE": str(CACHE), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(tmp_path / "examples" / "pipeline.sh"), "--short"], env=env,
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["pretrain", "export", "sft", "export", "dpo", "export", "chat"]
    assert re.match(r"pretrain: train loss \d+\.\d+ at step 5 -> \d+\.\d+ at step 20; eval at step 20: loss ", lines[0])
    assert "token accuracy" in lines[2] and "reward accuracy" in lines[4] and "reward margin" in lines[4]
    out = tmp_path / "runs" / "pipeline"
    sft_config = (out / "sft" / "config.yaml").read_text()
    assert "from_pretrained: runs/pipeline/pretrain-gpt2" in sft_config  # each stage starts from the last export
    assert "from_pretrained: runs/pipeline/sft-gpt2" in (out / "dpo" / "config.yaml").read_text()
    for stage in ("pretrain", "sft", "dpo"):
        export = out / f"{stage}-gpt2"
        assert f"export: runs/pipeline/{stage}-gpt2 " in result.stdout
        config = (export / "config.json").read_text()
        assert '"model_type": "gpt2"' in config and "auto_map" not in config
        assert type(AutoModelForCausalLM.from_pretrained(export)).__name__ == "GPT2LMHeadModel"
    sft_tokenizer = AutoTokenizer.from_pretrained(out / "sft-gpt2")
    prompt = sft_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                               tokenize=False)
    assert prompt == f"<|im_start|>user\nhi{sft_tokenizer.eos_token}\n<|im_start|>assistant\n"
    assert re.fullmatch(r"chat: 'What does `json\.dumps` do\?' -> '.+'", lines[6], re.S), lines[6]
