"""`ironcore plot RUN`: loss and learning-rate curves from metrics.jsonl as MetricsLog writes it, and its refusals.
The quickstart test draws one from a real training run."""

from __future__ import annotations

import sys

import pytest
from helpers_train import cli_errors

from ironcore import cli
from ironcore.metrics import MetricsLog
from ironcore.plot import read_series

matplotlib_image = pytest.importorskip("matplotlib.image")


def write_run(run_dir, steps=range(5, 45, 5), eval_every=20):
    """A run's metrics.jsonl written by the real writer, with a resume that re-ran steps 25-30."""
    log = MetricsLog(run_dir)
    for step in [*steps, 25, 30]:
        log.log({"loss": 8.0 - step / 10 - (0.5 if step in (25, 30) else 0), "lr": 1e-3 * step / 40}, step=step)
        if step % eval_every == 0:
            log.log({"eval/loss": 8.2 - step / 10}, step=step)
    log.close()


def test_plot_draws_loss_and_lr_into_the_run_dir_and_prints_what_was_learned(tmp_path, capsys):
    write_run(tmp_path)
    assert cli.main(["plot", str(tmp_path)]) == 0
    out = tmp_path / "loss.png"
    assert capsys.readouterr().out.splitlines() == [
        "train loss 7.500 at step 5 -> 4.000 at step 40", "eval loss 4.200 at step 40", f"plot written to {out}"]
    height, width, _ = matplotlib_image.imread(out).shape
    assert (width, height) == (800, 600)  # two panels: loss over the learning rate


def test_plot_out_and_last_record_per_step_wins(tmp_path):
    write_run(tmp_path)
    assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "figs" / "curves.png")]) == 0
    assert (tmp_path / "figs" / "curves.png").stat().st_size > 10_000
    series = read_series(tmp_path / "metrics.jsonl", ["loss", "eval/loss"])
    assert series["loss"][25] == pytest.approx(8.0 - 2.5 - 0.5) and len(series["loss"]) == 8
    assert sorted(series["eval/loss"]) == [20, 40]


def test_plot_without_metrics_names_the_file(tmp_path, capsys):
    code, errors = cli_errors(["plot", str(tmp_path)], capsys)
    assert code == 2 and errors == [f"error: {tmp_path / 'metrics.jsonl'}: no metrics file; pass a run directory "
                                    "(trainer.model_path) that has trained"]
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "grad_norm": 1.5}\n')
    code, errors = cli_errors(["plot", str(tmp_path)], capsys)
    assert code == 2 and errors == [f"error: {tmp_path / 'metrics.jsonl'}: no loss records yet (the first is written "
                                    "at trainer.log_interval)"]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 7.0}\n{"step": 2, "lo\n')
    code, errors = cli_errors(["plot", str(tmp_path)], capsys)
    assert code == 2 and errors == [f"error: {tmp_path / 'metrics.jsonl'}:2: not a metrics record (a JSON object "
                                    "with a step)"]
    assert not (tmp_path / "loss.png").exists()


def test_plot_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    write_run(tmp_path)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` finds when it is not installed
    code, errors = cli_errors(["plot", str(tmp_path)], capsys)
    assert code == 2 and errors == ["error: ironcore plot needs matplotlib: pip install 'ironcore[plot]'"]
    assert not (tmp_path / "loss.png").exists()
