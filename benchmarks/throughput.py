"""Training throughput of IronCore's step, eager and compiled, against HF Trainer and a plain PyTorch loop, in one run.

The four implementations train the same GPT-2-shaped model (pre-LN, learned positions, tanh GELU, tied
embeddings, dropout 0, SDPA attention) on the same synthetic token batches, at the same micro batch and
precision, with AdamW (same lr, betas, eps, weight decay) and gradient clipping at 1.0:

- ``ironcore``: the real step, `ironcore.loop.Loop.train_step`, on a model from `build_model` and an
  Accelerator from `build_accelerator`, exactly as `ironcore train` builds them;
- ``ironcore_compiled``: the same with `trainer.torch_compile=true` (each decoder layer compiled in place by
  `ironcore.compilation.compile_model`, as `ironcore train` does; compiling happens before the timed steps);
- ``hf_trainer``: `transformers.Trainer` training the equivalent `GPT2LMHeadModel`, timed from
  ``on_step_begin`` to ``on_step_end`` (data loading before a step is not counted, as for the other two);
- ``plain_pytorch``: forward, backward, clip, AdamW step on the same `GPT2LMHeadModel`, no framework: the floor.

Each step is timed alone (synchronised on accelerators) after `--warmup` steps; ms/step is the median step
time and tokens/s is tokens per step over it (the median, because a step that another process slowed down on
a shared machine should not decide the comparison; mean and min are in the JSON too). MFU uses
`ironcore.metrics.flops_per_token` of each model and one `peak_flops` value for all four (on CPU a measured
matmul rate, so CPU MFU is relative to what a plain GEMM achieves).

Run from the repository root: ``python benchmarks/throughput.py`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/throughput.py` from a checkout

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


@dataclasses.dataclass(frozen=True)
class Shape:
    """Model and batch shape shared by the four implementations."""

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


@dataclasses.dataclass
class Result:
    implementation: str
    params: int
    tokens_per_sec: float
    ms_per_step: float
    ms_per_step_mean: float
    ms_per_step_min: float
    flops_per_token: float
    vocab_size: int
    device: torch.device = dataclasses.field(repr=False, compare=False)
    mfu: float = float("nan")
    vs_plain: float = float("nan")


SHORT = {"d_model": 64, "layers": 2, "heads": 2, "seq": 64, "batch": 4, "vocab": 512, "steps": 4, "warmup": 2}
DEFAULT = {"d_model": 256, "layers": 4, "heads": 4, "seq": 256, "batch": 8, "vocab": 8192, "steps": 20, "warmup": 3}


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


def fresh_accelerate_state() -> None:
    """Forget the previous implementation's Accelerator so the next one configures its own (same process)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def bench_ironcore(shape: Shape, batches: list[Batch], warmup: int, work_dir: Path, *,
                   compiled: bool = False) -> Result:
    """`Loop.train_step` as `ironcore.loop.train` sets it up (the result also gives the device and padded vocab);
    `compiled`: with trainer.torch_compile, whose layers compile (and whose speed check runs) before the timed steps."""
    from ironcore.compilation import compile_model
    from ironcore.config import load_config
    from ironcore.models import build_model
    from ironcore.optim import build_optimizer, build_scheduler
    from ironcore.tasks import LanguageModeling
    from ironcore.loop import Loop
    from ironcore.translate import build_accelerator

    name = "ironcore_compiled" if compiled else "ironcore"
    out_dir = work_dir / name
    overrides = [*ironcore_overrides(shape, out_dir, len(batches)), f"trainer.torch_compile={str(compiled).lower()}"]
    run = load_config(None, overrides, world_size=1)
    accelerator = build_accelerator(run)
    model = build_model(run)
    compile_model(run, model, accelerator)
    optimizer = build_optimizer(model, run.optim, accelerator.device.type)
    scheduler = build_scheduler(optimizer, run.optim, run.operation.train_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loop = Loop(run, out_dir, accelerator, model, optimizer, scheduler, LanguageModeling(), data=None)
    try:
        times = time_steps(lambda batch, number: loop.train_step([batch], number), batches, accelerator.device)
    finally:
        if loop.metrics is not None:
            loop.metrics.close()
    return summarize(name, accelerator.unwrap_model(model), shape, times[warmup:], accelerator.device)


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


def bench_plain(shape: Shape, batches: list[Batch], warmup: int, vocab_size: int, device: torch.device) -> Result:
    """Forward (autocast for bf16), backward, clip, fused AdamW: what any framework adds is measured against this."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    model = gpt2_model(shape, vocab_size).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
        fused=device.type in _get_fused_kernels_supported_devices(),
    )

    def step(batch: Batch, number: int) -> None:
        inputs = {k: batch[k].to(device, non_blocking=True) for k in GPT2_KEYS}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=shape.bf16):
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = time_steps(step, batches, device)
    return summarize("plain_pytorch", model, shape, times[warmup:], device)


class _Rows(torch.utils.data.Dataset):
    """The synthetic batches as rows, in order, for the Trainer's DataLoader (GPT-2's four input keys)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.rows = [{k: b[k][i] for k in GPT2_KEYS} for b in batches for i in range(b["input_ids"].shape[0])]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Batch:
        return self.rows[index]


def bench_hf_trainer(
    shape: Shape, batches: list[Batch], warmup: int, vocab_size: int, device: torch.device, work_dir: Path
) -> Result:
    """`Trainer.train()` for exactly len(batches) steps; each step timed by a callback."""
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
        output_dir=str(work_dir / "hf_trainer"),
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
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    timer = StepTimer()
    model = gpt2_model(shape, vocab_size)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(batches), callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary into our table
    trainer.train()
    return summarize("hf_trainer", model, shape, timer.times[warmup:], device)


# ---------------------------------------------------------------- results


def summarize(name: str, model: torch.nn.Module, shape: Shape, times: list[float], device: torch.device) -> Result:
    median = statistics.median(times)
    return Result(
        implementation=name,
        params=unique_params(model),
        tokens_per_sec=shape.tokens_per_step / median,
        ms_per_step=median * 1e3,
        ms_per_step_mean=statistics.fmean(times) * 1e3,
        ms_per_step_min=min(times) * 1e3,
        flops_per_token=model_flops_per_token(model, shape),
        vocab_size=model.config.vocab_size,
        device=device,
    )


def table(results: list[Result]) -> str:
    header = (f"| {'implementation':<17} | {'params':>10} | {'tokens/s':>10} | {'ms/step':>9} | {'MFU':>7} "
              f"| {'vs plain':>8} |")
    rule = "|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|"
    rows = [
        f"| {r.implementation:<17} | {r.params:>10,} | {r.tokens_per_sec:>10,.0f} | {r.ms_per_step:>9.1f} | "
        f"{r.mfu * 100:>6.2f}% | {r.vs_plain:>7.2f}x |"
        for r in results
    ]
    return "\n".join([header, rule, *rows])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="CI mode: tiny model, few steps (< 60 s on 2 CPU cores)")
    parser.add_argument("--steps", type=int, help="timed steps per implementation (default 20; --short 4)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them (default 3; --short 2)")
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--seq", type=int, help="sequence length (tokens per row)")
    parser.add_argument("--batch", type=int, help="micro batch size (rows per step)")
    parser.add_argument("--vocab", type=int, help="vocabulary size (IronCore pads it to trainer.vocab_padding_unit; "
                                                   "the GPT-2 models get the padded size too)")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="float32, or bfloat16 autocast over float32 weights in all four")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the four-way comparison N times and keep each implementation's fastest round "
                             "(for shared, noisy machines)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    defaults = SHORT if args.short else DEFAULT
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0 or args.repeat < 1:
        parser.error("--steps and --repeat must be >= 1 and --warmup >= 0")
    if args.d_model % args.heads:
        parser.error(f"--d-model {args.d_model} must be divisible by --heads {args.heads}")
    return args


def compare(shape: Shape, batches: list[Batch], warmup: int, work_dir: Path) -> list[Result]:
    """One round: IronCore eager, IronCore compiled, HF Trainer, then the plain loop, each with a fresh model,
    optimizer and Accelerator."""
    ironcore = bench_ironcore(shape, batches, warmup, work_dir)
    fresh_accelerate_state()
    release(ironcore.device)
    compiled = bench_ironcore(shape, batches, warmup, work_dir, compiled=True)
    fresh_accelerate_state()
    release(ironcore.device)
    hf = bench_hf_trainer(shape, batches, warmup, ironcore.vocab_size, ironcore.device, work_dir)
    fresh_accelerate_state()
    release(ironcore.device)
    plain = bench_plain(shape, batches, warmup, ironcore.vocab_size, ironcore.device)
    return [ironcore, compiled, hf, plain]


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
    """Keep the table readable: the libraries' INFO logs and deprecation chatter are not results."""
    import transformers

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One device for all four: with several GPUs visible, Trainer would wrap its model in nn.DataParallel.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    shape = Shape(args.d_model, args.layers, args.heads, args.seq, args.batch, args.vocab, args.precision)
    batches = synthetic_batches(shape, args.warmup + args.steps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what build_accelerator picks
    dtype = torch.bfloat16 if shape.bf16 else torch.float32
    best: dict[str, Result] = {}
    with quiet(), tempfile.TemporaryDirectory(prefix="ironcore-bench-") as tmp:
        peak = peak_flops(device, dtype)  # before any model exists: on CPU it times a matmul
        for _ in range(args.repeat):
            for result in compare(shape, batches, args.warmup, Path(tmp)):
                if result.implementation not in best or result.ms_per_step < best[result.implementation].ms_per_step:
                    best[result.implementation] = result
    device, vocab_size = best["ironcore"].device, best["ironcore"].vocab_size
    results = list(best.values())
    plain = best["plain_pytorch"]
    for r in results:
        r.mfu = mfu(r.tokens_per_sec, r.flops_per_token, peak)
        r.vs_plain = r.tokens_per_sec / plain.tokens_per_sec

    device_name = describe_device(device)
    print(f"device: {device_name} | torch {torch.__version__} | attention: sdpa (all four) | "
          f"precision: {shape.precision}")
    print(f"shape: d_model {shape.d_model}, layers {shape.layers}, heads {shape.heads}, seq {shape.seq}, "
          f"batch {shape.batch}, vocab {shape.vocab} (model vocab {vocab_size}) | {args.steps} timed steps after "
          f"{args.warmup} warmup | peak {peak / 1e12:.3f} TFLOP/s ({peak_source(device, dtype)})")
    print(table(results))
    compiled_vs_eager = best["ironcore_compiled"].tokens_per_sec / best["ironcore"].tokens_per_sec
    print(f"ironcore_compiled / ironcore: {compiled_vs_eager:.2f}x tokens/s (trainer.torch_compile on this device)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "device": device_name,
            "torch": torch.__version__,
            "shape": dataclasses.asdict(shape) | {"model_vocab": vocab_size},
            "steps": args.steps,
            "warmup": args.warmup,
            "peak_flops": peak,
            "peak_source": peak_source(device, dtype),
            "repeat": args.repeat,
            "compiled_vs_eager": compiled_vs_eager,
            "results": [{k: v for k, v in dataclasses.asdict(r).items() if k != "device"} for r in results],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
