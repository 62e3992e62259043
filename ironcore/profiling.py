"""A step-window profiler: torch.profiler traces and Nsight Systems capture ranges for chosen ranks.

The window is inclusive: with ``profile_step_start: 10`` and ``profile_step_end: 12`` the steps the loop
numbers 10, 11 and 12 are recorded, nothing before or after. Step numbers are whatever the loop passes to
`StepProfiler.step` (IronCore's loop passes its optimizer-step number). A run resumed inside the window
records the rest of it. Each recorded step is wrapped in a ``ProfilerStep#<step>`` range (the name the
TensorBoard profiler plugin splits steps by) and `StepProfiler.phase` adds forward/backward/optimizer ranges.

For Nsight Systems, launch with ``nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop``:
the window is bracketed by ``cudaProfilerStart/Stop`` and steps and phases appear as NVTX ranges.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import ContextManager

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ironcore.config.schema import UtilsConfig
from ironcore.errors import ConfigError

logger = logging.getLogger(__name__)


def validate_profiling(utils: UtilsConfig) -> None:
    """Raise ConfigError when the profiling window is empty (end before start)."""
    if utils.profile_step_end < utils.profile_step_start:
        raise ConfigError(
            f"utils.profile_step_end ({utils.profile_step_end}) must be >= utils.profile_step_start "
            f"({utils.profile_step_start}); the window is inclusive"
        )


class _NvtxRange:
    """An NVTX push/pop pair as a context manager."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc: object) -> None:
        torch.cuda.nvtx.range_pop()


class StepProfiler:
    """Records steps ``utils.profile_step_start..profile_step_end`` (inclusive) on ``utils.profile_ranks``.

    Use ``with profiler.step(step):`` around each training step (or `on_step_start` / `on_step_end`),
    ``with profiler.phase("forward"):`` inside it, and `close` at the end of training so a window cut
    short still writes its trace. Outside the window, and on ranks not profiled, every call is a no-op.
    The torch trace is written to ``out_dir/torch_trace_rank<rank>_steps<first>-<last>.json``.
    """

    def __init__(self, utils: UtilsConfig, rank: int, out_dir: Path | str) -> None:
        validate_profiling(utils)
        self.start, self.end = utils.profile_step_start, utils.profile_step_end
        self.rank = rank
        self.out_dir = Path(out_dir)
        selected = rank in utils.profile_ranks
        self.torch_enabled = utils.profile_torch and selected
        self.nsys_enabled = utils.profile_nsys and selected and torch.cuda.is_available()
        if utils.profile_nsys and selected and not self.nsys_enabled:
            logger.warning("utils.profile_nsys needs CUDA; no device is available, so Nsight capture is off")
        self.trace_path: Path | None = None
        self._prof: profile | None = None
        self._nsys_active = False
        self._first_step: int | None = None
        self._last_step: int | None = None
        self._step_ranges: contextlib.ExitStack | None = None
        self._done = False

    @property
    def recording(self) -> bool:
        """True while inside the window on a profiled rank."""
        return self._prof is not None or self._nsys_active

    def on_step_start(self, step: int) -> None:
        """Open the window at its first step (or the first step seen inside it) and mark the step."""
        if self._done or not (self.torch_enabled or self.nsys_enabled) or not self.start <= step <= self.end:
            return
        if not self.recording:
            self._open()
            self._first_step = step
        self._step_ranges = contextlib.ExitStack()
        for ctx in self._ranges(f"ProfilerStep#{step}"):
            self._step_ranges.enter_context(ctx)
        self._last_step = step

    def on_step_end(self, step: int) -> None:
        """Close the step's ranges; after the window's last step, stop and write the trace."""
        if self._step_ranges is not None:
            self._step_ranges.close()
            self._step_ranges = None
        if self.recording and step >= self.end:
            self.close()

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Context manager form of `on_step_start` / `on_step_end`."""
        self.on_step_start(step)
        try:
            yield
        finally:
            self.on_step_end(step)

    def phase(self, name: str) -> ContextManager:
        """A named range (torch ``record_function`` and/or NVTX) while recording, else a no-op context."""
        if not self.recording:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for ctx in self._ranges(name):
            stack.enter_context(ctx)
        return stack

    def close(self) -> None:
        """Stop recording and export the trace (idempotent; call at the end of training)."""
        if self._step_ranges is not None:
            self._step_ranges.close()
            self._step_ranges = None
        if self._prof is not None:
            self._prof.stop()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            steps = f"{self._first_step}-{self._last_step}"
            self.trace_path = self.out_dir / f"torch_trace_rank{self.rank}_steps{steps}.json"
            self._prof.export_chrome_trace(str(self.trace_path))
            self._prof = None
            logger.info("Wrote the torch profiler trace of steps %s to %s", steps, self.trace_path)
            if self._last_step != self.end:
                logger.warning("The profiling window ended early: steps %s-%s of %s-%s were recorded",
                               self._first_step, self._last_step, self.start, self.end)
        if self._nsys_active:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            self._nsys_active = False
        if self._first_step is not None:
            self._done = True

    def _open(self) -> None:
        if self.torch_enabled:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self._prof = profile(activities=activities, record_shapes=True)
            self._prof.start()
        if self.nsys_enabled:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            self._nsys_active = True

    def _ranges(self, name: str) -> list[ContextManager]:
        ranges: list[ContextManager] = []
        if self._prof is not None:
            ranges.append(record_function(name))
        if self._nsys_active:
            ranges.append(_NvtxRange(name))
        return ranges
