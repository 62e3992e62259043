"""RunConfig -> Accelerate's experiment trackers (TensorBoard, MLflow, W&B): which ones, where they write, and
what `init_trackers` and the trackers' own environment variables need."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

from ironcore.config.schema import RunConfig


def trackers(run: RunConfig) -> list[str]:
    """Accelerate `log_with`: tensorboard / mlflow / wandb when their field is set, plus utils.trackers."""
    u = run.utils
    wanted = [
        *(["tensorboard"] if u.tensorboard_dir else []),
        *(["mlflow"] if u.mlflow_tracking_uri else []),
        *(["wandb"] if u.wandb_project else []),
        *u.trackers,
    ]
    return list(dict.fromkeys(wanted))


def logging_dir(run: RunConfig) -> Path:
    """Where TensorBoard writes: utils.tensorboard_dir, else `<run dir>/logs`."""
    return Path(run.utils.tensorboard_dir) if run.utils.tensorboard_dir else run.run_dir / "logs"


def _mlflow_experiment(run: RunConfig) -> str:
    return run.utils.mlflow_experiment_name or run.trainer.model_name


def _is_local_uri(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file", "sqlite")


def tracker_environ(run: RunConfig) -> dict[str, str]:
    """Environment variables the trackers read and Accelerate cannot pass: set by build_accelerator.

    Accelerate's MLflow tracker takes the tracking URI only from MLFLOW_TRACKING_URI, and its experiment
    name is init_trackers' project_name unless MLFLOW_EXPERIMENT_NAME is set, so both are set from the
    config (a stale variable in the shell cannot win). A file store URI also needs MLFLOW_ALLOW_FILE_STORE
    (mlflow 3 disables the file store by default).
    """
    if "mlflow" not in trackers(run):
        return {}
    out = {"MLFLOW_EXPERIMENT_NAME": _mlflow_experiment(run)}
    uri = run.utils.mlflow_tracking_uri
    if uri:
        out["MLFLOW_TRACKING_URI"] = uri
        if urlparse(uri).scheme in ("", "file"):
            out["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return out


def tracker_project_name(run: RunConfig) -> str:
    """`init_trackers`' project_name: the W&B project (Accelerate passes it as wandb's `project`) and the
    TensorBoard sub-directory; utils.wandb_project, else trainer.model_name. (MLflow's experiment comes
    from MLFLOW_EXPERIMENT_NAME, see tracker_environ.)"""
    return run.utils.wandb_project or run.trainer.model_name


def tracker_init_kwargs(run: RunConfig) -> dict[str, dict]:
    """`init_trackers`' init_kwargs: the run named model_name; a local MLflow store's artifacts and W&B's
    files in the run directory. Call `accelerator.init_trackers(tracker_project_name(run), config=...,
    init_kwargs=tracker_init_kwargs(run))`."""
    init_kwargs: dict[str, dict] = {}
    names = trackers(run)
    if "mlflow" in names:
        mlflow_kwargs = {"run_name": run.trainer.model_name}
        if _is_local_uri(run.utils.mlflow_tracking_uri or ""):
            mlflow_kwargs["logging_dir"] = str((run.run_dir / "mlflow").resolve())
        init_kwargs["mlflow"] = mlflow_kwargs
    if "wandb" in names:
        init_kwargs["wandb"] = {"name": run.trainer.model_name, "dir": str(run.run_dir)}
    return init_kwargs


def log_text_samples(accelerator, step: int, rows: list[dict]) -> None:
    """Generated samples ({"step", "prompt", "text"} rows) to every active tracker in its own form for text: a
    TensorBoard text summary per prompt, an MLflow artifact `samples/step_<N>.jsonl`, a W&B table. Main process."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for i, row in enumerate(rows):
                tracker.writer.add_text(f"samples/{i}", f"**{row['prompt']}**\n\n{row['text']}", global_step=step)
            tracker.writer.flush()
        elif tracker.name == "mlflow":
            import mlflow

            lines = "".join(json.dumps(row) + "\n" for row in rows)
            mlflow.log_text(lines, f"samples/step_{step:07d}.jsonl", run_id=tracker.tracker.info.run_id)
        elif tracker.name == "wandb":
            import wandb

            table = wandb.Table(columns=["step", "prompt", "text"], data=[[r["step"], r["prompt"], r["text"]] for r in rows])
            tracker.run.log({"samples": table}, step=step)
