"""bf16 training on a CPU without bf16 matrix units: its matmuls as fp32 GEMMs on bf16-rounded operands.

Why: on an x86 CPU with neither AVX512-BF16 nor AMX, PyTorch's bf16 GEMMs take a slow fallback, 8-25x slower than
its fp32 GEMMs on the same CPU (benchmarks/README.md), and a bf16 run (the spec's default precision) trains that
much slower than fp32. The numbers need no bf16 hardware: a product of two bf16 values is exact in fp32 (8 + 8
significand bits of fp32's 24), and bf16 GEMMs accumulate in fp32. So rounding the operands to bf16, multiplying
them with the fp32 GEMM and rounding the result to bf16 computes what the bf16 GEMM computes, up to the order of
the fp32 sums (`tests/test_cpu_bf16.py` states the tolerance), at the fp32 GEMM's speed.

`Bf16OnFp32Gemms` is a torch function mode that does this for the two ops that carry a transformer's FLOPs,
`F.linear` and `F.scaled_dot_product_attention`, wherever they would compute in bf16 on the CPU: under CPU bf16
autocast (Accelerate's mixed precision) or on bf16 tensors (DeepSpeed's and FSDP's bf16 parameters). Every output
and gradient is rounded to bf16 where autocast's would be. A linear layer saves its bf16 input, as autocast does,
but not a bf16 copy of its weight: it saves the weight itself (a parameter, no memory) and rounds it to bf16 a chunk
at a time in forward and again in backward. Autocast's graph holds a bf16 copy of every weight from forward until
backward reaches it: 2 bytes per parameter at the end of forward (benchmarks/README.md). Attention without a mask
or dropout calls PyTorch's fp32 CPU flash kernels and saves bf16 q, k, v and output, as native bf16 flash does; with
a mask or dropout it runs the fp32 op under autograd, which saves fp32 copies. With dropout, PyTorch's CPU SDPA
computes a bf16 call in fp32 itself, and the results are bit for bit the same. Other ops run unchanged.

`translate.build_accelerator` puts the mode inside `accelerator.autocast()` when the run asks for bfloat16 on such a
CPU (`translate.bf16_on_fp32_gemms`), so every forward the loop runs under autocast gets it. Eager attention
(`torch.matmul`) is left to autocast: the default SDPA path is the one made fast.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:  # this module imports only torch: benchmarks/throughput.py's parent process reads gemm_dtype
    from accelerate import Accelerator

BF16 = torch.bfloat16
_FLOATS = (torch.float32, torch.bfloat16)
X86_MACHINES = ("x86_64", "amd64")  # platform.machine(), lowercased


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: AVX512-BF16 or AMX on x86 (other architectures are
    not probed and are taken to have it)."""
    if platform.machine().lower() not in X86_MACHINES:
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def gemm_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the GEMMs that IronCore's `dtype` matmuls run on (whose peak MFU is measured against): fp32
    for bf16 on a CPU without bf16 matrix units, `dtype` itself everywhere else."""
    return torch.float32 if dtype == BF16 and device_type == "cpu" and not cpu_has_native_bf16() else dtype


class Bf16OnFp32Gemms(TorchFunctionMode):
    """Route CPU bf16 `F.linear` and `F.scaled_dot_product_attention` calls through fp32 GEMMs (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return _linear(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return _attention(*args, **kwargs)
        return func(*args, **kwargs)


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    tensors = (input, weight) if bias is None else (input, weight, bias)
    if not computes_in_bf16(tensors):
        return F.linear(input, weight, bias)
    return Bf16Linear.apply(input.to(BF16), weight, bias)  # weight and bias are rounded chunk by chunk


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> torch.Tensor:
    options = dict(dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if not computes_in_bf16((query, key, value)):
        return F.scaled_dot_product_attention(query, key, value, attn_mask, **options)
    q, k, v = (t.to(BF16) for t in (query, key, value))
    if attn_mask is None and dropout_p == 0.0 and q.shape[1] == k.shape[1] and q.shape[-2] == k.shape[-2]:
        return Bf16FlashAttention.apply(q, k, v, is_causal, scale)  # training's case: bf16 tensors saved
    if attn_mask is not None and attn_mask.is_floating_point():  # autocast casts an additive mask too
        attn_mask = attn_mask.to(BF16).float()
    with torch.autocast("cpu", enabled=False):  # a mask, dropout, GQA: the fp32 op under autograd
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask, **options).to(BF16)


def computes_in_bf16(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether this CPU op would compute in bf16: under CPU bf16 autocast on fp32/bf16 tensors, or outside autocast
    on bf16 tensors only (mixed dtypes there are the caller's error, left to the op to raise)."""
    if any(t.device.type != "cpu" or t.dtype not in _FLOATS for t in tensors):
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16:
        return True
    return all(t.dtype == BF16 for t in tensors)


class Bf16FlashAttention(torch.autograd.Function):
    """Causal or full SDPA without mask or dropout on bf16 (B, H, T, D) q, k, v: PyTorch's fp32 CPU flash kernels,
    bf16 out and gradients; saves the bf16 q, k, v, out and the fp32 log-sum-exp, as native bf16 flash does."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
                scale: float | None) -> torch.Tensor:
        out = torch.empty_like(q)  # before the fp32 temporaries, as in Bf16Linear
        out32, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.float(), k.float(), v.float(), 0.0, is_causal, scale=scale)
        out.copy_(out32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        grads = [torch.empty_like(t) for t in (q, k, v)]
        grads32 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.0, ctx.is_causal, scale=ctx.scale)
        for g, g32 in zip(grads, grads32, strict=True):
            g.copy_(g32)
        return (*grads, None, None)


# fp32 elements of one chunk of a linear layer's output (16 MiB): the fp32 copies of a chunk of W and of the output
# or its gradient are what the fp32 GEMMs add to bf16's memory, so a vocabulary-sized lm_head stays within it.
CHUNK_ELEMENTS = 2**22


class Bf16Linear(torch.autograd.Function):
    """y = x W^T + b on bf16 x and fp32 or bf16 W, b, as a bf16 GEMM computes it: fp32 GEMMs over chunks of W's rows
    rounded to bf16, bf16 out and input gradient, W's and b's gradients rounded to bf16 and given in their own dtype
    (what autocast's cast gives back). Saves the bf16 x and W itself: no bf16 copy of the weight lives until
    backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        # What outlives the call is allocated before the fp32 temporaries, so freeing them leaves no hole behind it.
        # Returned as allocated, not as a view: a view made inside a Function cannot be written in place after
        # (the model masks padded vocabulary logits in place).
        out = x.new_empty(*x.shape[:-1], weight.shape[0])  # (..., out) bf16
        rows = out.view(-1, weight.shape[0])  # (N, out)
        x32 = x.reshape(-1, x.shape[-1]).float()  # (N, in)
        with torch.autocast("cpu", enabled=False):
            for c in output_chunks(x32.shape[0], weight.shape[0]):
                rows[:, c] = F.linear(x32, as_bf16_fp32(weight[c]), None if bias is None else as_bf16_fp32(bias[c]))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad  # need_b is False without a bias
        grad = grad.reshape(-1, grad.shape[-1])  # (N, out) bf16
        # The gradients first, then the fp32 temporaries (as in forward)
        grad_x = x.new_empty(x.shape) if need_x else None  # contiguous, whatever x's layout
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = grad.sum(0, dtype=torch.float32).to(BF16).to(ctx.bias_dtype) if need_b else None
        x32 = x.reshape(-1, x.shape[-1]).float()  # (N, in)
        grad_x32 = torch.zeros_like(x32) if need_x else None
        with torch.autocast("cpu", enabled=False):
            for c in output_chunks(x32.shape[0], weight.shape[0]):
                g = grad[:, c].float()  # (N, chunk)
                if need_x:
                    grad_x32.addmm_(g, as_bf16_fp32(weight[c]))
                if need_w:
                    grad_w[c] = (g.T @ x32).to(BF16)
        if need_x:
            grad_x.view(-1, x.shape[-1]).copy_(grad_x32)  # rounded to bf16
        return grad_x, grad_w, grad_b


def as_bf16_fp32(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to bf16, in fp32: the operand a bf16 GEMM sees, for the fp32 GEMM."""
    return t.to(BF16).float()


def output_chunks(rows: int, features: int) -> list[slice]:
    """Slices of a linear layer's output features, each at most CHUNK_ELEMENTS of an (rows, chunk) output."""
    size = max(256, CHUNK_ELEMENTS // max(rows, 1))
    return [slice(start, start + size) for start in range(0, features, size)]


def autocast_on_fp32_gemms(accelerator: Accelerator) -> None:
    """Make `accelerator.autocast()` also enter `Bf16OnFp32Gemms`: the loop, evaluation, DPO's reference scoring and
    the compile speed check all run their forwards under it."""
    autocast = accelerator.autocast

    @contextmanager
    def autocast_and_fp32_gemms(autocast_handler=None) -> Iterator[None]:
        with autocast(autocast_handler), Bf16OnFp32Gemms():
            yield

    accelerator.autocast = autocast_and_fp32_gemms
