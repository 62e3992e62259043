"""`trainer.torch_compile`: regional compilation of the decoder layers, and a one-time check that it pays.

Each `IronCoreDecoderLayer` is compiled in place with `nn.Module.compile()` (TorchInductor), as torchtitan compiles
each transformer block. The layers are identical in structure, so dynamo traces one graph and every layer reuses
it: compile time does not grow with depth. Compiling in place (rather than `torch.compile(model)`, which wraps
the model in an `OptimizedModule`) keeps the module tree as it is, so state-dict keys never carry `_orig_mod.`,
checkpoints of compiled and uncompiled runs are interchangeable, and the export is the plain model. Embeddings,
the loss and the optimizer stay eager; Accelerate's whole-model compile is never used (translate.py passes
`dynamo_backend="no"`).

Compiling does not always gain: on a CPU with few cores a small model can run slower compiled than eager.
`compile_model` therefore times one layer's forward + backward both ways on this device, at the run's micro batch
and sequence length, before training, and logs the outcome once: a warning when the compiled layer lost every one
of `SPEED_CHECK_ROUNDS` back-to-back pairs (a sign test: equal speeds do that by chance once in 2^rounds), an info
line otherwise. Pairs rather than totals, because on a shared machine the load changes between rounds but hardly
within one. The check runs on a copy of the first layer, so it works before any wrapping (DDP, FSDP, DeepSpeed)
and never touches the trained weights, their gradients or the RNG; for full unpadded rows, the graph it compiles
is the one the model's layers then reuse, so it adds the timing rounds and no compile.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch import nn

from ironcore.config.schema import RunConfig

logger = get_logger(__name__)

BACKEND = "inductor"
REGION = "model.layers.<i> (IronCoreDecoderLayer)"
SPEED_CHECK_ROUNDS = 7  # eager-then-compiled pairs of one layer's forward + backward


@dataclass(frozen=True)
class SpeedCheck:
    """Seconds of one decoder layer's forward + backward on `rows` x `seq_length` tokens, eager and compiled, one
    pair per round."""

    eager: tuple[float, ...]
    compiled: tuple[float, ...]
    rows: int
    seq_length: int

    @property
    def compiled_wins(self) -> int:
        return sum(c < e for e, c in zip(self.eager, self.compiled, strict=True))

    @property
    def speedup(self) -> float:
        """Median eager time over median compiled time."""
        return statistics.median(self.eager) / statistics.median(self.compiled)


def compile_plan(run: RunConfig) -> dict[str, object] | None:
    """What a launch compiles (`ironcore config --explain`), or None when trainer.torch_compile is off."""
    if not run.trainer.torch_compile:
        return None
    return {
        "regions": f"{REGION} x {run.model.num_layers}, each compiled in place with nn.Module.compile",
        "backend": BACKEND,
        "eager": "embeddings, final norm, lm_head, loss, optimizer",
        "speed_check": (f"one layer's forward+backward at {run.trainer.micro_batch_size} x {run.data.seq_length} "
                        f"tokens timed eager then compiled, {SPEED_CHECK_ROUNDS} rounds, before training; logged "
                        f"once, a warning if compiled lost every round"),
    }


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an (unwrapped) IronCoreForCausalLM."""
    return model.model.layers


def compile_layers(model: nn.Module) -> None:
    """Compile every decoder layer in place: the module tree, parameter names and state-dict keys stay the same."""
    for layer in decoder_layers(model):
        layer.compile(backend=BACKEND)


def compile_model(run: RunConfig, model: nn.Module, accelerator: Accelerator) -> None:
    """trainer.torch_compile: compile the decoder layers in place, then log once whether that is faster here.

    Call it on the plain model before `accelerator.prepare` wraps or shards it: the speed check copies its first
    layer whole, and FSDP/ZeRO-3 make that layer's parameters shards. A DPO reference copied earlier stays eager.
    """
    if not run.trainer.torch_compile:
        return
    check = speed_check(model, accelerator, run.trainer.micro_batch_size, run.data.seq_length)
    compile_layers(model)
    level, message = verdict(check, accelerator.device.type, len(decoder_layers(model)))
    logger.log(level, message, main_process_only=True)


def verdict(check: SpeedCheck, device_type: str, layers: int) -> tuple[int, str]:
    """The one log line of a compiled run: a warning when the compiled layer lost every round to eager."""
    compiled_ms, eager_ms = statistics.median(check.compiled) * 1e3, statistics.median(check.eager) * 1e3
    measured = (f"one layer's forward+backward at {check.rows} x {check.seq_length} tokens on {device_type}: median "
                f"{compiled_ms:.2f} ms compiled, {eager_ms:.2f} ms eager, compiled faster in {check.compiled_wins} of "
                f"{len(check.eager)} rounds")
    if check.compiled_wins == 0:
        return logging.WARNING, (f"trainer.torch_compile: compiled is slower than eager on this device ({measured}); "
                                 f"training stays compiled as configured, trainer.torch_compile=false runs eager")
    return logging.INFO, (f"trainer.torch_compile: {layers} decoder layers compiled in place ({measured}; "
                          f"{check.speedup:.2f}x)")


def speed_check(model: nn.Module, accelerator: Accelerator, rows: int, seq_length: int) -> SpeedCheck:
    """Time a compiled copy of the first decoder layer against the same copy eager, on full rows of the run's
    shape, inputs made by the model's own embedding-side code (position embeddings, attention mask)."""
    device = accelerator.device
    layer = copy.deepcopy(decoder_layers(model)[0]).to(device).train()
    layer.compile(backend=BACKEND)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        run_layer = layer_step(model, layer, accelerator, rows, seq_length)
        run_layer()  # compiles
        with torch.compiler.set_stance("force_eager"):
            run_layer()
        eager, compiled = [], []
        for _ in range(SPEED_CHECK_ROUNDS):
            with torch.compiler.set_stance("force_eager"):
                eager.append(timed(run_layer, device))
            compiled.append(timed(run_layer, device))
    return SpeedCheck(tuple(eager), tuple(compiled), rows, seq_length)


def layer_step(model: nn.Module, layer: nn.Module, accelerator: Accelerator, rows: int,
               seq_length: int) -> Callable[[], None]:
    """One forward + backward of `layer` (a copy, so its gradients are its own) on unpadded full rows."""
    device, base = accelerator.device, model.model
    dtype = next(layer.parameters()).dtype
    hidden = torch.randn(rows, seq_length, model.config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    position_ids = torch.arange(seq_length, device=device).expand(rows, -1)
    padding = torch.ones(rows, seq_length, dtype=torch.long, device=device)
    with torch.no_grad():
        mask, kwargs = base._attention_inputs(hidden, padding, position_ids, None, 0, {})
        position_embeddings = base.rotary_emb(hidden, position_ids) if base.rotary_emb is not None else None

    def step() -> None:
        with accelerator.autocast():
            out = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                        position_ids=position_ids, cache=None, **kwargs)
        out.float().sum().backward()
        layer.zero_grad(set_to_none=True)
        hidden.grad = None

    return step


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds of one `fn()` call, the device drained before and after."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
    return time.perf_counter() - start
