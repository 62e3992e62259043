"""What one micro-batch costs for each task: a loss *sum*, the count it is normalised by, and metric sums.

The loop normalises by the count of the whole optimizer step (all micro-batches, all ranks), so the
loss and its gradients do not depend on how a global batch is split. Causal LM (pretrain and SFT)
counts trained tokens; DPO counts preference pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ironcore.objectives import IGNORE_INDEX, dpo_loss, lm_loss_sum, sequence_logps

Batch = dict[str, torch.Tensor]


@dataclass
class MicroResult:
    loss_sum: torch.Tensor
    stats: dict[str, torch.Tensor]


class LanguageModeling:
    """Next-token cross-entropy on the trained labels (all tokens for pretrain, assistant spans for SFT)."""

    def count(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def __call__(self, model: nn.Module, batch: Batch) -> MicroResult:
        logits = forward(model, batch)
        loss_sum, total, correct = lm_loss_sum(logits, batch["labels"])
        return MicroResult(loss_sum, {"correct_tokens": correct, "tokens": total})

    def summarize(self, loss_sum: float, stats: dict[str, float]) -> dict[str, float]:
        loss = loss_sum / max(stats["tokens"], 1)
        return {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "token_accuracy": stats["correct_tokens"] / max(stats["tokens"], 1)}


class DirectPreference:
    """Sigmoid DPO against a frozen reference: a live model, or log-probs precomputed per sample id."""

    def __init__(self, beta: float, reference: nn.Module | None = None, reference_logps: torch.Tensor | None = None):
        if (reference is None) == (reference_logps is None):
            raise ValueError("DPO needs exactly one of a reference model or precomputed reference log-probs")
        self.beta, self.reference, self.reference_logps = beta, reference, reference_logps

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["sample_ids"].numel(), device=batch["sample_ids"].device)

    def __call__(self, model: nn.Module, batch: Batch) -> MicroResult:
        pair = paired(batch)
        chosen, rejected = sequence_logps(forward(model, pair), pair["labels"]).chunk(2)
        ref_chosen, ref_rejected = self.reference_scores(batch, pair)
        loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        return MicroResult(loss.sum(), {
            "pairs": torch.tensor(loss.numel(), device=loss.device),
            "reward_correct": (chosen_rewards > rejected_rewards).sum(),
            "reward_margin": (chosen_rewards - rejected_rewards).sum(),
            "reward_chosen": chosen_rewards.sum(),
            "reward_rejected": rejected_rewards.sum(),
        })

    def reference_scores(self, batch: Batch, pair: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_logps is not None:
            scores = self.reference_logps.to(batch["sample_ids"].device)[batch["sample_ids"]]
            return scores[:, 0], scores[:, 1]
        with torch.no_grad():
            return sequence_logps(forward(self.reference, pair), pair["labels"]).chunk(2)

    def summarize(self, loss_sum: float, stats: dict[str, float]) -> dict[str, float]:
        pairs = max(stats["pairs"], 1)
        return {
            "loss": loss_sum / pairs,
            "reward_accuracy": stats["reward_correct"] / pairs,
            "reward_margin": stats["reward_margin"] / pairs,
            "reward_chosen": stats["reward_chosen"] / pairs,
            "reward_rejected": stats["reward_rejected"] / pairs,
        }


def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
        use_cache=False,
    ).logits


def paired(batch: Batch) -> Batch:
    """Chosen rows then rejected rows in one batch (one forward pass), right-padded to a common length."""
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    pads = {"input_ids": 0, "labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0}
    return {
        key: torch.cat([F.pad(batch[f"{side}_{key}"], (0, length - batch[f"{side}_{key}"].shape[1]), value=pad)
                        for side in ("chosen", "rejected")])
        for key, pad in pads.items()
    }


@torch.no_grad()
def reference_logps(model: nn.Module, batches, num_samples: int, device: torch.device) -> torch.Tensor:
    """(chosen, rejected) reference log-probs [num_samples, 2] by sample id, for `DirectPreference`.

    Fills this rank's share from `batches`; the caller sums the tables across ranks (ids are disjoint).
    """
    table = torch.zeros(num_samples, 2, device=device)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        pair = paired(batch)
        chosen, rejected = sequence_logps(forward(model, pair), pair["labels"]).chunk(2)
        table[batch["sample_ids"]] = torch.stack([chosen, rejected], dim=1)
    return table

