"""Training throughput of IronCore against HF Trainer and a nanoGPT-style plain loop, eager and compiled, in one run.

Every implementation trains the same GPT-2-shaped model (pre-LN, learned positions, tanh GELU, tied embeddings,
dropout 0, SDPA attention) at the same micro batch and precision, with AdamW (same lr, betas, eps, weight decay)
and gradient clipping at 1.0, each in a process of its own (so that its peak memory is its own):

- ``ironcore_train``: `ironcore train` itself, on real text (the built-in corpus) through its own loader, logging
  every step; tokens/s is what the loop writes to metrics.jsonl (``tokens_per_sec``: tokens over the wall time of
  the step, data loading and logging included);
- ``ironcore`` / ``ironcore_compiled``: the real step, `ironcore.loop.Loop.train_step`, built as `ironcore train`
  builds it (with `trainer.torch_compile` for the second), on synthetic batches;
- ``hf_trainer`` / ``hf_trainer_compiled``: `transformers.Trainer` on the equivalent `GPT2LMHeadModel`
  (`torch_compile=True` for the second), each step timed from ``on_step_begin`` to ``on_step_end``;
- ``plain_pytorch`` / ``plain_pytorch_compiled``: forward, backward, clip, fused AdamW on the same `GPT2LMHeadModel`
  (`torch.compile(model)` for the second), no framework.

Each round runs every selected implementation once, in an order rotated by one each round, so a change in machine
load falls on all of them; a row's tokens/s is the median over rounds of each round's median step, and its spread
the range of the round values. "vs best peer" divides by the fastest HF Trainer or plain-loop row of the same shape
and precision. Peak memory is the child process's peak RSS (CPU, from wait4) or peak allocated memory (CUDA).
The startup section times `ironcore train` from launch to its first step against a process that imports
transformers and builds the GPT-2 model.

Run from the repository root: ``python benchmarks/throughput.py`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python benchmarks/throughput.py` from a checkout

from ironcore.cli import PROCESS_ENV  # noqa: E402
from ironcore.cpu_bf16 import gemm_dtype  # noqa: E402
from ironcore.metrics import (  # noqa: E402
    flops_per_token,
    lookup_peak_tflops,
    mfu,
    non_embedding_param_count,
    peak_flops,
)

Batch = dict[str, torch.Tensor]
GPT2_KEYS = ("input_ids", "labels", "attention_mask", "position_ids")

# The optimizer settings every implementation gets (IronCore's defaults: optim.max_lr, adam_beta2, ...).
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 5e-4, (0.9, 0.95), 1e-8, 0.01, 1.0

IMPLEMENTATIONS = (
    "ironcore_train", "ironcore", "ironcore_compiled",
    "hf_trainer", "hf_trainer_compiled", "plain_pytorch", "plain_pytorch_compiled",
)
PEERS = ("hf_trainer", "hf_trainer_compiled", "plain_pytorch", "plain_pytorch_compiled")
# --short leaves out the compiled peers: compiling a whole model takes longer than CI's budget for the run
SHORT_IMPLEMENTATIONS = ("ironcore_train", "ironcore", "ironcore_compiled", "hf_trainer", "plain_pytorch")
CACHE = REPO / ".cache" / "ironcore"  # the built-in tokenizer and tokenized corpus, built once per checkout


@dataclasses.dataclass(frozen=True)
class Shape:
    """Model and batch shape shared by every implementation, and the precision."""

    name: str
    d_model: int
    layers: int
    heads: int
    seq: int
    batch: int
    vocab: int
    precision: str

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq

    @property
    def bf16(self) -> bool:
        return self.precision == "bfloat16"


# name: (d_model, layers, heads, seq, batch, vocab, timed steps, warmup steps)
SHAPES = {
    "A": (256, 4, 4, 256, 8, 8192, 20, 3),
    "B": (768, 12, 12, 256, 4, 32768, 8, 2),
    "gpt2": (768, 12, 12, 1024, 8, 50304, 20, 3),  # GPT-2 small at its context length (a GPU shape)
    "short": (64, 2, 2, 64, 4, 2048, 4, 2),  # vocab: the built-in tokenizer of ironcore_train has 2,048 ids
}


def make_shape(name: str, precision: str) -> Shape:
    return Shape(name, *SHAPES[name][:6], precision)


def synthetic_batches(shape: Shape, count: int, seed: int = 0) -> list[Batch]:
    """Full-length pretraining rows shaped like IronCore's loader gives them (all five keys, CPU tensors)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab, (count, shape.batch, shape.seq), generator=generator)
    positions = torch.arange(shape.seq).expand(shape.batch, -1)
    return [
        {
            "input_ids": rows,
            "labels": rows.clone(),
            "attention_mask": torch.ones_like(rows),
            "position_ids": positions.clone(),
            "sample_ids": torch.arange(i * shape.batch, (i + 1) * shape.batch),
        }
        for i, rows in enumerate(ids)
    ]


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def time_steps(step: Callable[[Batch, int], object], batches: list[Batch], device: torch.device) -> list[float]:
    """Seconds of each `step(batch, step_number)` call, with the device drained before and after."""
    times = []
    for number, batch in enumerate(batches, start=1):
        synchronize(device)
        start = time.perf_counter()
        step(batch, number)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def unique_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def model_flops_per_token(model: torch.nn.Module, shape: Shape) -> float:
    return flops_per_token(non_embedding_param_count(model), shape.layers, shape.seq, shape.d_model)


def model_stats(model: torch.nn.Module, shape: Shape) -> dict[str, float]:
    return {"params": unique_params(model), "flops_per_token": model_flops_per_token(model, shape),
            "vocab_size": model.config.vocab_size}


# ---------------------------------------------------------------- IronCore


def ironcore_overrides(shape: Shape, out_dir: Path, train_steps: int) -> list[str]:
    """The run config as `key=value` overrides: a GPT-2 shape, dropout 0, SDPA, one micro-batch per step."""
    return [
        f"model.d_model={shape.d_model}",
        f"model.d_ffn={4 * shape.d_model}",
        f"model.num_layers={shape.layers}",
        f"model.num_attention_heads={shape.heads}",
        f"model.head_dim={shape.d_model // shape.heads}",
        f"model.max_seq_len={shape.seq}",
        f"model.precision={shape.precision}",
        "model.activation_type=gelu_tanh",
        "model.ln_type=layernorm",
        "model.positional_embedding.type=absolute",
        "model.dropout_embd=0",
        "model.dropout_attn=0",
        "model.dropout_mlp=0",
        f"data.vocab_size={shape.vocab}",
        f"trainer.micro_batch_size={shape.batch}",
        "trainer.gradient_accumulation_steps=1",
        "trainer.use_flash_attn=false",  # SDPA, as the GPT-2 baselines use
        f"trainer.model_path={out_dir}",
        f"operation.train_steps={train_steps}",
        "operation.no_save=true",
        f"optim.max_lr={LR}",
        f"optim.adam_beta1={BETAS[0]}",
        f"optim.adam_beta2={BETAS[1]}",
        f"optim.adam_eps={EPS}",
        f"optim.weight_decay={WEIGHT_DECAY}",
        f"optim.clip_grad={CLIP}",
        "utils.report_memory_usage=false",
    ]


def train_overrides(shape: Shape, out_dir: Path, train_steps: int, device: torch.device) -> list[str]:
    """`ironcore train` on the built-in corpus (its own tokenizer, 2,048 ids, under a model vocabulary of shape.vocab)
    with the same model and optimizer, every step logged; one loader worker prefetches the next batch."""
    return [
        *ironcore_overrides(shape, out_dir, train_steps),
        "data.config_path=builtin_pretrain",
        f"data.seq_length={shape.seq}",
        f"data.cache_dir={CACHE}",
        "trainer.torch_compile=false",
        "trainer.log_interval=1",
        "trainer.num_workers=1",
        "trainer.do_eval=false",
        "trainer.resume=false",
        "operation.test_samples=0",
        f"utils.report_memory_usage={str(device.type == 'cuda').lower()}",  # peak allocated; CPU RSS comes from wait4
    ]


def bench_ironcore(shape: Shape, batches: list[Batch], work_dir: Path, *, compiled: bool) -> tuple[list[float], dict]:
    """`Loop.train_step` as `ironcore.loop.train` sets it up; `compiled`: with trainer.torch_compile, whose layers
    compile (and whose speed check runs) before the timed steps."""
    from ironcore.compilation import compile_model
    from ironcore.config import load_config
    from ironcore.loop import Loop
    from ironcore.models import build_model
    from ironcore.optim import build_optimizer, build_scheduler
    from ironcore.tasks import LanguageModeling
    from ironcore.translate import build_accelerator, drop_fp32_output_wrapper

    overrides = [*ironcore_overrides(shape, work_dir, len(batches)), f"trainer.torch_compile={str(compiled).lower()}"]
    run = load_config(None, overrides, world_size=1)
    accelerator = build_accelerator(run)
    model = build_model(run)
    compile_model(run, model, accelerator)
    optimizer = build_optimizer(model, run.optim, accelerator.device.type)
    scheduler = build_scheduler(optimizer, run.optim, run.operation.train_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    drop_fp32_output_wrapper(accelerator, model)
    loop = Loop(run, work_dir, accelerator, model, optimizer, scheduler, LanguageModeling(), data=None)
    try:
        times = time_steps(lambda batch, number: loop.train_step([batch], number), batches, accelerator.device)
    finally:
        if loop.metrics is not None:
            loop.metrics.close()
    return times, model_stats(accelerator.unwrap_model(model), shape)


def ironcore_model_stats(shape: Shape) -> dict:
    """Parameters, FLOPs per token and padded vocabulary of IronCore's model, built on the meta device (no memory)."""
    from ironcore.config import load_config
    from ironcore.models import build_model

    run = load_config(None, ironcore_overrides(shape, Path(tempfile.gettempdir()), 1), world_size=1)
    with torch.device("meta"):
        return model_stats(build_model(run), shape)


# ---------------------------------------------------------------- GPT-2 baselines


def gpt2_model(shape: Shape, vocab_size: int, seed: int = 0):
    """The GPT2LMHeadModel equal in shape to IronCore's: tanh GELU in torch's fused form, no dropout, SDPA."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=shape.seq,
        n_embd=shape.d_model,
        n_layer=shape.layers,
        n_head=shape.heads,
        n_inner=4 * shape.d_model,
        activation_function="gelu_pytorch_tanh",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        loss_type="ForCausalLM",
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config)


def bench_plain(shape: Shape, batches: list[Batch], vocab_size: int, device: torch.device, *,
                compiled: bool) -> tuple[list[float], dict]:
    """Forward (autocast for bf16), backward, clip, fused AdamW: the nanoGPT-style loop; `compiled`: of
    `torch.compile(model)`, whose first (warmup) step compiles."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    model = gpt2_model(shape, vocab_size).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
        fused=device.type in _get_fused_kernels_supported_devices(),
    )
    forward = torch.compile(model) if compiled else model

    def step(batch: Batch, number: int) -> None:
        inputs = {k: batch[k].to(device, non_blocking=True) for k in GPT2_KEYS}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=shape.bf16):
            loss = forward(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(step, batches, device), model_stats(model, shape)


class _Rows(torch.utils.data.Dataset):
    """The synthetic batches as rows, in order, for the Trainer's DataLoader (GPT-2's four input keys)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.rows = [{k: b[k][i] for k in GPT2_KEYS} for b in batches for i in range(b["input_ids"].shape[0])]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Batch:
        return self.rows[index]


def bench_hf_trainer(shape: Shape, batches: list[Batch], vocab_size: int, device: torch.device, work_dir: Path, *,
                     compiled: bool) -> tuple[list[float], dict]:
    """`Trainer.train()` for exactly len(batches) steps, each timed by a callback; `compiled`: `torch_compile=True`."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.times.append(time.perf_counter() - self.start)

    args = TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=shape.batch,
        gradient_accumulation_steps=1,
        max_steps=len(batches),
        learning_rate=LR,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=EPS,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=CLIP,
        optim="adamw_torch_fused",
        lr_scheduler_type="cosine",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=device.type == "cpu",
        bf16=shape.bf16,
        torch_compile=compiled,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    timer = StepTimer()
    model = gpt2_model(shape, vocab_size)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(batches), callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary into our output
    trainer.train()
    return timer.times, model_stats(model, shape)


# ---------------------------------------------------------------- one implementation, in its own process


def child_main(impl: str, shape: Shape, steps: int, warmup: int, out: Path) -> None:
    """Run one in-process implementation and write its step times (after warmup) and model stats to `out`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what build_accelerator picks
    batches = synthetic_batches(shape, warmup + steps)
    compiled = impl.endswith("_compiled")
    with quiet(), tempfile.TemporaryDirectory(prefix="ironcore-bench-") as tmp:
        if impl.startswith("ironcore"):
            times, stats = bench_ironcore(shape, batches, Path(tmp), compiled=compiled)
        else:
            vocab_size = ironcore_model_stats(shape)["vocab_size"]  # IronCore's padded vocabulary, for equal models
            bench = bench_hf_trainer if impl.startswith("hf_trainer") else bench_plain
            extra = {"work_dir": Path(tmp)} if bench is bench_hf_trainer else {}
            times, stats = bench(shape, batches, vocab_size, device, compiled=compiled, **extra)
    peak_allocated = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    out.write_text(json.dumps({"times": times[warmup:], "device": str(device), "peak_allocated": peak_allocated,
                               **stats}))


def run_child(argv: list[str], log: Path, process_env: dict[str, str] | None = None) -> tuple[int, float, float]:
    """Run `argv` with its output in `log`; return (exit code, peak RSS bytes of that process, its launch time).
    `process_env`: variables the child gets unless already set here (IronCore's rows: what `ironcore` sets)."""
    env = {**(process_env or {}), **os.environ,
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with log.open("w") as handle:
        launched = time.time()
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024.0, launched


def measure(impl: str, shape: Shape, steps: int, warmup: int, work_dir: Path) -> dict:
    """One round of one implementation, in a fresh process: step times, peak memory, model stats (and, for
    `ironcore_train`, the seconds from launch to its first step)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    log = work_dir / "output.log"
    if impl == "ironcore_train":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        config = work_dir / "bench.yaml"
        config.write_text("trainer:\n  model_name: throughput-bench\n")
        argv = [sys.executable, "-m", "ironcore.cli", "train", str(config),
                *train_overrides(shape, work_dir / "run", warmup + steps, device)]
        code, rss, launched = run_child(argv, log)
        if code != 0:
            raise RuntimeError(f"ironcore train failed ({code}); its output:\n{log.read_text()[-3000:]}")
        return read_train_metrics(work_dir / "run" / "metrics.jsonl", shape, warmup, launched) | {"peak_rss": rss}
    out = work_dir / "result.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--shapes", shape.name,
            "--precisions", shape.precision, "--steps", str(steps), "--warmup", str(warmup), "--json", str(out)]
    code, rss, _ = run_child(argv, log, PROCESS_ENV if impl.startswith("ironcore") else None)
    if code != 0:
        raise RuntimeError(f"{impl} failed ({code}); its output:\n{log.read_text()[-3000:]}")
    return json.loads(out.read_text()) | {"peak_rss": rss}


def model_and_cache(shape: Shape, work_dir: Path) -> dict:
    """`prime` in a child process: this process imports no more than torch, so that a child's peak RSS, which
    starts from its parent's at the fork, is its own (the children all import torch and more)."""
    result = measure("prime", shape, 1, 1, work_dir)
    return {key: result[key] for key in ("params", "flops_per_token", "vocab_size")}


def read_train_metrics(path: Path, shape: Shape, warmup: int, launched: float) -> dict:
    """Step times after warmup from `ironcore train`'s metrics.jsonl (one record per step at log_interval 1: tokens
    over the step's wall time), the launch-to-first-step seconds, and the peak allocated memory where logged."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = {r["step"]: r for r in records if "tokens_per_sec" in r}
    first = steps[1]
    first_step_began = first["time"] - shape.tokens_per_step / first["tokens_per_sec"]
    allocated = [r["memory/max_allocated_gib"] * 2**30 for r in records if "memory/max_allocated_gib" in r]
    return {
        "times": [shape.tokens_per_step / r["tokens_per_sec"] for s, r in sorted(steps.items()) if s > warmup],
        "startup_s": first_step_began - launched,
        "peak_allocated": max(allocated) if allocated else None,
    }


BASELINE_STARTUP = """
import sys
from transformers import GPT2Config, GPT2LMHeadModel
d, layers, heads, seq, vocab = map(int, sys.argv[1:])
GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=d, n_layer=layers, n_head=heads, n_inner=4 * d))
"""


def baseline_startup(shape: Shape, work_dir: Path) -> float:
    """Seconds for a fresh `python -c` to import transformers and build the equal GPT-2 model (launch to exit)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    numbers = (shape.d_model, shape.layers, shape.heads, shape.seq, shape.vocab)
    argv = [sys.executable, "-c", BASELINE_STARTUP, *map(str, numbers)]
    code, _, launched = run_child(argv, work_dir / "startup.log")
    if code != 0:
        raise RuntimeError(f"the startup baseline failed: {(work_dir / 'startup.log').read_text()[-2000:]}")
    return time.time() - launched


def prime(shape: Shape, out: Path) -> None:
    """Build the built-in tokenizer and the tokenized corpus for this sequence length once, before any round, so that
    no round's `ironcore train` startup includes it; write IronCore's model stats (`ironcore_model_stats`) to `out`."""
    from ironcore.config import load_config
    from ironcore.data import load_tokenizer, prepare_data

    with quiet(), tempfile.TemporaryDirectory(prefix="ironcore-bench-") as tmp:
        run = load_config(None, train_overrides(shape, Path(tmp), 1, torch.device("cpu")), world_size=1)
        prepare_data(run, load_tokenizer(run))
    out.write_text(json.dumps(ironcore_model_stats(shape)))


# ---------------------------------------------------------------- results


@dataclasses.dataclass
class Row:
    shape: str
    precision: str
    implementation: str
    params: int
    flops_per_token: float
    tokens_per_sec: float  # median over rounds of each round's median step
    tokens_per_sec_rounds: list[float]
    ms_per_step: float
    peak_memory_mib: float  # peak RSS (CPU) or peak allocated (CUDA), the largest over rounds
    memory_kind: str
    mfu: float = float("nan")
    vs_best_peer: float = float("nan")
    startup_s: float | None = None

    @property
    def spread(self) -> float:
        """Half the range of the round values, relative to the median."""
        return (max(self.tokens_per_sec_rounds) - min(self.tokens_per_sec_rounds)) / 2 / self.tokens_per_sec


def summarize(shape: Shape, impl: str, rounds: list[dict], peak: float) -> Row:
    per_round = [shape.tokens_per_step / statistics.median(r["times"]) for r in rounds]
    median = statistics.median(per_round)
    gpu = rounds[0].get("peak_allocated") is not None
    memory = max(r["peak_allocated"] if gpu else r["peak_rss"] for r in rounds)
    startups = [r["startup_s"] for r in rounds if "startup_s" in r]
    return Row(
        shape=shape.name, precision=shape.precision, implementation=impl, params=rounds[0]["params"],
        flops_per_token=rounds[0]["flops_per_token"], tokens_per_sec=median, tokens_per_sec_rounds=per_round,
        ms_per_step=shape.tokens_per_step / median * 1e3, peak_memory_mib=memory / 2**20,
        memory_kind="peak allocated" if gpu else "peak RSS", mfu=mfu(median, rounds[0]["flops_per_token"], peak),
        startup_s=statistics.median(startups) if startups else None,
    )


def table(rows: list[Row]) -> str:
    header = (f"| shape | precision | {'implementation':<22} | {'params':>11} | {'tokens/s':>9} | {'spread':>6} "
              f"| {'ms/step':>8} | {'MFU':>6} | {'peak MiB':>8} | vs best peer |")
    rule = "|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|"
    lines = [
        f"| {r.shape:<5} | {r.precision:<9} | {r.implementation:<22} | {r.params:>11,} | {r.tokens_per_sec:>9,.0f} "
        f"| {r.spread * 100:>5.1f}% | {r.ms_per_step:>8.1f} | {r.mfu * 100:>5.1f}% | {r.peak_memory_mib:>8,.0f} "
        f"| {ratio(r.vs_best_peer):>12} |"
        for r in rows
    ]
    return "\n".join([header, rule, *lines])


def ratio(value: float) -> str:
    """`1.02x`, or `-` where no peer ran in this case (`--impls` without one)."""
    return "-" if math.isnan(value) else f"{value:.2f}x"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true",
                        help="CI mode: the tiny shape, float32, 1 round, no compiled peers (< 60 s on 2 CPU cores)")
    parser.add_argument("--shapes", help=f"comma-separated, of {', '.join(SHAPES)} (default A,B; --short: short)")
    parser.add_argument("--precisions", help="comma-separated, of float32, bfloat16 (bf16 autocast over fp32 weights) "
                                             "(default both; --short: float32)")
    parser.add_argument("--impls", help=f"comma-separated, of {', '.join(IMPLEMENTATIONS)} (default all; --short: "
                                        f"{', '.join(SHORT_IMPLEMENTATIONS)})")
    parser.add_argument("--rounds", type=int, help="rounds over the implementations (default 3; --short 1)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default per shape: A 20, B 8, short 4)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them (default per shape: A 3, B 2, short 2)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--child", choices=("prime", *IMPLEMENTATIONS[1:]), help=argparse.SUPPRESS)  # in its process
    args = parser.parse_args(argv)
    defaults = {"shapes": "short", "precisions": "float32", "impls": ",".join(SHORT_IMPLEMENTATIONS), "rounds": 1} \
        if args.short else {"shapes": "A,B", "precisions": "float32,bfloat16", "impls": ",".join(IMPLEMENTATIONS),
                            "rounds": 3}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.shapes, args.precisions, args.impls = (x.split(",") for x in (args.shapes, args.precisions, args.impls))
    for name, chosen, allowed in (("--shapes", args.shapes, SHAPES), ("--precisions", args.precisions,
                                  ("float32", "bfloat16")), ("--impls", args.impls, IMPLEMENTATIONS)):
        if unknown := [x for x in chosen if x not in allowed]:
            parser.error(f"{name}: unknown {', '.join(unknown)} (expected some of {', '.join(allowed)})")
    args.impls = [x for x in IMPLEMENTATIONS if x in args.impls]  # table order
    if args.rounds < 1 or (args.steps is not None and args.steps < 1) or (args.warmup is not None and args.warmup < 1):
        parser.error("--rounds and --steps must be >= 1, and --warmup >= 1 (the first step compiles or allocates)")
    return args


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def peak_source(device: torch.device, dtype: torch.dtype) -> str:
    """Where `peak_flops` got its number: the datasheet table, or a matmul it timed on this device."""
    if device.type == "cuda":
        tf32 = torch.get_float32_matmul_precision() != "highest"
        if lookup_peak_tflops(torch.cuda.get_device_name(device), dtype, tf32=tf32) is not None:
            return "datasheet"
    return "measured matmul"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep the output readable: the libraries' INFO logs and deprecation chatter are not results."""
    import datasets
    import transformers

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def bench_case(shape: Shape, impls: list[str], rounds: int, steps: int, warmup: int, work_dir: Path,
               peak: float) -> tuple[list[Row], list[float]]:
    """All rounds of one shape and precision: rows in `impls` order, and the startup baseline's seconds per round."""
    results: dict[str, list[dict]] = {impl: [] for impl in impls}
    baselines = []
    stats = model_and_cache(shape, work_dir / "prime")
    for number in range(rounds):
        order = impls[number % len(impls):] + impls[: number % len(impls)]
        for impl in order:
            results[impl].append(measure(impl, shape, steps, warmup, work_dir / f"{impl}-{number}"))
        if "ironcore_train" in impls:
            baselines.append(baseline_startup(shape, work_dir / f"startup-{number}"))
    for result in results.get("ironcore_train", []):  # the in-process rows' model: stats built on the meta device
        result.update(stats)
    rows = [summarize(shape, impl, results[impl], peak) for impl in impls]
    set_peer_ratios(rows)
    return rows, baselines


def set_peer_ratios(rows: list[Row]) -> None:
    """Each row's tokens/s over the fastest peer's in the same case; NaN (printed `-`) where no peer ran."""
    best_peer = max((r.tokens_per_sec for r in rows if r.implementation in PEERS), default=float("nan"))
    for row in rows:
        row.vs_best_peer = row.tokens_per_sec / best_peer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One device for all: with several GPUs visible, Trainer would wrap its model in nn.DataParallel.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    if args.child:
        shape = make_shape(args.shapes[0], args.precisions[0])
        if args.child == "prime":
            prime(shape, args.json)
        else:
            child_main(args.child, shape, args.steps, args.warmup, args.json)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[Row] = []
    startup: list[dict] = []
    peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ironcore-bench-") as tmp:
        for precision in args.precisions:
            # the GEMMs the matmuls run on (fp32 for bf16 on a CPU without bf16 units, ironcore/cpu_bf16.py); on CPU
            # a timed matmul, before any model exists here
            dtype = gemm_dtype(device.type, torch.bfloat16 if precision == "bfloat16" else torch.float32)
            peaks[precision] = peak_flops(device, dtype)
            for name in args.shapes:
                shape = make_shape(name, precision)
                steps = args.steps or SHAPES[name][6]
                warmup = args.warmup or SHAPES[name][7]
                case_rows, baselines = bench_case(shape, args.impls, args.rounds, steps, warmup,
                                                  Path(tmp) / f"{name}-{precision}", peaks[precision])
                rows += case_rows
                # as each case ends, on stderr: a long run that is cut short keeps what it measured
                print(f"{name} {precision}, {args.rounds} round(s):\n{table(case_rows)}", file=sys.stderr, flush=True)
                train = next((r for r in case_rows if r.implementation == "ironcore_train"), None)
                if train is not None:
                    startup.append({"shape": name, "precision": precision, "ironcore_train_s": train.startup_s,
                                    "transformers_import_and_build_s": statistics.median(baselines)})

    device_name = describe_device(device)
    print(f"device: {device_name} | torch {torch.__version__} | attention: sdpa (all) | {args.rounds} round(s), "
          f"medians | peak TFLOP/s for MFU: " + ", ".join(f"{p} {v / 1e12:.3f}" for p, v in peaks.items())
          + f" ({peak_source(device, torch.float32)})")
    for name in args.shapes:
        d, layers, heads, seq, batch, vocab, steps, warmup = SHAPES[name]
        print(f"shape {name}: d_model {d}, layers {layers}, heads {heads}, seq {seq}, batch {batch}, vocab {vocab} | "
              f"{args.steps or steps} timed steps after {args.warmup or warmup} warmup")
    print(table(rows))
    for entry in startup:
        ratio = entry["ironcore_train_s"] / entry["transformers_import_and_build_s"]
        entry["ratio"] = ratio
        print(f"startup ({entry['shape']}, {entry['precision']}): ironcore train launch to first step "
              f"{entry['ironcore_train_s']:.1f} s | python -c 'import transformers' + model build "
              f"{entry['transformers_import_and_build_s']:.1f} s | {ratio:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "device": device_name,
            "torch": torch.__version__,
            "rounds": args.rounds,
            "peak_flops": peaks,
            "peak_source": peak_source(device, torch.float32),
            "shapes": {name: dict(zip(("d_model", "layers", "heads", "seq", "batch", "vocab", "steps", "warmup"),
                                      SHAPES[name], strict=True)) for name in args.shapes},
            "results": [dataclasses.asdict(r) | {"spread": r.spread} for r in rows],
            "startup": startup,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
