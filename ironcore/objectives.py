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
    rounding: the sum runs in another order), computed in chunks of rows in fp32: forward keeps only the
    log-sum-exp per row (N floats) and backward writes ``(softmax - onehot) * grad`` chunk by chunk straight
    into a gradient of the logits' dtype. The plain path holds an fp32 copy of bf16 logits, an [N, V] fp32
    log-softmax for backward and a zero-filled [N, V] nll gradient, and streams each of them through
    memory several times: on a 2-core CPU that is 65 vs 43 ms (fp32) and 92 vs 33 ms (bf16) per step for
    2048 x 8192 logits (benchmarks/README.md). The token accuracy comes from the same pass: `max` gives the
    row's peak and its index together, where a separate `argmax` read all the logits again (2048 x 8192 on one
    core: 78 against 19 ms in bf16, 17 against 14 in fp32). Eval and DPO keep their own functions.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = chunk_rows(logits)
        valid = targets != IGNORE_INDEX
        safe = targets.masked_fill(~valid, 0)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        predicted = torch.empty_like(targets)
        with torch.autocast(logits.device.type, enabled=False):
            for start in range(0, logits.shape[0], rows):
                chunk = logits[start : start + rows].float()
                peak, argmax = chunk.max(dim=-1)  # the first index of the peak on ties, as `argmax` gives it
                predicted[start : start + rows] = argmax
                lse[start : start + rows] = peak + (chunk - peak[:, None]).exp_().sum(dim=-1).log_()
            picked = logits.gather(1, safe[:, None]).squeeze(1).float()
            loss_sum = ((lse - picked) * valid).sum()
        correct = ((predicted == safe) & valid).sum()
        ctx.save_for_backward(logits, lse, safe, valid)
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, _grad_correct: None) -> tuple[torch.Tensor, None]:
        logits, lse, safe, valid = ctx.saved_tensors
        rows = chunk_rows(logits)
        grad = torch.empty_like(logits)
        scale = valid.float() * grad_output
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start : start + rows]
            n = chunk.shape[0]
            # fp32 logits: the gradient chunk itself is the workspace; bf16/fp16: an fp32 one, cast on the copy
            fp32 = grad.dtype == torch.float32
            out = grad[start : start + n] if fp32 else chunk.new_empty(chunk.shape, dtype=torch.float32)
            torch.sub(chunk, lse[start : start + n, None], out=out).exp_()
            out[torch.arange(n, device=out.device), safe[start : start + n]] -= 1.0
            out.mul_(scale[start : start + n, None])
            if not fp32:
                grad[start : start + n] = out
        return grad, None


def chunk_rows(logits: torch.Tensor) -> int:
    elements = CPU_CHUNK_ELEMENTS if logits.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    return max(1, elements // logits.shape[-1])


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over trained tokens (fp32 scalar), their count, and how many of them
    the argmax of the logits predicts (long scalars).

    The step loss is ``sum(loss_sum) / sum(num_tokens)`` over all micro-batches and ranks of the step.
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
