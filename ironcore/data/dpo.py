"""DPO: prompt + chosen + rejected -> two tokenized sequences per row, labels only on each final answer.

Accepted row shapes (columns named by the dataset entry):
- `prompt` string (or message list) with `chosen` / `rejected` strings: the answers become one assistant turn;
- `chosen` / `rejected` conversations that share their prompt prefix (ultrafeedback_binarized style):
  everything before the last message is the prompt, and both prefixes must be equal;
- `chosen` / `rejected` holding only the assistant message(s), with the prompt in `prompt`.
Both sequences go through the chat template like SFT; labels are -100 on the prompt and on every
earlier turn, so only the final assistant answer and its end-of-turn token count. Chosen and rejected
live in the same row, so they always land in the same batch.

A row without a chosen or rejected answer (or without the prompt it needs) is a `DataError` naming the
row. Pairs whose prompts differ, unknown roles, too-long pairs under `truncation: drop`, and pairs
whose two sides are the same tokens (chosen equals rejected, or equal once truncated: such a pair
has no preference to learn and would only add a constant ln 2 to the loss) are skipped and counted,
like SFT rows. Both sides are stored like SFT rows (`sft.sample_features`: 4 bytes a token for ids + labels).
"""

from __future__ import annotations

from functools import partial

import datasets
from transformers import PreTrainedTokenizerBase

from ironcore.config.schema import DatasetSpec
from ironcore.data.sft import (
    Status,
    encode_rows,
    fit_length,
    has_assistant_reply,
    map_rows,
    sample_features,
    to_messages,
)
from ironcore.data.sources import is_json, is_messages, is_string, require_column
from ironcore.errors import DataError

SIDES = ("chosen", "rejected")


def _answer_type(feature) -> bool:
    return is_string(feature) or is_messages(feature) or is_json(feature)


def check_dpo_columns(ds: datasets.Dataset, spec: DatasetSpec, label: str) -> tuple[str | None, str, str]:
    """(prompt column or None, chosen column, rejected column), type-checked."""
    answer = _answer_type
    require_column(ds, spec.chosen_column, label, "the chosen answer (a string or a message list)", answer)
    require_column(ds, spec.rejected_column, label, "the rejected answer (a string or a message list)", answer)
    if spec.prompt_column in ds.column_names:
        require_column(ds, spec.prompt_column, label, "a string or a message list", answer)
        return spec.prompt_column, spec.chosen_column, spec.rejected_column
    if is_string(ds.features[spec.chosen_column]):
        require_column(ds, spec.prompt_column, label, "the prompt of string answers", answer)
    return None, spec.chosen_column, spec.rejected_column


def _empty(value) -> bool:
    return value is None or (isinstance(value, (str, list, tuple)) and len(value) == 0)


def _prompt_messages(prompt, where: str) -> list[dict[str, str]] | Status:
    if _empty(prompt):
        raise DataError(f"{where}: no prompt (its answers are not conversations, so the prompt column is needed)")
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else to_messages(prompt, where)


def pair_messages(prompt, chosen, rejected, where: str) -> tuple[list, list] | Status:
    """The chosen and rejected conversations of one row, or the reason to skip it."""
    for side, value in zip(SIDES, (chosen, rejected), strict=True):
        if _empty(value):
            raise DataError(f"{where}: no {side} answer (a DPO pair needs both chosen and rejected)")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(f"{where}: chosen and rejected must both be strings or both be message lists")
    if isinstance(chosen, str):
        head = _prompt_messages(prompt, where)
        if isinstance(head, Status):
            return head
        return head + [{"role": "assistant", "content": chosen}], head + [{"role": "assistant", "content": rejected}]
    good, bad = to_messages(chosen, f"{where} chosen"), to_messages(rejected, f"{where} rejected")
    if isinstance(good, Status) or isinstance(bad, Status):
        return Status.BAD_ROLE
    if good[0]["role"] == "assistant":
        head = _prompt_messages(prompt, where)
        if isinstance(head, Status):
            return head
        good, bad = head + good, head + bad
    if good[:-1] != bad[:-1]:
        return Status.BAD_PAIR
    if good[-1]["role"] != "assistant" or bad[-1]["role"] != "assistant" or not has_assistant_reply(good):
        return Status.NO_ASSISTANT
    for side, conversation in zip(SIDES, (good, bad), strict=True):
        if not conversation[-1]["content"]:
            raise DataError(f"{where}: no {side} answer (its last message is empty; a DPO pair needs both answers)")
    return good, bad


def _pair_outcome(pair, encoded, seq_length: int, truncation: str) -> tuple[Status, list[list[int]]]:
    """Status and [chosen ids, chosen labels, rejected ids, rejected labels] of one row."""
    if isinstance(pair, Status):
        return pair, [[], [], [], []]
    if encoded[0] is None or encoded[1] is None:
        return Status.TEMPLATE_ERROR, [[], [], [], []]
    (s1, ci, cl), (s2, ri, rl) = (fit_length(*e, seq_length, truncation) for e in encoded)
    for status in (s1, s2):
        if status not in (Status.OK, Status.TRUNCATED):
            return status, [[], [], [], []]
    if ci == ri and cl == rl:
        return Status.IDENTICAL_PAIR, [[], [], [], []]
    return max(s1, s2), [ci, cl, ri, rl]


def _dpo_batch(batch, indices, *, tokenizer, template, columns, seq_length, truncation, label):
    prompt_col, chosen_col, rejected_col = columns
    pairs = []
    for k, row in enumerate(indices):
        prompt = batch[prompt_col][k] if prompt_col else None
        pairs.append(pair_messages(prompt, batch[chosen_col][k], batch[rejected_col][k], f"{label} row {row}"))
    todo = [k for k, p in enumerate(pairs) if not isinstance(p, Status)]
    chats = [pairs[k][side] for k in todo for side in (0, 1)]
    flat = encode_rows(chats, tokenizer, template, label=label, last_turn_only=True)
    encoded = {k: (flat[2 * n], flat[2 * n + 1]) for n, k in enumerate(todo)}
    keys = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    out = {key: [] for key in (*keys, "status")}
    for k, pair in enumerate(pairs):
        status, values = _pair_outcome(pair, encoded.get(k), seq_length, truncation)
        for key, value in zip(keys, values, strict=True):
            out[key].append(value)
        out["status"].append(int(status))
    return out


def tokenize_dpo(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    spec: DatasetSpec,
    seq_length: int,
    truncation: str,
    num_workers: int,
    label: str,
    cache_file: str,
) -> datasets.Dataset:
    """One row per input row: chosen/rejected `input_ids` and `labels`, plus `status`."""
    columns = check_dpo_columns(ds, spec, label)
    fn = partial(_dpo_batch, tokenizer=tokenizer, template=tokenizer.chat_template, columns=columns,
                 seq_length=seq_length, truncation=truncation, label=label)
    features = datasets.Features({**sample_features(tokenizer, ("chosen_", "rejected_")),
                                  "status": datasets.Value("int8")})
    needed = [c for c in dict.fromkeys(columns) if c is not None]
    return map_rows(ds.select_columns(needed), fn, features, num_workers=num_workers, cache_file=cache_file)
