"""Throughput, MFU, memory and norm measurements, and the run's metrics.jsonl writer.

MFU follows PaLM (Chowdhery et al. 2022, appendix B): model FLOPs per token = 6N + 12 L T d_attn, with N
the parameters that take part in matmuls (a tied lm_head counts once, embedding lookups do not), L layers,
T the sequence length and d_attn = heads x head_dim. The attention term is not halved for the causal mask
(PaLM's convention) and recomputation is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import resource
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

GIB = 2**30

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets, per GPU. Patterns are
# matched in order against torch.cuda.get_device_name(), so specific variants precede their family.
# A dtype missing from an entry (e.g. bf16 on V100) falls back to a measurement.
_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"H[18]00", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"B200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0}),
    (r"A[18]00", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"RTX A6000", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    (r"L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"L40\b", {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"V100-PCIE", {"fp16": 112.0, "fp32": 14.0}),
    (r"V100", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bT4\b", {"fp16": 65.0, "fp32": 8.1}),
)

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def flops_per_token(
    num_params_nonembedding: int, num_layers: int, seq_len: int, d_attn: int, *, training: bool = True
) -> float:
    """Model FLOPs per token, PaLM appendix B: ``6N + 12 L T d_attn`` (forward + backward).

    With ``training=False`` the forward-only cost ``2N + 4 L T d_attn`` (e.g. a DPO reference model).
    """
    per_pass = 2.0 * num_params_nonembedding + 4.0 * num_layers * seq_len * d_attn
    return 3.0 * per_pass if training else per_pass


def non_embedding_param_count(model: nn.Module) -> int:
    """N of `flops_per_token`: all parameters except `nn.Embedding` tables that no other module uses.

    A tied lm_head shares the token embedding tensor and its matmul runs for every token, so that tensor
    counts (once); an untied token embedding and a learned position embedding are lookups and do not.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    used_elsewhere = {
        id(p)
        for m in model.modules()
        if not isinstance(m, nn.Embedding)
        for p in m.parameters(recurse=False)
    }
    lookups = embedding_ids - used_elsewhere
    return sum(p.numel() for p in model.parameters() if id(p) not in lookups)


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over peak FLOP/s of the same devices.

    Pass per-device throughput with a per-device peak (or global throughput with world_size x peak).
    """
    return tokens_per_sec * flops_per_token / peak_flops


def _dtype_key(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype not in _DTYPE_KEYS:
        raise ValueError(f"no peak FLOP/s for dtype {dtype}; expected bfloat16, float16 or float32")
    return _DTYPE_KEYS[dtype]


def lookup_peak_tflops(device_name: str, dtype: torch.dtype | str, *, tf32: bool = False) -> float | None:
    """Datasheet dense peak TFLOP/s of a CUDA device by name, or None when the device or dtype is unknown.

    With ``tf32=True`` an fp32 lookup returns the TF32 tensor-core peak (torch's fp32 matmuls use it when
    `torch.set_float32_matmul_precision` is "high" or "medium").
    """
    key = _dtype_key(dtype)
    if key == "fp32" and tf32:
        key = "tf32"
    for pattern, peaks in _PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peaks.get(key)
    return None


@functools.lru_cache(maxsize=None)
def measure_matmul_flops(device: str, dtype: torch.dtype) -> float:
    """Best achieved FLOP/s of a square matmul (2048 on CPU, 4096 on accelerators) on `device`, measured once.

    The best of several single-call timings (about 0.5 s of them after a warm-up), not their mean: another
    process loading the machine for a while slows some calls but rarely all of them, and a peak measured too
    low makes MFU exceed 1 (the training loop also raises a measured peak that its own steps beat). The matmul
    runs on torch's intra-op threads, as training does. A path whose warm-up call (n=1024) already takes over
    0.5 s (e.g. fp16 matmul on CPU) is measured by that call.
    """
    dev = torch.device(device)

    def timings(n: int, *, at_least: int, budget_s: float) -> list[float]:
        """Seconds of single matmul calls: `at_least` of them, more until `budget_s` is spent (at most 50)."""
        # operands from a private generator: a draw from the global one would shift the run's dropout masks,
        # and only in the first run of a process (the measurement is cached)
        gen = torch.Generator(device=dev).manual_seed(0)
        a = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
        out: list[float] = []
        while len(out) < at_least or (sum(out) < budget_s and len(out) < 50):
            if dev.type != "cpu":
                torch.accelerator.synchronize(dev)
            start = time.perf_counter()
            torch.matmul(a, b)
            if dev.type != "cpu":
                torch.accelerator.synchronize(dev)
            out.append(time.perf_counter() - start)
        return out

    (warmup,) = timings(1024, at_least=1, budget_s=0.0)
    if warmup > 0.5:
        return 2.0 * 1024**3 / warmup
    # the bigger size only where one call stays short (~0.2 s), so a busy machine cannot stretch this to many seconds
    n = (2048 if warmup < 0.025 else 1024) if dev.type == "cpu" else 4096
    return 2.0 * n**3 / min(timings(n, at_least=3, budget_s=0.5))


def peak_flops(device: torch.device | str, dtype: torch.dtype | str, override_tflops: float | None = None) -> float:
    """Peak FLOP/s of one device for MFU: `trainer.peak_tflops` if given, else the datasheet, else measured.

    CUDA devices are looked up by name in a table of dense tensor-core peaks; CPUs and unknown devices
    get a short matmul benchmark (`measure_matmul_flops`), logged as measured, so MFU there is relative
    to what a plain matmul achieves rather than to a theoretical peak.
    """
    if override_tflops is not None:
        return override_tflops * 1e12
    dev = torch.device(device)
    key = _dtype_key(dtype)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[key]
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        tf32 = torch.get_float32_matmul_precision() != "highest"
        tflops = lookup_peak_tflops(name, torch_dtype, tf32=tf32)
        if tflops is not None:
            return tflops * 1e12
    else:
        name = dev.type
    measured = measure_matmul_flops(str(dev), torch_dtype)
    logger.info(
        "Peak %s FLOP/s of %s is not in the table: measured %.1f TFLOP/s with a matmul benchmark "
        "(set trainer.peak_tflops to override)", key, name, measured / 1e12,
    )
    return measured


def memory_report(device: torch.device | str) -> dict[str, float]:
    """Memory in GiB, keys without a prefix (the caller namespaces them).

    CUDA: ``allocated_gib``, ``reserved_gib``, ``max_allocated_gib`` of the caching allocator. CPU: the
    process's ``rss_gib`` (from /proc/self/statm, Linux only) and ``max_rss_gib`` (peak, from getrusage).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return {
            "allocated_gib": torch.cuda.memory_allocated(dev) / GIB,
            "reserved_gib": torch.cuda.memory_reserved(dev) / GIB,
            "max_allocated_gib": torch.cuda.max_memory_allocated(dev) / GIB,
        }
    report = {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
    statm = Path("/proc/self/statm")
    if statm.exists():
        resident_pages = int(statm.read_text().split()[1])
        report["rss_gib"] = resident_pages * resource.getpagesize() / GIB
    return report


def global_norm(tensors: Iterable[torch.Tensor | None], norm_type: float = 2.0) -> float:
    """The p-norm of all given tensors as one vector (None entries, e.g. missing grads, are skipped).

    Pass ``model.parameters()`` for the parameter norm or ``(p.grad for p in model.parameters())`` for
    the gradient norm. FSDP2 DTensor shards are reduced to the full norm (a collective: call it on every
    rank). DeepSpeed ZeRO partitions gradients itself: use its engine's ``get_global_grad_norm()`` there.
    """
    present = [t.detach() for t in tensors if t is not None]
    total = torch.nn.utils.get_total_norm(present, norm_type)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    return float(total.item())


def _jsonable(value: Any) -> Any:
    """Plain JSON values: tensors and numpy scalars become numbers, NaN/Inf become null (strict JSON)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    elif hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class MetricsLog:
    """Appends one JSON object per line to ``run_dir/metrics.jsonl``; each line is flushed as written.

    Append mode keeps the history of a resumed run in the same file (steps after the resumed checkpoint
    then appear twice; readers keep the last record per step). Only the main process should own one.
    """

    def __init__(self, run_dir: Path | str) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Write ``{"step": step, "time": unix seconds, **metrics}``; non-finite numbers are written as null."""
        record: dict[str, Any] = {} if step is None else {"step": int(step)}
        record["time"] = round(time.time(), 3)
        record.update(_jsonable(dict(metrics)))
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
