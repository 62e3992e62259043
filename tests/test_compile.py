"""trainer.torch_compile end to end (ironcore/compilation.py): regional compilation of the decoder layers trains
like eager, checkpoints and resumes across compiled and uncompiled runs, exports a model that plain transformers
loads and generates from, never puts `_orig_mod.` in a state dict, and logs its speed check once.

Compiling costs tens of seconds on 2 CPU cores, so the runs are module-scoped and the single-process ones run in
this process: dynamo reuses one compiled layer graph for every layer of every run of the same model config. Two
configs are compiled: dropout 0 (compared with eager to a tolerance, resumed both ways, and on 2 DDP ranks, whose
processes find its kernels in the inductor cache that conftest.py keeps in the repo) and the spec's dropout 0.1
(trained with GA 2, evaluated, exported, generated from).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from helpers_dist import DROPOUT, child_env, copy_stopped_at, finish, start
from helpers_dist import losses as logged_losses
from helpers_train import (
    REPO,
    example_overrides,
    generate_in_plain_transformers,
    load_example,
    read_metrics,
    reset_accelerate,
    restored_environ,
    series,
    train_in_process,
)
from ironcore.compilation import SpeedCheck, compile_model, decoder_layers, verdict
from ironcore.config import RunConfig
from ironcore.launch_config import explain
from ironcore.models import build_model
from ironcore.models.conversion import load_state
from ironcore.translate import LaunchEnv

STEPS = 6
# 6 steps of 4 rows x 2 accumulation steps, a checkpoint at 3 (where the resumed runs start) and 6.
COMMON = (f"operation.train_steps={STEPS}", "optim.warmup_steps=2", "trainer.gradient_accumulation_steps=2",
          "trainer.save_checkpoint_steps=3", "trainer.log_sample_ids=true", "trainer.do_eval=false",
          "operation.test_samples=0")
COMPILE = "trainer.torch_compile=true"
# Inductor fuses and reorders float32 arithmetic; eager and compiled losses agree to this relative tolerance (the
# measured difference is below 1e-7 over 6 steps).
LOSS_RTOL = 1e-5
PROMPT = "The return value of the function is"


@dataclass
class Run:
    run: RunConfig
    run_dir: Path
    logs: list[logging.LogRecord]

    def losses(self) -> dict[int, float]:
        return series(read_metrics(self.run_dir), "loss")

    def weights(self, step: int) -> dict[str, torch.Tensor]:
        return load_file(self.run_dir / "checkpoints" / f"step_{step}" / "model.safetensors")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def train(run_dir: Path, *overrides: str) -> Run:
    """examples/pretrain.yaml, tiny, with COMMON and `overrides`, trained in this process; keeps the records that
    ironcore.compilation logged."""
    run = load_example("pretrain", run_dir, *COMMON, *overrides)
    handler = Records()
    logger = logging.getLogger("ironcore.compilation")
    logger.addHandler(handler)
    try:
        train_in_process(run)
    finally:
        logger.removeHandler(handler)
    return Run(run, run_dir, handler.records)


def resume(src: Run, run_dir: Path, *overrides: str) -> Run:
    """`src` as stopped after its step-3 checkpoint, relaunched (trainer.resume=true) with `overrides`."""
    copy_stopped_at(src.run_dir, run_dir, 3)
    return train(run_dir, "trainer.resume=true", *overrides)


@pytest.fixture(scope="module")
def eager(tmp_path_factory) -> Run:
    return train(tmp_path_factory.mktemp("compile") / "eager")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Run:
    return train(tmp_path_factory.mktemp("compile") / "compiled", COMPILE)


@pytest.fixture(scope="module")
def compiled_from_eager(eager, tmp_path_factory) -> Run:
    return resume(eager, tmp_path_factory.mktemp("compile") / "compiled-from-eager", COMPILE)


@pytest.fixture(scope="module")
def eager_from_compiled(compiled, tmp_path_factory) -> Run:
    return resume(compiled, tmp_path_factory.mktemp("compile") / "eager-from-compiled")


@pytest.fixture(scope="module")
def ddp(eager, tmp_path_factory) -> tuple[Path, str]:
    """Compiled on 2 CPU ranks (torchrun) x 4 rows x 1 accumulation step: the eager run's global batch of 4 rows x 2
    steps. Launched after the in-process runs, whose compiled kernels the ranks find in the inductor cache."""
    root = tmp_path_factory.mktemp("compile")
    run_dir, log = root / "ddp", root / "ddp.log"
    overrides = example_overrides(run_dir, *COMMON, COMPILE, "trainer.gradient_accumulation_steps=1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--module", "ironcore.train", str(REPO / "examples" / "pretrain.yaml"), *overrides]
    result = finish(start(cmd, child_env(), log), log, time.monotonic())
    assert result.returncode == 0, result.output[-4000:]
    return run_dir, result.output


@pytest.fixture(scope="module")
def dropout(tmp_path_factory) -> Run:
    """The spec's dropout 0.1 everywhere, GA 2, evaluation at steps 3 and 6, compiled, exported."""
    return train(tmp_path_factory.mktemp("compile") / "dropout", COMPILE, *DROPOUT, "trainer.do_eval=true",
                 "operation.eval_interval=3", "operation.eval_samples=8")


# ------------------------------------------------------------------------------------------ train and resume


def test_compiled_losses_match_eager(compiled, eager):
    """Same weights, data and GA 2: every logged loss agrees with eager to LOSS_RTOL."""
    assert list(compiled.losses()) == list(range(1, STEPS + 1))
    assert compiled.losses() == pytest.approx(eager.losses(), rel=LOSS_RTOL)


def test_compiled_run_resumes_an_uncompiled_checkpoint(compiled_from_eager, eager):
    losses = compiled_from_eager.losses()
    assert list(losses) == list(range(1, STEPS + 1))  # steps 1-3 kept from the copy, 4-6 trained after the resume
    assert {s: losses[s] for s in (4, 5, 6)} == pytest.approx({s: eager.losses()[s] for s in (4, 5, 6)},
                                                              rel=LOSS_RTOL)
    final, want = compiled_from_eager.weights(STEPS), eager.weights(STEPS)
    assert final.keys() == want.keys()
    assert max((final[k] - want[k]).abs().max().item() for k in want) < 1e-5


def test_uncompiled_run_resumes_a_compiled_checkpoint(eager_from_compiled, compiled):
    losses = eager_from_compiled.losses()
    assert {s: losses[s] for s in (4, 5, 6)} == pytest.approx({s: compiled.losses()[s] for s in (4, 5, 6)},
                                                              rel=LOSS_RTOL)
    final, want = eager_from_compiled.weights(STEPS), compiled.weights(STEPS)
    assert max((final[k] - want[k]).abs().max().item() for k in want) < 1e-5


def test_compiled_ddp_matches_eager_one_process_and_logs_once(ddp, eager):
    run_dir, output = ddp
    assert logged_losses(run_dir) == pytest.approx(eager.losses(), rel=LOSS_RTOL)
    assert output.count("] trainer.torch_compile: ") == 1  # the speed check, from the main process only


def test_state_dict_keys_never_carry_orig_mod(compiled, compiled_from_eager, dropout, eager):
    """Checkpoints and export of compiled runs hold exactly the keys of an eager run's."""
    want = set(eager.weights(3))
    for run in (compiled, compiled_from_eager, dropout):
        for step in (3, STEPS):
            assert set(run.weights(step)) == want, (run.run_dir, step)
    export = set(load_file(dropout.run_dir / "export" / "model.safetensors"))
    assert export == set(load_file(eager.run_dir / "export" / "model.safetensors"))
    assert not [key for key in want | export if "_orig_mod" in key]


# -------------------------------------------------------------------------------- dropout, eval, export


def test_compiled_with_dropout_trains_and_evaluates(dropout):
    records = read_metrics(dropout.run_dir)
    losses = series(records, "loss")
    assert list(losses) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in losses.values())
    evals = series(records, "eval/loss")
    assert list(evals) == [3, STEPS] and evals[STEPS] < evals[3]


def test_export_of_a_compiled_run_generates_in_plain_transformers(dropout):
    """The export loads with trust_remote_code in a fresh process that never imports ironcore.models (the model
    classes come from the export's own files), and its greedy continuation is the one of the final checkpoint's
    weights in an eager IronCore model."""
    export = dropout.run_dir / "export"
    got = generate_in_plain_transformers(export, PROMPT)

    from transformers import AutoTokenizer

    model = build_model(dropout.run).eval()
    load_state(model, dropout.weights(STEPS), "checkpoint")
    ids = AutoTokenizer.from_pretrained(export)(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert got == want[0].tolist() and len(got) == ids.shape[1] + 8


# ------------------------------------------------------------------------------------------ speed check


def test_speed_check_is_logged_once_per_compiled_run(compiled, dropout, eager):
    for run in (compiled, dropout):
        (record,) = run.logs
        assert "] trainer.torch_compile: " in record.getMessage()  # after accelerate's "[RANK 0]"
        assert " ms compiled, " in record.getMessage() and " ms eager" in record.getMessage()
    assert eager.logs == []


@pytest.mark.parametrize("compiled, wins, level", [
    ((2.0, 1.5, 1.2), 0, logging.WARNING),  # lost every round: slower
    ((1.0, 1.5, 1.2), 0, logging.WARNING),  # a tie is no win
    ((0.5, 1.5, 1.2), 1, logging.INFO),     # mixed: no warning
    ((0.5, 0.5, 0.5), 3, logging.INFO),
])
def test_the_speed_check_warns_when_compiled_lost_every_round(compiled, wins, level):
    check = SpeedCheck(eager=(1.0, 1.0, 1.0), compiled=compiled, rows=4, seq_length=32)
    found, message = verdict(check, "cpu", 2)
    assert found == level
    assert f"at 4 x 32 tokens on cpu: median {sorted(compiled)[1] * 1e3:.2f} ms compiled, 1000.00 ms eager" in message
    assert f"compiled faster in {wins} of 3 rounds" in message
    assert ("slower than eager" in message) == (level == logging.WARNING)


def test_compile_model_leaves_weights_gradients_rng_and_keys_as_they_were(compiled):
    """In place: same keys and values, no gradient, the global RNG where it was; every layer compiled."""
    model = build_model(compiled.run)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    reset_accelerate()
    try:
        compile_model(compiled.run, model, Accelerator(cpu=True))
    finally:
        reset_accelerate()
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    assert model._compiled_call_impl is None  # embeddings, head and loss stay eager


def test_explain_says_what_gets_compiled(tmp_path):
    on = explain(load_example("pretrain", tmp_path, COMPILE), LaunchEnv())
    assert on["accelerator"]["dynamo_backend"] == "no"  # never Accelerate's whole-model compile
    assert on["compile"]["regions"].startswith("model.layers.<i> (IronCoreDecoderLayer) x 2, each compiled in place")
    assert on["compile"]["backend"] == "inductor"
    assert explain(load_example("pretrain", tmp_path), LaunchEnv())["compile"] is None


def test_accelerate_never_compiles_the_whole_model(tmp_path, monkeypatch):
    """Not even when the launch environment asks for it (an `accelerate config` with dynamo sets this variable)."""
    from accelerate.utils import DynamoBackend

    from ironcore.translate import build_accelerator

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    reset_accelerate()
    with restored_environ():
        accelerator = build_accelerator(load_example("pretrain", tmp_path, COMPILE))
        assert accelerator.state.dynamo_plugin.backend == DynamoBackend.NO
    reset_accelerate()
