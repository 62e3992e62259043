"""`ironcore plot RUN`: train and eval loss, and the learning rate, against steps, from the run's metrics.jsonl.

matplotlib is an optional extra (`pip install 'ironcore[plot]'`); it is imported only here, and only when a plot
is drawn, so that training never pays for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ironcore.errors import ConfigError, DataError

METRICS_FILE = "metrics.jsonl"  # what ironcore.metrics.MetricsLog writes in the run directory

# (metrics key, legend label) of each line; the top panel shares one loss axis, the bottom one shows the schedule.
LOSS_SERIES = (("loss", "train"), ("eval/loss", "eval"))
LR_SERIES = ("lr", "learning rate")


def read_series(metrics_file: Path, keys: list[str]) -> dict[str, dict[int, float]]:
    """key -> {step: value} over the records of `metrics_file`. The last record of a step wins, as after a
    resume that re-ran steps past its checkpoint."""
    series: dict[str, dict[int, float]] = {key: {} for key in keys}
    for number, line in enumerate(metrics_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DataError(f"{metrics_file}:{number}: not a metrics record (a JSON object with a step)") from None
        for key in keys:
            if isinstance(record.get(key), (int, float)):
                series[key][step] = float(record[key])
    return series


def summary(run_dir: str | Path) -> list[str]:
    """What the run learned, in words: the first and last logged train loss, and the last eval loss and perplexity."""
    metrics_file = metrics_path(run_dir)
    series = read_series(metrics_file, ["loss", "eval/loss", "eval/perplexity"])
    lines = []
    if series["loss"]:
        steps = sorted(series["loss"])
        first, last = steps[0], steps[-1]
        lines.append(f"train loss {series['loss'][first]:.3f} at step {first} -> {series['loss'][last]:.3f} at step {last}")
    if series["eval/loss"]:
        step = max(series["eval/loss"])
        perplexity = series["eval/perplexity"].get(step)
        lines.append(f"eval loss {series['eval/loss'][step]:.3f}"
                     + (f", perplexity {perplexity:.1f}" if perplexity is not None else "") + f" at step {step}")
    return lines


def metrics_path(run_dir: str | Path) -> Path:
    metrics_file = Path(run_dir) / METRICS_FILE
    if not metrics_file.is_file():
        raise DataError(f"{metrics_file}: no metrics file; pass a run directory (trainer.model_path) that has trained")
    return metrics_file


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw `run_dir`'s loss curves (and learning rate, when logged) into a PNG; return its path
    (default: RUN_DIR/loss.png)."""
    run_dir = Path(run_dir)
    metrics_file = metrics_path(run_dir)
    keys = [key for key, _ in LOSS_SERIES] + [LR_SERIES[0]]
    series = read_series(metrics_file, keys)
    if not any(series[key] for key, _ in LOSS_SERIES):
        raise DataError(f"{metrics_file}: no loss records yet (the first is written at trainer.log_interval)")
    pyplot = import_pyplot()
    out = Path(out) if out is not None else run_dir / "loss.png"
    has_lr = bool(series[LR_SERIES[0]])
    figure, axes = pyplot.subplots(2 if has_lr else 1, 1, sharex=True, squeeze=False,
                                   figsize=(8, 6 if has_lr else 4), height_ratios=[3, 1] if has_lr else None)
    loss_axis = axes[0][0]
    for key, label in LOSS_SERIES:
        if series[key]:
            steps = sorted(series[key])
            marker = "o" if len(steps) < 20 else None  # a few eval points read better as dots
            loss_axis.plot(steps, [series[key][s] for s in steps], label=label, marker=marker)
    loss_axis.set_ylabel("loss")
    loss_axis.set_title(f"{run_dir.name}: loss")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend()
    if has_lr:
        lr_axis = axes[1][0]
        steps = sorted(series[LR_SERIES[0]])
        lr_axis.plot(steps, [series[LR_SERIES[0]][s] for s in steps], color="tab:gray")
        lr_axis.set_ylabel(LR_SERIES[1])
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        lr_axis.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    pyplot.close(figure)
    return out


def import_pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), or a one-line install hint."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("ironcore plot needs matplotlib: pip install 'ironcore[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot
