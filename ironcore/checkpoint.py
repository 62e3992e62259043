"""Atomic training checkpoints on top of `Accelerator.save_state` / `load_state`, with resume and retention.

On-disk layout of a run directory::

    <run_dir>/checkpoints/
        step_200/                    a complete checkpoint (what accelerate's save_state wrote, plus ours)
            model.safetensors        model weights          (DeepSpeed: pytorch_model/…, latest, zero_to_fp32.py)
            optimizer.bin            optimizer state        (DeepSpeed: inside pytorch_model/)
            scheduler.bin            LR scheduler state
            random_states_<rank>.pkl python/numpy/torch RNG of every process
            train_state.json         the loop's train_state + step, world_size, distributed_type
            COMPLETE                 JSON manifest {step, files: {relpath: {size, sha256}}}; written last
        step_300/
        latest                       one line: the newest complete checkpoint's directory name
        .tmp-step_400/               a save in progress (or killed); removed by the next save

Why this shape: a save first writes into `.tmp-step_N` on every process, then (after a barrier) the main
process writes the manifest, renames the directory to `step_N` and only then moves the `latest` pointer
with `os.replace`. A process killed at any point therefore leaves the previous checkpoint as the newest
complete one, and a half-written directory is never named `step_*`. The manifest's sizes and checksums
catch files truncated or damaged after the fact (a full disk, a bad copy).

`run_dir` must be on a filesystem that every process sees (single node, or a shared filesystem): the main
process checksums and renames files that the other ranks wrote. Savers that return before their files are
on disk (DeepSpeed's async/Nebula checkpoint engines) are not supported.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.utils import load as accelerate_load

from ironcore.errors import CheckpointError

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
TRAIN_STATE_FILE = "train_state.json"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-"
MODEL_CONFIG_KEY = "model_config"
MANIFEST_FORMAT = 1

_STEP_DIR = re.compile(r"^step_(\d+)$")
# Distributed types whose saved model/optimizer state is split per rank (or laid out per engine), so it can
# only be loaded by the same engine with the same number of processes.
_SHARDED_TYPES = frozenset(t.value for t in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM))


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the complete checkpoint of `step` lives: `<run_dir>/checkpoints/step_<step>`."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step}"


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    step: int,
    train_state: dict[str, Any],
    *,
    keep_last: int | None,
    checksums: bool = True,
) -> Path:
    """Save everything needed to resume at `step` into `<run_dir>/checkpoints/step_<step>`, atomically.

    Collective: every process must call it (DeepSpeed/FSDP save their shards from every rank, and each
    rank writes its own RNG state). `train_state` is the loop's own state (data loader position, consumed
    tokens, the model config under `MODEL_CONFIG_KEY`, ...); it must be JSON-serializable and is written by
    the main process only, so anything in it must be the same on every rank. `step`, `world_size` and
    `distributed_type` are added to it (a caller value for them must agree). After the new checkpoint is
    complete and `latest` points to it, checkpoints beyond the newest `keep_last` are deleted (the new
    one never is); `keep_last=None` keeps all. `checksums=False` records sizes only (skips re-reading
    the files on the main process; truncation is still detected, silent corruption is not).
    Returns the checkpoint directory on every process.
    """
    if accelerator.project_configuration.automatic_checkpoint_naming:
        raise ValueError("save_checkpoint names checkpoints itself; build the Accelerator without "
                         "automatic_checkpoint_naming")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be None or >= 1, got {keep_last}")
    state = _train_state_with_meta(accelerator, step, train_state)
    state_json = json.dumps(state, indent=2, sort_keys=True)  # fails here, on every rank, before any collective

    root = Path(run_dir) / CHECKPOINTS_DIR
    tmp = root / f"{TMP_PREFIX}step_{step}"
    final = checkpoint_dir(run_dir, step)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root)
    accelerator.wait_for_everyone()

    hook = accelerator.register_save_state_pre_hook(drop_tied_duplicates)
    try:
        accelerator.save_state(str(tmp))
    finally:
        hook.remove()
    if accelerator.is_main_process:
        (tmp / TRAIN_STATE_FILE).write_text(state_json)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        _write_manifest(tmp, step, checksums=checksums)
        _publish(tmp, final)
        _write_latest(root, final.name)
        if keep_last is not None:
            _apply_retention(root, keep=final, keep_last=keep_last)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def drop_tied_duplicates(models: list[torch.nn.Module], weights: list[dict[str, Any]], _output_dir: str) -> None:
    """Save-state pre-hook: keep one key per tied parameter, as `save_pretrained` does for `lm_head.weight`.

    safetensors cannot store two names for one tensor, so accelerate drops the later names itself, but with a
    warning on every save ("Removed shared tensor ... check ... while reloading") meant for aliases it cannot
    explain. A parameter registered under two names (weight tying) is such an alias by design, and loading
    re-ties it; dropping its later names here, in the same order, writes the same file without the warning.
    Any other shared storage is left for accelerate to report. The model has no state dict here under
    FSDP/DeepSpeed, which save their own shards.
    """
    for model, state_dict in zip(models, weights):
        first_name: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if first_name.setdefault(id(param), name) != name:
                state_dict.pop(name, None)


def find_resume_checkpoint(run_dir: Path, *, verify_checksums: bool = True) -> Path | None:
    """The newest usable checkpoint of `run_dir`, or None when the run has no checkpoint yet.

    `latest` is used when it points to a checkpoint that verifies; otherwise the `step_*` directories are
    tried newest-first. A directory without the completion marker, or whose files do not match the
    manifest, is skipped with a warning naming it. Raises CheckpointError when checkpoints exist but none
    is usable, or when `latest` names a checkpoint and none is left (resuming from scratch silently would
    throw the run away). Read-only: safe on every rank. `verify_checksums=False` checks sizes only (no full
    read of the files).
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    candidates = _step_dirs(root)
    latest_name = _read_latest(root)
    if not candidates:
        if latest_name is None:
            return None
        raise CheckpointError(
            f"{root / LATEST_FILE} names {latest_name}, but {root} holds no step_* checkpoint (deleted or moved?); "
            "restore it, or start over with --fresh (trainer.resume=false)"
        )
    problems: dict[str, str] = {}

    if latest_name is not None:
        latest = root / latest_name
        problem = _problem(latest, verify_checksums) if latest in candidates else "missing"
        if problem is None:
            return latest
        problems[latest_name] = problem
        logger.warning("Checkpoint pointer %s names %s, which is not usable (%s); scanning the other checkpoints",
                       root / LATEST_FILE, latest_name, problem)

    for ckpt in sorted(candidates, key=_step_of, reverse=True):
        if ckpt.name in problems:
            continue
        problem = _problem(ckpt, verify_checksums)
        if problem is None:
            return ckpt
        problems[ckpt.name] = problem
        logger.warning("Skipping checkpoint %s: %s", ckpt, problem)

    detail = "; ".join(f"{name}: {why}" for name, why in problems.items())
    raise CheckpointError(
        f"{root} has {len(candidates)} checkpoint(s) but none is usable ({detail}); move them away to start fresh"
    )


def set_aside(path: Path) -> Path:
    """Rename `path` to an unused `<stem>.old-<time><suffix>` beside it (`checkpoints.old-20260101-120000`,
    `metrics.old-20260101-120000.jsonl`) and return the new path: a fresh start neither mixes with nor
    deletes what an earlier run left. A second fresh start within the same second gets a `-1` suffix."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = path.with_name(f"{path.stem}.old-{stamp}{path.suffix}"), 0
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.stem}.old-{stamp}-{n}{path.suffix}")
    path.rename(aside)
    return aside


def verify_checkpoint(ckpt_dir: Path, *, checksums: bool = True) -> None:
    """Raise CheckpointError naming `ckpt_dir` unless it has its completion marker and every manifest file matches."""
    problem = _problem(Path(ckpt_dir), checksums)
    if problem is not None:
        raise CheckpointError(f"checkpoint {ckpt_dir} is not usable: {problem}")


def read_train_state(ckpt_dir: Path) -> dict[str, Any]:
    """The train_state saved with a checkpoint (the loop's dict plus step, world_size, distributed_type)."""
    path = Path(ckpt_dir) / TRAIN_STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def check_compatible(
    train_state: dict[str, Any],
    model_config: dict[str, Any] | None,
    world_size: int,
    *,
    distributed_type: str | None = None,
    ignore: Iterable[str] = (),
) -> None:
    """Refuse (CheckpointError, one line) a checkpoint this run cannot continue from.

    - Model config: every field of `model_config` (nested dicts compared by dotted path, e.g.
      `positional_embedding.base`) must equal the checkpoint's, except the dotted paths in `ignore`.
      The error names each differing field with both values. `model_config=None` skips this check.
    - Engine: a DeepSpeed/FSDP checkpoint has its own layout, so it loads only with the same engine
      (`distributed_type`, the accelerator's; None skips this check).
    - World size: DeepSpeed/FSDP states are partitioned per rank, so a different world size is refused,
      naming both sizes. Plain single-process/DDP states are replicated, so a different world size is
      allowed with a warning: ranks the checkpoint did not have keep their seeded RNG, and the data
      loader position in train_state must be global (samples consumed), which the data module reshards.
    """
    step = train_state.get("step", "?")
    if model_config is not None:
        saved = train_state.get(MODEL_CONFIG_KEY)
        if saved is None:
            raise CheckpointError(f"checkpoint at step {step} has no {MODEL_CONFIG_KEY!r} in {TRAIN_STATE_FILE}; "
                                  "cannot check that it matches this run's model")
        diffs = _config_diffs(_as_json(saved), _as_json(model_config), set(ignore))
        if diffs:
            listed = "; ".join(f"{name} (checkpoint {old!r}, run {new!r})" for name, old, new in diffs)
            raise CheckpointError(f"checkpoint at step {step} was trained with a different model config: {listed}")

    saved_type = str(train_state.get("distributed_type", DistributedType.NO.value))
    saved_world = int(train_state.get("world_size", 1))
    sharded = saved_type in _SHARDED_TYPES
    run_type = None if distributed_type is None else _type_name(distributed_type)
    if run_type is not None and (sharded or run_type in _SHARDED_TYPES) and run_type != saved_type:
        raise CheckpointError(f"checkpoint at step {step} was saved with {saved_type}; this run uses {run_type}, "
                              "whose checkpoint layout differs")
    if saved_world != world_size:
        if sharded:
            raise CheckpointError(
                f"checkpoint at step {step} holds {saved_type} states sharded over {saved_world} processes; "
                f"this run has {world_size}: resume with {saved_world} processes"
            )
        logger.warning(
            "Resuming a checkpoint saved by %d process(es) with %d: model, optimizer and scheduler are replicated "
            "and load as they are; RNG of ranks >= %d is not restored (they keep their seeded state)",
            saved_world, world_size, saved_world,
        )


def load_checkpoint(
    accelerator: Accelerator,
    ckpt_dir: Path,
    *,
    load_optim_state: bool,
    load_lr_scheduler: bool,
    model_config: dict[str, Any] | None = None,
    ignore_model_fields: Iterable[str] = (),
) -> dict[str, Any]:
    """Restore the prepared model, optimizer, scheduler and RNG of every process from `ckpt_dir`; return train_state.

    Collective: every process must call it after `accelerator.prepare`. Before touching any state it checks
    file sizes against the manifest and calls `check_compatible` (with `model_config` when given, minus the
    dotted fields in `ignore_model_fields`, and the accelerator's world size and engine), so a mismatch is one
    CheckpointError, not a shape error.

    accelerate's `load_state` loads everything that was prepared, so the two switches
    (`optim.load_checkpoint_optim_state`, `optim.load_checkpoint_lr_scheduler`) work like this:
    under DeepSpeed the engine is told not to load that part (its `load_optimizer_states` /
    `load_lr_scheduler_states`); otherwise the prepared optimizers/schedulers' current state_dicts are
    snapshotted before `load_state` and put back after it, so the skipped part stays exactly as it was
    (fresh, when called right after prepare). When only one of the two is loaded, each param group's `lr` is
    then set from its scheduler, so the first step after resume uses the schedule's learning rate.
    """
    ckpt_dir = Path(ckpt_dir)
    verify_checkpoint(ckpt_dir, checksums=False)
    train_state = read_train_state(ckpt_dir)
    check_compatible(
        train_state, model_config, accelerator.num_processes, distributed_type=accelerator.distributed_type,
        ignore=ignore_model_fields,
    )

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    kept_optimizers = [] if load_optim_state or deepspeed else _snapshot(accelerator._optimizers)
    kept_schedulers = [] if load_lr_scheduler else _snapshot(accelerator._schedulers)
    engine_kwargs = (
        {"load_optimizer_states": load_optim_state, "load_lr_scheduler_states": load_lr_scheduler} if deepspeed else {}
    )
    accelerator.load_state(str(ckpt_dir), **engine_kwargs)
    for obj, state in kept_optimizers + kept_schedulers:
        obj.load_state_dict(state)
    if load_optim_state != load_lr_scheduler:
        _sync_lr_from_schedulers(accelerator._schedulers)
    _check_rng_restored(ckpt_dir, accelerator.process_index)

    logger.info(
        "Resumed from %s (step %s; optimizer state %s, LR scheduler %s)",
        ckpt_dir, train_state.get("step"),
        "loaded" if load_optim_state else "fresh", "loaded" if load_lr_scheduler else "fresh",
    )
    return train_state


def _train_state_with_meta(accelerator: Accelerator, step: int, train_state: dict[str, Any]) -> dict[str, Any]:
    """The loop's state plus what check_compatible needs; a caller value for these keys must agree."""
    meta = {
        "step": step,
        "world_size": accelerator.num_processes,
        "distributed_type": _type_name(accelerator.distributed_type),
    }
    for key, value in meta.items():
        if key in train_state and train_state[key] != value:
            raise ValueError(f"train_state[{key!r}] is {train_state[key]!r} but the checkpoint's {key} is {value!r}")
    return {**train_state, **meta}


def _type_name(distributed_type: Any) -> str:
    return getattr(distributed_type, "value", str(distributed_type))


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]


def _files(directory: Path) -> list[Path]:
    """Every regular file under `directory` except the marker, sorted (DeepSpeed writes a subdirectory)."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p != directory / COMPLETE_MARKER)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and os.replace, so readers see the old or the new content."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _write_manifest(directory: Path, step: int, *, checksums: bool) -> None:
    """Flush every file to disk and record its size (and sha256): the marker that makes the directory complete."""
    files = {}
    for path in _files(directory):
        _fsync(path)
        entry = {"size": path.stat().st_size}
        if checksums:
            entry["sha256"] = _sha256(path)
        files[path.relative_to(directory).as_posix()] = entry
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    _write_durably(directory / COMPLETE_MARKER, json.dumps(manifest, indent=1, sort_keys=True))


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished tmp dir to its final name; an existing checkpoint of that step is replaced."""
    if final.exists():
        logger.warning("Replacing existing checkpoint %s", final)
        replaced = final.with_name(f"{TMP_PREFIX}replaced-{final.name}")
        os.rename(final, replaced)
        os.rename(tmp, final)
        shutil.rmtree(replaced)
    else:
        os.rename(tmp, final)
    _fsync(final.parent)


def _write_latest(root: Path, name: str) -> None:
    _write_durably(root / LATEST_FILE, name + "\n")


def _read_latest(root: Path) -> str | None:
    try:
        name = (root / LATEST_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def _remove_stale_tmp(root: Path) -> None:
    """Remove what killed saves left behind (`.tmp-*`); called by the main process before a save starts."""
    for path in root.iterdir():
        if path.name.startswith(TMP_PREFIX):
            logger.warning("Removing %s left by an interrupted save", path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def _apply_retention(root: Path, *, keep: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, counting `keep` (just written) first."""
    others = [p for p in _step_dirs(root) if p != keep and (p / COMPLETE_MARKER).is_file()]
    others.sort(key=_step_of, reverse=True)
    for old in others[keep_last - 1 :]:
        logger.info("Deleting old checkpoint %s (keep_last_checkpoints=%d)", old, keep_last)
        shutil.rmtree(old)


def _problem(ckpt: Path, checksums: bool) -> str | None:
    """Why `ckpt` cannot be resumed from, or None when its marker exists and every manifest file matches."""
    if not ckpt.is_dir():
        return "missing"
    marker = ckpt / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} marker (the save did not finish)"
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        return f"unreadable {COMPLETE_MARKER} marker ({err})"
    if _STEP_DIR.match(ckpt.name) and manifest.get("step") != _step_of(ckpt):
        return f"manifest is for step {manifest.get('step')}"
    for rel, entry in files.items():
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{rel} is {size} bytes, the manifest says {entry['size']} (truncated or overwritten)"
        if checksums and "sha256" in entry and _sha256(path) != entry["sha256"]:
            return f"{rel} does not match its sha256 in the manifest (corrupted)"
    return None


def _config_diffs(saved: Any, current: Any, ignore: set[str], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field, checkpoint value, run value) for every leaf that differs, nested dicts by dotted path."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return [] if saved == current or prefix in ignore else [(prefix or "<model config>", saved, current)]
    missing = "<absent>"
    diffs = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}.{key}" if prefix else key
        if name in ignore:
            continue
        diffs += _config_diffs(saved.get(key, missing), current.get(key, missing), ignore, name)
    return diffs


def _as_json(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), so a saved config compares equal to the live one."""
    return json.loads(json.dumps(value))


def _snapshot(objects: list) -> list[tuple[Any, dict]]:
    """(object, deep copy of its state_dict) pairs, to put back what load_state would overwrite."""
    return [(obj, copy.deepcopy(obj.state_dict())) for obj in objects]


def _sync_lr_from_schedulers(schedulers: list) -> None:
    """Set each param group's lr to its scheduler's last lr (optimizer and scheduler states came from different places)."""
    for scheduler in schedulers:
        inner = getattr(scheduler, "scheduler", scheduler)
        for group, lr in zip(inner.optimizer.param_groups, inner.get_last_lr(), strict=True):
            group["lr"] = lr


def _check_rng_restored(ckpt_dir: Path, process_index: int) -> None:
    """accelerate logs "Could not load random states" at INFO and goes on; make a failed RNG restore loud."""
    path = ckpt_dir / f"random_states_{process_index}.pkl"
    if not path.is_file():
        logger.warning("%s has no RNG state for rank %d; this rank keeps its seeded RNG", ckpt_dir, process_index)
        return
    saved = accelerate_load(path)["torch_manual_seed"]
    if not torch.equal(saved, torch.get_rng_state()):
        raise CheckpointError(f"the torch RNG state in {path} was not restored by accelerate's load_state")
