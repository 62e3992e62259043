"""Collators: lists of cached rows -> dicts of CPU tensors with the batch layout the loop expects.

LM (pretrain / SFT) keys: `input_ids`, `labels` (unshifted, -100 = not trained), `attention_mask`
(1 real, 0 pad), `position_ids` (restarting at each packed sample, or after each EOS for pretrain with
`reset_position_ids`), `sample_ids`. DPO keys: `chosen_` and `rejected_` + `input_ids` / `labels` /
`attention_mask` / `position_ids`, padded to one common width, and `sample_ids`.

Padding is on the right, to the longest row of the batch or to `seq_length` with
`pad_to_max_length`. Padding is decided by position, never by token id: a pad position gets the pad
id, label -100 and attention 0, while a real EOS that is trained keeps its label even when the pad id
is the EOS id (the default, `pad_token_id: -1`). Pad positions continue the last row's position ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ironcore.data.sft import IGNORE_INDEX


def positions_after_eos(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position ids that restart at 0 on the token after every EOS (per-document positions)."""
    t = torch.arange(ids.shape[-1])
    starts = torch.zeros_like(t)
    starts[1:] = torch.where(ids[:-1] == eos_id, t[1:], 0)
    return t - torch.cummax(starts, dim=0).values


def _pad(rows: list[dict], prefix: str, width: int, pad_id: int, eos_id: int | None) -> dict[str, torch.Tensor]:
    """input_ids / labels / attention_mask / position_ids of `rows`, right-padded to `width`."""
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    positions = torch.zeros((batch, width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids = torch.as_tensor(row[f"{prefix}input_ids"], dtype=torch.long)
        n = len(ids)
        input_ids[b, :n] = ids
        labels[b, :n] = torch.as_tensor(row[f"{prefix}labels"], dtype=torch.long) if f"{prefix}labels" in row else ids
        attention[b, :n] = 1
        if f"{prefix}position_ids" in row:
            positions[b, :n] = torch.as_tensor(row[f"{prefix}position_ids"], dtype=torch.long)
        elif eos_id is not None:
            positions[b, :n] = positions_after_eos(ids, eos_id)
        else:
            positions[b, :n] = torch.arange(n)
        last = int(positions[b, n - 1]) if n else -1
        positions[b, n:] = torch.arange(last + 1, last + 1 + width - n)
    return {f"{prefix}input_ids": input_ids, f"{prefix}labels": labels,
            f"{prefix}attention_mask": attention, f"{prefix}position_ids": positions}


@dataclass(frozen=True)
class LMCollator:
    """Pretrain and SFT rows. `reset_eos_id` set: pretrain positions restart after each EOS."""

    pad_id: int
    seq_length: int
    pad_to_max_length: bool = False
    reset_eos_id: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = self.seq_length if self.pad_to_max_length else max(len(r["input_ids"]) for r in rows)
        batch = _pad(rows, "", width, self.pad_id, self.reset_eos_id)
        batch["sample_ids"] = torch.tensor([r["sample_id"] for r in rows], dtype=torch.long)
        return batch


@dataclass(frozen=True)
class DPOCollator:
    """DPO pairs: chosen and rejected of a row stay in the same batch, padded to one width."""

    pad_id: int
    seq_length: int
    pad_to_max_length: bool = False

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows)
        width = self.seq_length if self.pad_to_max_length else longest
        batch = {**_pad(rows, "chosen_", width, self.pad_id, None), **_pad(rows, "rejected_", width, self.pad_id, None)}
        batch["sample_ids"] = torch.tensor([r["sample_id"] for r in rows], dtype=torch.long)
        return batch
