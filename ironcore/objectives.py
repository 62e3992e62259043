"""Losses and their counters as pure tensor functions (no accelerate, no model calls).

Labels follow the HF convention: unshifted, same shape as input_ids, ``-100`` where no token is trained.
Position t's logits predict label t+1, so every function drops the last logit and the first label.
Reductions are sums plus counts, never means, so the loop can normalise by the token (or pair) count of the
whole optimizer step across micro-batches and ranks: that makes micro 2 x GA 4 and micro 8 x GA 1 the same loss.
Log-probabilities are computed in fp32 whatever the logits dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Aligned (logits [B,T-1,V], targets [B,T-1] with ignored positions set to 0, mask [B,T-1] bool)."""
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    return shift_logits, shift_labels.masked_fill(~mask, 0), mask


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) [B,T-1] in fp32 (0.0 at ignored positions) and the trained-token mask [B,T-1]."""
    shift_logits, targets, mask = _shift(logits, labels)
    logp = torch.log_softmax(shift_logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(~mask, 0.0), mask


# Elements of one chunk of rows in `ChunkedCrossEntropy` on CPU: 2^20 fp32 values (4 MiB) stay in the cache
# between the passes over them; elsewhere one chunk holds everything (a GPU runs few large kernels best).
CPU_CHUNK_ELEMENTS = 2**20
DEVICE_CHUNK_ELEMENTS = 2**31


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of [N, V] logits (any float dtype) against [N] targets, ignored ones skipped, and
    the count of targets the logits' argmax predicts (long scalar, not differentiable).

    The same loss and gradient as ``F.cross_entropy(logits.float(), targets, reduction="sum")`` (to fp32
    rounding), computed in chunks of rows in fp32: forward keeps nothing of [N, V] size, backward recomputes each
    chunk's softmax and writes ``(softmax - onehot) * grad`` over the logits themselves (an activation's logits are
    read by nothing after the loss; a leaf's, or a view of one, get a fresh gradient). The
    plain path holds an fp32 copy of bf16 logits, an [N, V] fp32 log-softmax for backward and a zero-filled
    [N, V] nll gradient, and streams each of them through memory several times.

    On a CPU, three things make it fast (benchmarks/README.md): each chunk goes through torch's fused
    `log_softmax` / `softmax` kernels, not `sub`, `exp_` and `sum` (torch's standalone `exp` is 2x slower there
    than the softmax kernel's); every chunk-sized temporary is one workspace allocated once per call, since a
    fresh 4 MiB tensor on huge pages costs milliseconds of page faults (so does the fresh [N, V]
    gradient the in-place backward saves); and the accuracy takes `amax` and float
    passes, not `max(dim)` or `argmax`, which are 4x slower there (`count_argmax_hits`).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = chunk_rows(logits)
        valid = targets != IGNORE_INDEX
        safe = targets.masked_fill(~valid, 0)
        picked = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # log p(target) [N]
        correct = torch.zeros((), dtype=torch.long, device=logits.device)
        logp = _workspace(logits, rows)
        upcast = None if logits.dtype == torch.float32 else _workspace(logits, rows)
        with torch.autocast(logits.device.type, enabled=False):
            for start in range(0, logits.shape[0], rows):
                chunk = logits[start : start + rows]
                n = chunk.shape[0]
                x = chunk if upcast is None else upcast[:n].copy_(chunk)  # (n, V) fp32
                correct += count_argmax_hits(x, safe[start : start + n], valid[start : start + n], logp[:n])
                torch.log_softmax(x, dim=-1, out=logp[:n])
                picked[start : start + n] = logp[:n].gather(1, safe[start : start + n, None]).squeeze(1)
            loss_sum = -(picked * valid).sum()
        ctx.save_for_backward(logits, safe, valid)
        root = logits if logits._base is None else logits._base
        ctx.in_place = not root.is_leaf  # a leaf's logits (or a view of one) belong to the caller
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, _grad_correct: None) -> tuple[torch.Tensor, None]:
        logits, safe, valid = ctx.saved_tensors
        rows = chunk_rows(logits)
        # The gradient overwrites the logits, which nothing reads after this (as in Liger-Kernel's cross-entropy):
        # no fresh [N, V] tensor to map and page in each step.
        grad = logits if ctx.in_place else torch.empty_like(logits)
        scale = valid.float() * grad_output
        fp32 = grad.dtype == torch.float32  # the gradient chunk itself is the workspace; else an fp32 one
        upcast = None if fp32 else _workspace(logits, rows)
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start : start + rows]
            n = chunk.shape[0]
            out = grad[start : start + n] if fp32 else upcast[:n].copy_(chunk)
            torch.softmax(chunk if fp32 else out, dim=-1, out=out)
            out[torch.arange(n, device=out.device), safe[start : start + n]] -= 1.0
            out.mul_(scale[start : start + n, None])
            if not fp32:
                grad[start : start + n] = out
        return grad, None


def _workspace(logits: torch.Tensor, rows: int) -> torch.Tensor:
    """An fp32 buffer of one chunk's shape, reused by every chunk of a call."""
    return torch.empty((min(rows, logits.shape[0]), logits.shape[1]), dtype=torch.float32, device=logits.device)


def count_argmax_hits(x: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                      work: torch.Tensor) -> torch.Tensor:
    """How many valid rows of `x` [n, V] have `argmax == target` (long scalar; ties go to the first index, as
    `argmax` gives them). `work`: an fp32 [n, V] scratch buffer.

    On a CPU, `argmax` and `max(dim)` run 4x slower than `amax` and three float passes, so a row counts when its
    target's logit is the peak and the peak occurs once (`x - peak` is exactly 0 only where x equals it); only rows
    where the target shares the peak with others, rare, take an `argmax`. Elsewhere the `nonzero` that picks them
    would wait on the device, and `argmax` is fast: it runs over every row.
    """
    if x.device.type != "cpu":
        return ((x.argmax(dim=-1) == targets) & valid).sum()
    peak = x.amax(dim=-1)  # (n,)
    at_peak = (x.gather(1, targets[:, None]).squeeze(1) == peak) & valid
    peaks = x.shape[1] + torch.sub(x, peak[:, None], out=work).sign_().sum(dim=-1)  # (n,) elements equal to the peak
    tied = (at_peak & (peaks > 1)).nonzero().squeeze(1)
    return (at_peak & (peaks == 1)).sum() + (x[tied].argmax(dim=-1) == targets[tied]).sum()


def chunk_rows(logits: torch.Tensor) -> int:
    elements = CPU_CHUNK_ELEMENTS if logits.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    return max(1, elements // logits.shape[-1])


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over trained tokens (fp32 scalar), their count, and how many of them
    the argmax of the logits predicts (long scalars).

    The step loss is ``sum(loss_sum) / sum(num_tokens)`` over all micro-batches and ranks of the step. Its
    backward overwrites `logits` with their gradient unless they are a leaf: read them before ``backward()``.
    """
    # Shift the labels, not the logits: slicing [B,T,V] logits copies them and allocates a full-size gradient
    # in backward (measured ~5% of a CPU step); the padded last target is ignored, so the sum is the same.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    loss_sum, correct = ChunkedCrossEntropy.apply(logits.flatten(0, 1), targets.flatten())
    return loss_sum, (targets != IGNORE_INDEX).sum(), correct


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of trained-token log-probs per sequence [B] (fp32): the DPO policy / reference score."""
    logp, _ = token_logprobs(logits, labels)
    return logp.sum(dim=-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss per pair [B] (Rafailov et al. 2023, eq. 7) and the implicit rewards [B] (detached).

    ``loss = -logsigmoid(beta * ((pc - rc) - (pr - rr)))``; ``chosen_rewards = beta * (pc - rc)``,
    ``rejected_rewards = beta * (pr - rr)``. The step loss is the sum over pairs divided by the pair count.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return loss, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def dpo_reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch means of the implicit rewards, as 0-d fp32 tensors under TRL's metric names.

    ``rewards/accuracy`` is the fraction of pairs whose chosen reward exceeds the rejected one (ties count
    as wrong); ``rewards/margin`` is the mean of chosen - rejected.
    """
    chosen, rejected = chosen_rewards.float(), rejected_rewards.float()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracy": (chosen > rejected).float().mean(),
        "rewards/margin": (chosen - rejected).mean(),
    }
