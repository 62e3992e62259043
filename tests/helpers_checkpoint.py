"""A tiny real training setup for the checkpoint tests, also runnable as the child/worker script they launch.

    python tests/helpers_checkpoint.py kill-child RUN_DIR SIGNAL_FILE   saves step 1, then hangs mid-save of step 2
    torchrun --nproc_per_node 2 tests/helpers_checkpoint.py ddp RUN_DIR  save/load round trip on 2 CPU ranks
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ironcore.checkpoint import MODEL_CONFIG_KEY, load_checkpoint, save_checkpoint  # noqa: E402

MODEL_CONFIG = {"d_in": 8, "d_hidden": 32, "positional_embedding": {"type": "none", "base": 10000.0}}
BATCH = 4


def build(accelerator: Accelerator, seed: int):
    """Model (with dropout, so the RNG matters), AdamW and a warmup LambdaLR, prepared; weights depend on `seed`."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(MODEL_CONFIG["d_in"], MODEL_CONFIG["d_hidden"]), nn.GELU(), nn.Dropout(0.2), nn.Linear(MODEL_CONFIG["d_hidden"], 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    return accelerator.prepare(model, optimizer, scheduler)


def train(accelerator: Accelerator, model, optimizer, scheduler, steps: int) -> list[float]:
    """`steps` optimizer steps on random regression batches drawn from the torch RNG; returns the losses."""
    losses = []
    for _ in range(steps):
        x = torch.randn(BATCH, MODEL_CONFIG["d_in"])
        loss = F.mse_loss(model(x), x.sum(-1, keepdim=True))
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def flat_params(model) -> list[float]:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()


def train_state(step: int) -> dict:
    return {"data_loader": {"epoch": 0, "samples_consumed": step * BATCH}, "consumed_tokens": step * BATCH * 8, MODEL_CONFIG_KEY: MODEL_CONFIG}


def kill_child(run_dir: Path, signal_file: Path) -> None:
    """Save step 1 completely, then start step 2 and stop for good after its first file (the parent kills us)."""
    import accelerate.checkpointing

    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = build(accelerator, seed=0)
    train(accelerator, model, optimizer, scheduler, 2)
    save_checkpoint(accelerator, run_dir, 1, train_state(1), keep_last=None)
    train(accelerator, model, optimizer, scheduler, 2)

    original_save = accelerate.checkpointing.save

    def save_then_hang(obj, f, **kwargs):
        original_save(obj, f, **kwargs)
        signal_file.write_text(str(f))
        time.sleep(300)

    accelerate.checkpointing.save = save_then_hang
    save_checkpoint(accelerator, run_dir, 2, train_state(2), keep_last=None)
    sys.exit("the save of step 2 was supposed to be killed")


def ddp_worker(run_dir: Path) -> None:
    """Train, save, continue (reference); then fresh objects, load, continue; write what each rank saw."""
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    model, optimizer, scheduler = build(accelerator, seed=0)
    torch.manual_seed(100 + rank)  # each rank draws its own batches and dropout masks
    train(accelerator, model, optimizer, scheduler, 3)
    ckpt = save_checkpoint(accelerator, run_dir, 3, train_state(3), keep_last=None)
    reference_probe = torch.rand(2).tolist()
    reference = train(accelerator, model, optimizer, scheduler, 3)
    reference_params = flat_params(model)

    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = build(accelerator, seed=1)
    torch.manual_seed(999)
    state = load_checkpoint(accelerator, ckpt, load_optim_state=True, load_lr_scheduler=True, model_config=MODEL_CONFIG)
    loaded_params = flat_params(model)
    resumed_probe = torch.rand(2).tolist()
    resumed = train(accelerator, model, optimizer, scheduler, 3)
    result = {
        "rank": rank,
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "train_state": state,
        "reference_probe": reference_probe,
        "resumed_probe": resumed_probe,
        "reference_losses": reference,
        "resumed_losses": resumed,
        "reference_params": reference_params,
        "resumed_params": flat_params(model),
        "loaded_params": loaded_params,
    }
    (run_dir / f"result_{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    del model, optimizer, scheduler  # drop the DDP wrappers (and their gloo work) before the process group goes
    accelerator.free_memory()
    accelerator.end_training()


if __name__ == "__main__":
    mode, run = sys.argv[1], Path(sys.argv[2])
    if mode == "kill-child":
        kill_child(run, Path(sys.argv[3]))
    elif mode == "ddp":
        ddp_worker(run)
    else:
        sys.exit(f"unknown mode {mode!r}")
