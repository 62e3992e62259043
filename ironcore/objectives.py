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


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over trained tokens (fp32 scalar) and their count (long scalar).

    The step loss is ``sum(loss_sum) / sum(num_tokens)`` over all micro-batches and ranks of the step.
    """
    # Shift the labels, not the logits: slicing [B,T,V] logits copies them and allocates a full-size gradient
    # in backward (measured ~5% of a CPU step); the padded last target is ignored, so the sum is the same.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    loss_sum = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (targets != IGNORE_INDEX).sum()


def token_accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, total) long scalars: trained tokens whose argmax prediction equals the label (SFT eval)."""
    shift_logits, targets, mask = _shift(logits, labels)
    correct = (shift_logits.argmax(dim=-1) == targets) & mask
    return correct.sum(), mask.sum()


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
