"""bf16 on fp32 GEMMs (ironcore/cpu_bf16.py): the numbers of PyTorch's own bf16 ops, and a bf16 run on a CPU
without bf16 matrix units that trains like the native path, resumes bitwise, exports and generates.

Whether this CPU has the units is replaced where a test needs one answer (`ironcore.cpu_bf16.cpu_has_native_bf16`,
in process or through the helpers_dist hook), so both paths run on any x86 host.
"""

from __future__ import annotations

import platform
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_dist import BASELINE, DROPOUT, assert_bitwise_equal, child_env, run
from helpers_train import (
    assert_plain_transformers_generates_as_ironcore, load_example, read_metrics, reset_accelerate, restored_environ,
    series, train_in_process,
)

import ironcore.cpu_bf16
from ironcore.cpu_bf16 import X86_MACHINES, Bf16OnFp32Gemms, gemm_dtype
from ironcore.translate import LaunchEnv, build_accelerator

BF16 = torch.bfloat16
ULP = 2.0**-7  # one unit in the last place of a bf16 value in [1, 2): its relative spacing
# Native bf16 SDPA (the CPU flash kernel) rounds its attention probabilities to bf16 before P @ V; the fp32 GEMMs
# keep them fp32. Measured: 3e-3 of the largest value, below one bf16 ULP of it.
ATTENTION_ATOL = ULP
# bf16 training through the two paths, 6 steps of the tiny model: the losses differ by at most this, relative
# (measured: 1.5e-5 with dropout 0.1, 1.9e-5 without; one bf16 rounding is 4e-3).
LOSS_RTOL = 1e-4


def within_one_ulp(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Elementwise at most one bf16 rounding apart: summation order can move a value across a rounding boundary.
    A value that cancels to near zero keeps the fp32 sums' absolute error instead, 1e-5 of the largest value."""
    got, want = got.float(), want.float()
    bound = ULP * torch.maximum(got.abs(), want.abs()) + 1e-5 * want.abs().max()
    return bool(((got - want).abs() <= bound).all())


def linear_and_grads(fp32_gemms: bool, bias: bool) -> list[torch.Tensor]:
    """y = x W^T + b under CPU bf16 autocast (fp32 leaves, as Accelerate's mixed precision has them), and the
    gradients of x, W, b for a fixed upstream gradient."""
    torch.manual_seed(0)
    x = torch.randn(4, 64, 96, requires_grad=True)
    weight = (torch.randn(160, 96) * 0.1).requires_grad_()
    b = torch.randn(160, requires_grad=True) if bias else None
    with torch.autocast("cpu", dtype=BF16), (Bf16OnFp32Gemms() if fp32_gemms else nullcontext()):
        y = F.linear(x, weight, b)
    y.backward(torch.randn(y.shape).to(BF16))
    return [y, x.grad, weight.grad, *([b.grad] if bias else [])]


@pytest.mark.parametrize("bias", [True, False])
def test_linear_on_fp32_gemms_equals_native_bf16_to_one_rounding(bias):
    native, ours = linear_and_grads(False, bias), linear_and_grads(True, bias)
    assert ours[0].dtype == BF16 and [g.dtype for g in ours[1:]] == [torch.float32] * len(ours[1:])
    for got, want in zip(ours, native, strict=True):
        assert within_one_ulp(got, want)
        assert (got == want).float().mean() > 0.99  # mostly bit for bit: the same products, summed in fp32


def test_linear_saves_the_weight_itself_not_a_bf16_copy():
    """Autocast saves a bf16 copy of W from forward to backward; Bf16Linear saves W and rounds it again in backward,
    so its graph holds no weight-sized bf16 tensor and W's gradient goes straight to its AccumulateGrad."""
    x = torch.randn(8, 32, requires_grad=True)
    weight = torch.randn(16, 32, requires_grad=True)
    saved = []  # what the graph saves for backward, as it is saved

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=BF16), Bf16OnFp32Gemms():
            y = F.linear(x, weight)
    assert any(t is weight for t in saved) and not any(t.dtype == BF16 and t.shape == weight.shape for t in saved)
    weight_node = y.grad_fn.next_functions[1][0]
    assert type(weight_node).__name__ == "AccumulateGrad" and weight_node.variable is weight


def test_linear_output_can_be_written_in_place():
    """The model masks padded-vocabulary logits in place; a Function's output that is a view could not take that."""
    x = torch.randn(2, 5, 32, requires_grad=True)  # (B, T, C): reshaped to rows inside
    weight = torch.randn(16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16), Bf16OnFp32Gemms():
        logits = F.linear(x, weight)
        logits[..., 12:] = torch.finfo(logits.dtype).min
    logits.float().logsumexp(-1).sum().backward()
    assert logits.shape == (2, 5, 16) and weight.grad[12:].abs().max() == 0 and weight.grad[:12].abs().max() > 0


def test_linear_takes_a_permuted_bf16_input():
    """bf16 tensors outside autocast (DeepSpeed's bf16 weights) may come in any layout: a (T, B, C) view of a
    (B, T, C) tensor gives the native op's gradients."""
    def grads(fp32_gemms: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        base = torch.randn(2, 5, 32).to(BF16).requires_grad_()
        weight = torch.randn(16, 32).to(BF16).requires_grad_()
        with Bf16OnFp32Gemms() if fp32_gemms else nullcontext():
            y = F.linear(base.transpose(0, 1), weight)
        y.float().square().sum().backward()
        return [y, base.grad, weight.grad]

    for got, want in zip(grads(True), grads(False), strict=True):
        assert got.dtype == BF16 and within_one_ulp(got, want)


def attention_and_grads(fp32_gemms: bool, dropout: float, causal: bool) -> list[torch.Tensor]:
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 64, 16, requires_grad=True) for _ in range(3))
    mask = None if causal else torch.rand(64, 64) > 0.3
    torch.manual_seed(2)  # the same dropout masks on both paths
    with torch.autocast("cpu", dtype=BF16), (Bf16OnFp32Gemms() if fp32_gemms else nullcontext()):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
    out.backward(torch.randn(out.shape).to(BF16))
    return [out, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("causal", [True, False])
def test_attention_on_fp32_gemms_follows_native_bf16(causal):
    native, ours = attention_and_grads(False, 0.0, causal), attention_and_grads(True, 0.0, causal)
    assert ours[0].dtype == BF16
    for got, want in zip(ours, native, strict=True):
        assert (got.float() - want.float()).abs().max() <= ATTENTION_ATOL * want.float().abs().max()


def test_attention_with_dropout_equals_native_bf16_bitwise():
    """With dropout, PyTorch's CPU SDPA takes its math path, which computes a bf16 call in fp32: so do we."""
    native, ours = attention_and_grads(False, 0.1, True), attention_and_grads(True, 0.1, True)
    for got, want in zip(ours, native, strict=True):
        assert torch.equal(got, want)


def test_outside_bf16_the_mode_changes_nothing():
    torch.manual_seed(0)
    x, weight = torch.randn(8, 32), torch.randn(16, 32)
    with Bf16OnFp32Gemms():
        fp32 = F.linear(x, weight)
        with torch.autocast("cpu", dtype=torch.float16):  # another autocast dtype is left to autocast
            fp16 = F.linear(x, weight)
        bf16 = F.linear(x.to(BF16), weight.to(BF16))  # bf16 tensors outside autocast: DeepSpeed's bf16 weights
    assert torch.equal(fp32, F.linear(x, weight))
    assert fp16.dtype == torch.float16
    assert bf16.dtype == BF16 and within_one_ulp(bf16, F.linear(x.to(BF16), weight.to(BF16)))


@pytest.mark.parametrize("native, mode", [(False, True), (True, False)])
def test_build_accelerator_enters_the_mode_only_without_bf16_units(native, mode, tmp_path):
    run_config = load_example("pretrain", tmp_path / "run", "model.precision=bfloat16")
    reset_accelerate()
    with restored_environ():
        accelerator = build_accelerator(run_config, LaunchEnv(cpu_native_bf16=native))
        with accelerator.autocast():
            modes = torch.overrides._get_current_function_mode_stack()
    assert any(isinstance(m, Bf16OnFp32Gemms) for m in modes) == mode


def test_the_bf16_probe_reads_this_cpu():
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine().lower() not in X86_MACHINES or not cpuinfo.exists():
        pytest.skip("the probe is checked against /proc/cpuinfo's flags on x86 Linux")
    flags = cpuinfo.read_text().split()
    assert LaunchEnv.from_environ().cpu_native_bf16 == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.parametrize("units, device, dtype, want", [
    (False, "cpu", BF16, torch.float32),  # the GEMMs this CPU's bf16 matmuls run on, and MFU's peak
    (True, "cpu", BF16, BF16),
    (False, "cuda", BF16, BF16),
    (False, "cpu", torch.float32, torch.float32),
])
def test_the_peak_is_of_the_gemms_the_matmuls_run_on(units, device, dtype, want, monkeypatch):
    monkeypatch.setattr(ironcore.cpu_bf16, "cpu_has_native_bf16", lambda: units)
    assert gemm_dtype(device, dtype) == want


def bf16_run(run_dir, monkeypatch, units: bool, dropout: list[str]):
    monkeypatch.setattr(ironcore.cpu_bf16, "cpu_has_native_bf16", lambda: units)
    train_in_process(load_example("pretrain", run_dir, "model.precision=bfloat16", *dropout, "operation.train_steps=6",
                                  "optim.warmup_steps=2", "trainer.do_eval=false", "operation.test_samples=0"))
    return series(read_metrics(run_dir), "loss")


@pytest.mark.parametrize("dropout", [DROPOUT, []], ids=["dropout", "no-dropout"])
def test_bf16_training_on_fp32_gemms_follows_the_native_bf16_path(dropout, tmp_path, monkeypatch):
    """The tiny model, 6 steps, at the spec's dropout 0.1 (attention: the fp32 op under autograd) and without
    dropout (attention: Bf16FlashAttention): the same losses as native bf16 to LOSS_RTOL."""
    native = bf16_run(tmp_path / "native", monkeypatch, True, dropout)
    ours = bf16_run(tmp_path / "fp32-gemms", monkeypatch, False, dropout)
    assert sorted(ours) == sorted(native) == list(range(1, 7))
    for step, loss in ours.items():
        assert abs(loss - native[step]) <= LOSS_RTOL * native[step], (step, loss, native[step])
    assert ours[6] < ours[1]


def test_a_bf16_run_on_fp32_gemms_resumes_bitwise_exports_and_generates(tmp_path):
    """`ironcore train` at bfloat16 on a CPU taken to lack bf16 units, dropout 0.1, GA 2, eval: stopped after step
    3 (operation.exit_interval) and relaunched, it logs what the uninterrupted run logs bit for bit; its export
    generates in plain transformers what IronCore's loader of it generates. The vocabulary is padded (2,048 ids to
    a multiple of 96), so the model's in-place masking of the padded logits runs on the layer's output."""
    env = child_env(IRONCORE_TEST_CPU_BF16_UNITS="0")
    overrides = [*BASELINE, *DROPOUT, "model.precision=bfloat16", "trainer.vocab_padding_unit=96"]
    reference = tmp_path / "uninterrupted"
    result = run(reference, overrides, fresh=True, hooks=True, env=env)
    assert "run as fp32 GEMMs on bf16-rounded operands" in result.output

    resumed = tmp_path / "resumed"
    run(resumed, [*overrides, "operation.exit_interval=3"], fresh=True, hooks=True, env=env)
    run(resumed, overrides, hooks=True, env=env)
    assert_bitwise_equal(resumed, reference)

    assert_plain_transformers_generates_as_ironcore(resumed / "export")
