"""The profiler records exactly the configured (inclusive) step window, on the configured ranks only."""

import json
from collections import Counter

import pytest
import torch
from torch import nn

from ironcore.config.schema import UtilsConfig
from ironcore.errors import ConfigError
from ironcore.profiling import StepProfiler, validate_profiling


def train(profiler: StepProfiler, steps: range, device: str = "cpu") -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in steps:
        with profiler.step(step):
            with profiler.phase("forward"):
                loss = model(torch.randn(4, 8, device=device)).pow(2).mean()
            with profiler.phase("backward"):
                loss.backward()
            with profiler.phase("optimizer"):
                opt.step()
                opt.zero_grad()
    profiler.close()


def recorded(trace_path) -> tuple[list[int], Counter]:
    """Step numbers of the trace's ProfilerStep#N ranges, and phase-range counts inside each step."""
    events = [e for e in json.loads(trace_path.read_text())["traceEvents"] if e.get("ph") == "X"]
    steps = {int(e["name"].split("#")[1]): e for e in events if e["name"].startswith("ProfilerStep#")}
    inside = Counter()
    for e in events:
        if e["name"] in ("forward", "backward", "optimizer"):
            owner = [n for n, s in steps.items() if s["ts"] <= e["ts"] <= s["ts"] + s["dur"]]
            inside[(owner[0] if owner else None, e["name"])] += 1
    return sorted(steps), inside


def test_trace_covers_exactly_the_inclusive_window(tmp_path):
    utils = UtilsConfig(profile_torch=True, profile_step_start=3, profile_step_end=5, profile_ranks=(0, 1))
    profiler = StepProfiler(utils, rank=1, out_dir=tmp_path)
    train(profiler, range(1, 9))
    assert profiler.trace_path == tmp_path / "torch_trace_rank1_steps3-5.json"
    steps, inside = recorded(profiler.trace_path)
    assert steps == [3, 4, 5]
    assert inside == Counter({(s, p): 1 for s in (3, 4, 5) for p in ("forward", "backward", "optimizer")})
    assert [p.name for p in tmp_path.iterdir()] == [profiler.trace_path.name]


def test_window_cut_short_or_entered_late_still_writes_what_ran(tmp_path):
    utils = UtilsConfig(profile_torch=True, profile_step_start=2, profile_step_end=6)
    late = StepProfiler(utils, rank=0, out_dir=tmp_path / "late")
    train(late, range(4, 10))  # resumed inside the window
    assert recorded(late.trace_path)[0] == [4, 5, 6]
    short = StepProfiler(utils, rank=0, out_dir=tmp_path / "short")
    train(short, range(1, 4))  # training ended inside the window; close() exports
    assert short.trace_path.name == "torch_trace_rank0_steps2-3.json"
    assert recorded(short.trace_path)[0] == [2, 3]


def test_other_ranks_and_disabled_profiling_record_nothing(tmp_path):
    for utils, rank in ((UtilsConfig(profile_torch=True, profile_step_start=1, profile_step_end=2), 1),
                        (UtilsConfig(profile_step_start=1, profile_step_end=2), 0)):
        profiler = StepProfiler(utils, rank=rank, out_dir=tmp_path)
        train(profiler, range(1, 4))
        assert profiler.trace_path is None and not profiler.recording
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_trace_with_nsys_ranges_keeps_the_window(tmp_path):
    utils = UtilsConfig(profile_torch=True, profile_nsys=True, profile_step_start=3, profile_step_end=5)
    profiler = StepProfiler(utils, rank=0, out_dir=tmp_path)
    assert profiler.nsys_enabled
    train(profiler, range(1, 8), device="cuda")
    assert recorded(profiler.trace_path)[0] == [3, 4, 5]
    events = json.loads(profiler.trace_path.read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_nsys_on_cpu_warns_once_and_does_nothing(tmp_path, caplog):
    utils = UtilsConfig(profile_nsys=True, profile_step_start=1, profile_step_end=2)
    with caplog.at_level("WARNING", logger="ironcore.profiling"):
        profiler = StepProfiler(utils, rank=0, out_dir=tmp_path)
        train(profiler, range(1, 4))
    assert [r.message for r in caplog.records].count(
        "utils.profile_nsys needs CUDA; no device is available, so Nsight capture is off") == 1
    assert profiler.trace_path is None and not any(tmp_path.iterdir())


def test_empty_window_is_a_config_error(tmp_path):
    bad = UtilsConfig(profile_step_start=12, profile_step_end=10)
    with pytest.raises(ConfigError, match=r"utils.profile_step_end \(10\) must be >= utils.profile_step_start \(12\)"):
        validate_profiling(bad)
    with pytest.raises(ConfigError):
        StepProfiler(bad, rank=0, out_dir=tmp_path)
    validate_profiling(UtilsConfig(profile_step_start=7, profile_step_end=7))
