"""FLOPs/MFU arithmetic, the peak table and measurement, memory, norms and metrics.jsonl."""

import json
import math

import pytest
import torch
from torch import nn

from ironcore.metrics import (
    MetricsLog,
    flops_per_token,
    global_norm,
    lookup_peak_tflops,
    measure_matmul_flops,
    memory_report,
    mfu,
    non_embedding_param_count,
    peak_flops,
)


def test_flops_per_token_formula():
    assert flops_per_token(1000, num_layers=2, seq_len=8, d_attn=16) == 6 * 1000 + 12 * 2 * 8 * 16
    assert flops_per_token(1000, 2, 8, 16, training=False) == 2 * 1000 + 4 * 2 * 8 * 16


def test_mfu_reproduces_palm_540b():
    # PaLM 540B (Chowdhery et al. 2022, table 3 / appendix B): 238.3k tokens/s on 6144 TPU v4 chips
    # (275 TFLOP/s bf16 each), L=118, 48 heads x 256, T=2048 -> 46.2% MFU
    per_token = flops_per_token(540.35e9, num_layers=118, seq_len=2048, d_attn=48 * 256)
    assert mfu(238.3e3 / 6144, per_token, 275e12) == pytest.approx(0.462, abs=0.001)
    assert mfu(1000.0, 2e9, 4e12) == pytest.approx(0.5)


class LM(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.wte = nn.Embedding(10, 4)  # 40
        self.wpe = nn.Embedding(6, 4)  # 24
        self.fc = nn.Linear(4, 4)  # 20
        self.lm_head = nn.Linear(4, 10, bias=False)  # 40
        if tied:
            self.lm_head.weight = self.wte.weight


def test_non_embedding_param_count_counts_the_head_matmul_once():
    assert non_embedding_param_count(LM(tied=True)) == 20 + 40
    assert non_embedding_param_count(LM(tied=False)) == 20 + 40


@pytest.mark.parametrize(
    "name,dtype,tf32,expected",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989.4),
        ("NVIDIA H100 PCIe", "bfloat16", False, 756.0),
        ("NVIDIA H100 NVL", torch.float16, False, 835.5),
        ("NVIDIA H200", torch.bfloat16, False, 989.4),
        ("NVIDIA GH200 480GB", torch.bfloat16, False, 989.4),
        ("NVIDIA A100-SXM4-80GB", torch.float32, False, 19.5),
        ("NVIDIA A100-SXM4-80GB", torch.float32, True, 156.0),
        ("NVIDIA A100 80GB PCIe", "float16", False, 312.0),
        ("NVIDIA A10", torch.bfloat16, False, 125.0),
        ("NVIDIA A10G", torch.bfloat16, False, None),
        ("NVIDIA L4", torch.bfloat16, False, 121.0),
        ("NVIDIA L40S", torch.bfloat16, False, 362.1),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, False, 165.2),
        ("Tesla V100-SXM2-16GB", torch.float16, False, 125.0),
        ("Tesla V100-SXM2-16GB", torch.bfloat16, False, None),
        ("Some Future GPU", torch.bfloat16, False, None),
    ],
)
def test_peak_table_lookup(name, dtype, tf32, expected):
    assert lookup_peak_tflops(name, dtype, tf32=tf32) == expected


def test_peak_flops_override_and_cpu_measurement(caplog):
    assert peak_flops("cpu", torch.bfloat16, override_tflops=12.5) == 12.5e12
    with caplog.at_level("INFO", logger="ironcore.metrics"):
        measured = peak_flops("cpu", "float32")
    assert "measured" in caplog.text
    assert 1e9 < measured < 1e14
    before = measure_matmul_flops.cache_info().hits
    assert peak_flops(torch.device("cpu"), torch.float32) == measured  # measured once per device and dtype
    assert measure_matmul_flops.cache_info().hits == before + 1
    with pytest.raises(ValueError, match="float64"):
        peak_flops("cpu", torch.float64)


def test_memory_report_cpu_rss():
    report = memory_report("cpu")
    assert set(report) == {"rss_gib", "max_rss_gib"}
    assert 0 < report["rss_gib"] <= report["max_rss_gib"] + 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_report_and_peak_on_cuda():
    before = memory_report("cuda")
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    after = memory_report("cuda")
    assert set(after) == {"allocated_gib", "reserved_gib", "max_allocated_gib"}
    assert after["allocated_gib"] - before["allocated_gib"] == pytest.approx(0.25, abs=0.01)
    assert after["reserved_gib"] >= after["allocated_gib"] and after["max_allocated_gib"] >= 0.25
    del block
    assert peak_flops("cuda", torch.bfloat16) > 1e12


def test_global_norm_matches_concatenated_vector():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), None]
    flat = torch.cat([tensors[0].flatten(), tensors[1]])
    assert global_norm(tensors) == pytest.approx(flat.norm().item(), rel=1e-6)
    assert global_norm(tensors, norm_type=math.inf) == pytest.approx(flat.abs().max().item())
    model = nn.Linear(4, 3)
    model(torch.randn(2, 4)).sum().backward()
    grads = [p.grad for p in model.parameters()]
    clipped = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
    assert global_norm(grads) == pytest.approx(clipped.item(), rel=1e-6)
    assert global_norm([]) == 0.0


def _strict(text: str) -> dict:
    def reject(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def test_metrics_log_writes_strict_jsonl_and_appends(tmp_path):
    with MetricsLog(tmp_path / "run") as log:
        log.log({"loss": torch.tensor(2.5), "lr": 1e-3, "tokens": torch.tensor(128)}, step=1)
        log.log({"loss": float("nan"), "grad_norm": torch.tensor(float("inf")), "phase": "train"}, step=2)
        # each line is on disk as soon as it is logged
        assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    with MetricsLog(tmp_path / "run") as log:
        log.log({"eval/loss": 3.0, "per_dataset": {"a": 1.0, "b": float("-inf")}}, step=2)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [_strict(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 2]
    assert records[0]["loss"] == 2.5 and records[0]["tokens"] == 128 and records[0]["lr"] == 1e-3
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None and records[1]["phase"] == "train"
    assert records[2]["per_dataset"] == {"a": 1.0, "b": None}
    assert all(isinstance(r["time"], float) for r in records)


def test_measuring_the_peak_leaves_the_global_rng_alone():
    """The first run in a process measures (later ones hit the cache): a global draw would give it other dropout masks."""
    measure_matmul_flops.cache_clear()
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    peak_flops("cpu", torch.bfloat16)
    assert torch.equal(torch.rand(4), expected)
