"""AdamW with decay / no-decay parameter groups, and the warmup + decay learning-rate schedule.

Both `optim.optimizer` values, ``adam`` and ``adamw``, build `torch.optim.AdamW`: weight decay is always
decoupled (Loshchilov & Hutter), as in GPT-2/3, LLaMA and Megatron's "adam". Coupled L2 (`torch.optim.Adam`
with weight_decay) would scale the decay by the adaptive step and is never what an LLM recipe means.

The schedule is one closed form, `lr_at`, used both by the scheduler and by anyone who needs the value
(tests, logging, resume checks). transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` is not used:
past its end the cosine climbs back up instead of holding ``min_lr``, and its linear schedule has no floor.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from ironcore.config.schema import OptimConfig
from ironcore.errors import ConfigError

logger = logging.getLogger(__name__)


def _is_norm_module(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm / GroupNorm / BatchNorm, and custom norms (e.g. ``LlamaRMSNorm``) by class name."""
    norm_types = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    return isinstance(module, norm_types) or type(module).__name__.lower().endswith("norm")


def no_decay_parameter_names(model: nn.Module, optim: OptimConfig) -> set[str]:
    """Names (as `model.named_parameters()` gives them) of trainable parameters that get no weight decay.

    The rule: every parameter with fewer than 2 dimensions (biases, norm gains), every parameter of a
    norm module, and, with ``optim.no_decay_on_embedding``, the weights of `nn.Embedding` modules (token
    and position embeddings). Tensors are matched by identity, so a tied lm_head, which shares the token
    embedding tensor, follows the embedding and is listed once under the name `named_parameters` keeps.
    Dimensions are the parameter's full shape: a ZeRO-3-partitioned one (built under `deepspeed.zero.Init`) is a
    flat 1-d shard whose shape is in ``ds_shape``.
    """
    exempt: set[int] = set()
    for module in model.modules():
        if _is_norm_module(module) or (optim.no_decay_on_embedding and isinstance(module, nn.Embedding)):
            exempt.update(id(p) for p in module.parameters(recurse=False))
    return {
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (len(getattr(p, "ds_shape", p.shape)) < 2 or id(p) in exempt)
    }


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """Two AdamW parameter groups, ``decay`` (weight_decay = optim.weight_decay) then ``no_decay`` (0.0).

    Both groups are always present (possibly empty) so optimizer state dicts keep the same layout across
    runs. Frozen parameters (requires_grad=False) are left out. Each group carries a ``name`` key for logs.
    """
    no_decay = no_decay_parameter_names(model, optim)
    decay_params, no_decay_params = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay_params if name in no_decay else decay_params).append(p)
    return [
        {"params": decay_params, "weight_decay": optim.weight_decay, "name": "decay"},
        {"params": no_decay_params, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, optim: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, optim)` with the config's lr (max_lr), betas, eps.

    Uses the fused kernel on every device type torch ships one for (torch 2.13: cuda and cpu among them;
    on CPU it matches the for-loop implementation to fp32 rounding and is the fastest of the three), and
    the multi-tensor ``foreach`` path elsewhere. ``device_type`` is where the parameters live when the
    optimizer steps (``"cpu"`` for ZeRO-offloaded partitions).
    """
    fused = device_type in _get_fused_kernels_supported_devices()
    groups = param_groups(model, optim)
    logger.info(
        "AdamW (%s): %d tensors with weight decay %g, %d tensors without",
        "fused" if fused else "foreach", len(groups[0]["params"]), optim.weight_decay, len(groups[1]["params"]),
    )
    return torch.optim.AdamW(
        groups,
        lr=optim.max_lr,
        betas=(optim.adam_beta1, optim.adam_beta2),
        eps=optim.adam_eps,
        fused=fused,
        foreach=None if fused else True,
    )


def annealing_end(optim: OptimConfig, train_steps: int) -> int:
    """The step at which the decay reaches min_lr: ``optim.annealing_steps``, or ``train_steps`` when 0."""
    return optim.annealing_steps or train_steps


def validate_schedule(optim: OptimConfig, train_steps: int) -> None:
    """Raise ConfigError for schedules that cannot be drawn: a floor above the peak, or no room to decay."""
    if optim.lr_scheduler == "constant":
        return
    if optim.min_lr > optim.max_lr:
        raise ConfigError(f"optim.min_lr ({optim.min_lr}) must not exceed optim.max_lr ({optim.max_lr})")
    end = annealing_end(optim, train_steps)
    if end <= optim.warmup_steps:
        source = "optim.annealing_steps" if optim.annealing_steps else "operation.train_steps"
        raise ConfigError(
            f"optim.warmup_steps ({optim.warmup_steps}) must be smaller than {source} ({end}), "
            "the step where the decay to min_lr ends"
        )


def lr_factor(step: int, optim: OptimConfig, train_steps: int) -> float:
    """The schedule as a fraction of max_lr at `step` optimizer steps taken (see `lr_at`)."""
    warmup = optim.warmup_steps
    if step < warmup:
        return step / warmup
    if optim.lr_scheduler == "constant":
        return 1.0
    floor = optim.min_lr / optim.max_lr if optim.max_lr > 0 else 0.0
    end = annealing_end(optim, train_steps)
    if step >= end:
        return floor
    progress = (step - warmup) / (end - warmup)
    if optim.lr_scheduler == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return floor + (1.0 - floor) * shape


def lr_at(step: int, optim: OptimConfig, train_steps: int) -> float:
    """The learning rate used by the optimizer step that follows `step` completed optimizer steps.

    - warmup: ``max_lr * step / warmup_steps`` for step < warmup_steps (linear from 0, HF convention);
    - cosine: ``min_lr + (max_lr - min_lr) * 0.5 * (1 + cos(pi * p))``, linear: ``... * (1 - p)``, with
      ``p = (step - warmup_steps) / (E - warmup_steps)`` and E = annealing_steps or train_steps;
    - ``min_lr`` from step E on (training may continue past E, e.g. annealing_steps < train_steps);
    - constant: ``max_lr`` after warmup; min_lr and annealing_steps do not apply.
    """
    return optim.max_lr * lr_factor(step, optim, train_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, train_steps: int) -> LambdaLR:
    """A LambdaLR whose lr after `n` ``scheduler.step()`` calls equals ``lr_at(n, optim, train_steps)`` exactly.

    Call ``scheduler.step()`` once after every optimizer step that was taken (not per micro-batch). The
    optimizer's lr must be max_lr (as `build_optimizer` sets it). Beware `accelerator.prepare(scheduler)`:
    accelerate's AcceleratedScheduler steps it ``num_processes`` times per call unless the Accelerator has
    ``step_scheduler_with_optimizer=False`` (or ``split_batches=True``).
    """
    validate_schedule(optim, train_steps)
    return LambdaLR(optimizer, partial(lr_factor, optim=optim, train_steps=train_steps))
