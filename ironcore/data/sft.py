"""SFT: conversations -> `input_ids` + `labels` that train only the assistant's tokens; truncation; packing.

Input, per dataset entry: a `messages_column` of `[{role, content}, ...]` lists (ShareGPT `{from, value}`
is accepted too), or a `prompt_column` + `response_column` pair (one user and one assistant turn).

Labels are -100 everywhere except on each assistant turn's content and the token that ends the turn
(the EOS for IronCore's default template, `<|im_end|>` / `<|eot_id|>` / `</s>` for templates that
bring their own). Two ways to find them, both from the rendered template:
- templates with `{% generation %}` blocks (the default one): `apply_chat_template(...,
  return_assistant_tokens_mask=True)` marks the tokens inside the blocks;
- any other template: each assistant turn starts where `render(messages[:i], add_generation_prompt=True)`
  ends, and ends with the first special token after that point (the end-of-turn token) or, for
  templates without special tokens, at the end of the turn's text minus trailing whitespace.

Rows that cannot be trained are skipped and counted (never silently): an unknown role, no assistant
turn after a prompt, an assistant turn whose content is null, empty or blank (it would train a bare
end-of-turn token: "answer nothing"), a template that raises on the row, a sample longer than
`seq_length` under `truncation: drop`, or no trained token left after truncation. A value of the
wrong type (a string where a message list belongs) is a `DataError` naming the row.

Storage (cache version 4): `input_ids` in `pretrain.token_dtype` (uint16 for up to 65,536 ids, else uint32),
`labels` in `label_dtype` (int16 when every id is below 32,768, else int32: labels hold ids and -100, so they
need a sign), packed `position_ids` in uint16 (uint32 past 65,536 tokens a row). That is 4 bytes a token for
ids + labels where version 3 stored 8 (two int32 lists). Labels stay a column of their own, not a mask
rebuilt at load time, so every reader of a cached row (collators, `--preview`, statistics) sees what the loss
sees; the collators widen everything to int64. Rows are tokenized in `data.num_workers` processes
(`map_rows`, through the same `workers.map_ranges` as pretrain documents), in row order.
"""

from __future__ import annotations

import enum
import re
from functools import partial

import datasets
import numpy as np
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter
from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from ironcore.config.schema import DatasetSpec
from ironcore.data.pretrain import UINT16_IDS, id_count, token_dtype
from ironcore.data.sources import is_json, is_messages, is_string, require_column
from ironcore.data.workers import map_ranges, row_ranges
from ironcore.errors import DataError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}
INT16_IDS = 2**15
ROWS_PER_TASK = 128  # conversations per worker task: tens of milliseconds of template rendering and tokenizing
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class Status(enum.IntEnum):
    """Why a row was kept or skipped; counted per dataset in the cache statistics."""

    OK = 0
    TRUNCATED = 1
    TOO_LONG = 2
    BAD_ROLE = 3
    NO_ASSISTANT = 4
    NO_TRAINED_TOKENS = 5
    TEMPLATE_ERROR = 6
    BAD_PAIR = 7
    EMPTY_ANSWER = 8
    IDENTICAL_PAIR = 9


KEPT = (Status.OK, Status.TRUNCATED)


def label_dtype(tokenizer: PreTrainedTokenizerBase) -> str:
    """The narrowest signed type holding every id of `tokenizer` and IGNORE_INDEX."""
    return "int16" if id_count(tokenizer) <= INT16_IDS else "int32"


def position_dtype(seq_length: int) -> str:
    return "uint16" if seq_length <= UINT16_IDS else "uint32"


def sample_features(tokenizer: PreTrainedTokenizerBase, prefixes: tuple[str, ...] = ("",)) -> dict[str, datasets.List]:
    """`<prefix>input_ids` and `<prefix>labels` columns in the narrowest types for `tokenizer`."""
    ids, labels = (datasets.List(datasets.Value(t)) for t in (token_dtype(tokenizer), label_dtype(tokenizer)))
    features = {}
    for prefix in prefixes:
        features.update({f"{prefix}input_ids": ids, f"{prefix}labels": labels})
    return features


def status_counts(statuses: list[int]) -> dict[str, int]:
    counts = np.bincount(np.asarray(statuses, dtype=np.int64), minlength=len(Status))
    return {s.name.lower(): int(counts[s]) for s in Status if counts[s]}


# ---- messages ------------------------------------------------------------------------------------


def to_messages(value, where: str) -> list[dict[str, str]] | Status:
    """`value` as `[{"role", "content"}]` with canonical roles, or BAD_ROLE; DataError for a wrong type."""
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where} holds {type(value).__name__}, expected a list of {{role, content}} messages")
    messages = []
    for message in value:
        if not isinstance(message, dict):
            raise DataError(f"{where} holds a {type(message).__name__} message, expected {{role, content}}")
        role = message.get("role") if message.get("role") is not None else message.get("from")
        content = message.get("content") if message.get("content") is not None else message.get("value")
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            return Status.BAD_ROLE
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise DataError(f"{where} has a {role} message whose content is {type(content).__name__}, expected a string")
        messages.append({"role": role, "content": content})
    return messages


def has_assistant_reply(messages: list[dict[str, str]]) -> bool:
    return any(m["role"] == "assistant" for m in messages[1:])


def has_empty_answer(messages: list[dict[str, str]]) -> bool:
    """An assistant turn with nothing to say (null content reads as ""); trained, it would teach an instant stop."""
    return any(m["role"] == "assistant" and not m["content"].strip() for m in messages)


# ---- encoding ------------------------------------------------------------------------------------


def encode_chats(
    chats: list[list[dict[str, str]]],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    *,
    last_turn_only: bool = False,
) -> list[tuple[list[int], list[int]] | None]:
    """(input_ids, labels) per conversation, None where the template raises on it."""
    try:
        encoded = _encode(chats, tokenizer, template)
    except TemplateError:
        encoded = []
        for chat in chats:
            try:
                encoded.extend(_encode([chat], tokenizer, template))
            except TemplateError:
                encoded.append(None)
    out = []
    for item in encoded:
        if item is None:
            out.append(None)
            continue
        ids, mask = item
        if last_turn_only:
            mask = _last_run(mask)
        out.append((list(ids), [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]))
    return out


def encode_rows(chats, tokenizer, template: str, *, label: str, last_turn_only: bool = False) -> list:
    """`encode_chats` for the rows of one dataset entry ([] for none), naming the entry in a template error."""
    if not chats:
        return []
    try:
        return encode_chats(chats, tokenizer, template, last_turn_only=last_turn_only)
    except DataError as err:
        raise DataError(f"{label}: {err}") from None


def _encode(chats, tokenizer, template) -> list[tuple[list[int], list[int]]]:
    if _GENERATION_TAG.search(template):
        return generation_masks(chats, tokenizer, template)
    return span_masks(chats, tokenizer, template)


def generation_masks(chats, tokenizer, template) -> list[tuple[list[int], list[int]]]:
    """Token ids and the assistant mask of `{% generation %}` blocks, from transformers itself."""
    out = tokenizer.apply_chat_template(
        chats, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(zip(out["input_ids"], out["assistant_masks"], strict=True))


def span_masks(chats, tokenizer, template) -> list[tuple[list[int], list[int]]]:
    """Token ids and a mask of the assistant turns found by rendering prefixes of each conversation."""
    specials = _special_pattern(tokenizer)
    texts, spans = [], []
    for chat in chats:
        full = _render(tokenizer, template, chat, False)
        texts.append(full)
        spans.append(_assistant_spans(chat, full, tokenizer, template, specials))
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, turn_spans in zip(encoded["input_ids"], encoded["offset_mapping"], spans, strict=True):
        mask = [int(any(s <= start < e for s, e in turn_spans)) for start, _ in offsets]
        out.append((ids, mask))
    return out


def _render(tokenizer, template: str, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def _special_pattern(tokenizer) -> re.Pattern:
    tokens = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content.strip()}
    tokens.add(tokenizer.eos_token)
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _assistant_spans(chat, full: str, tokenizer, template: str, specials: re.Pattern) -> list[tuple[int, int]]:
    """Character spans of the trained part of each assistant turn (not the first message) in `full`."""
    spans = []
    for i, message in enumerate(chat):
        if message["role"] != "assistant" or i == 0:
            continue
        head = _render(tokenizer, template, chat[:i], True)
        if not full.startswith(head):
            raise DataError(
                "the chat template renders a conversation's beginning differently from the whole conversation, "
                "so assistant turns cannot be located; set data.chat_template to a prefix-stable template"
            )
        through = _render(tokenizer, template, chat[: i + 1], False)
        bound = len(through) if full.startswith(through) else len(full)
        hit = specials.search(full, len(head), bound)
        end = hit.end() if hit else len(head) + len(full[len(head) : bound].rstrip())
        spans.append((len(head), end))
    return spans


def _last_run(mask: list[int]) -> list[int]:
    """Keep only the last contiguous run of ones (DPO trains the final assistant turn only)."""
    out = [0] * len(mask)
    i = len(mask) - 1
    while i >= 0 and not mask[i]:
        i -= 1
    while i >= 0 and mask[i]:
        out[i] = 1
        i -= 1
    return out


def fit_length(ids: list[int], labels: list[int], seq_length: int, truncation: str) -> tuple[Status, list[int], list[int]]:
    """Apply `data.truncation` to one sample; a sample with nothing left to train is skipped."""
    status = Status.OK
    if len(ids) > seq_length:
        if truncation == "drop":
            return Status.TOO_LONG, [], []
        ids, labels, status = ids[:seq_length], labels[:seq_length], Status.TRUNCATED
    if all(label == IGNORE_INDEX for label in labels):
        return Status.NO_TRAINED_TOKENS, [], []
    return status, ids, labels


# ---- datasets ------------------------------------------------------------------------------------


def check_sft_columns(ds: datasets.Dataset, spec: DatasetSpec, label: str) -> tuple[str, ...]:
    """The columns a row is built from: `(messages,)` or `(prompt, response)`."""
    columns = ds.column_names
    if spec.messages_column in columns:
        require_column(ds, spec.messages_column, label, "a list of {role, content} messages",
                       lambda f: is_messages(f) or is_json(f))
        return (spec.messages_column,)
    if spec.prompt_column in columns or spec.response_column in columns:
        require_column(ds, spec.prompt_column, label, "a string or a message list",
                       lambda f: is_string(f) or is_messages(f) or is_json(f))
        require_column(ds, spec.response_column, label, "a string", lambda f: is_string(f) or is_json(f))
        return (spec.prompt_column, spec.response_column)
    raise DataError(
        f"{label}: no column '{spec.messages_column}' (a list of {{role, content}} messages) and no "
        f"'{spec.prompt_column}' + '{spec.response_column}' columns; columns: {', '.join(columns)}"
    )


def row_messages(batch: dict, k: int, columns: tuple[str, ...], where: str) -> list[dict[str, str]] | Status:
    """The conversation of row k of a batch, or the reason to skip it."""
    if len(columns) == 1:
        messages = to_messages(batch[columns[0]][k], f"{where} column '{columns[0]}'")
    else:
        prompt, response = batch[columns[0]][k], batch[columns[1]][k]
        if response is None:
            return Status.EMPTY_ANSWER
        if not isinstance(response, str):
            raise DataError(f"{where} column '{columns[1]}' holds {type(response).__name__}, expected a string")
        head = to_messages(prompt, f"{where} column '{columns[0]}'") if not isinstance(prompt, str) else [
            {"role": "user", "content": prompt}
        ]
        messages = head if isinstance(head, Status) else head + [{"role": "assistant", "content": response}]
    if isinstance(messages, Status):
        return messages
    if not has_assistant_reply(messages):
        return Status.NO_ASSISTANT
    return Status.EMPTY_ANSWER if has_empty_answer(messages) else messages


def outcome(conversation, encoded, seq_length: int, truncation: str) -> tuple[Status, list[int], list[int]]:
    """Status, input_ids and labels of one row from its conversation (or skip reason) and encoding."""
    if isinstance(conversation, Status):
        return conversation, [], []
    if encoded is None:
        return Status.TEMPLATE_ERROR, [], []
    return fit_length(*encoded, seq_length, truncation)


def _sft_batch(batch, indices, *, tokenizer, template, columns, seq_length, truncation, label):
    conversations = [row_messages(batch, k, columns, f"{label} row {row}") for k, row in enumerate(indices)]
    todo = [k for k, c in enumerate(conversations) if not isinstance(c, Status)]
    rows = encode_rows([conversations[k] for k in todo], tokenizer, template, label=label)
    encoded = dict(zip(todo, rows, strict=True))
    out = {"input_ids": [], "labels": [], "status": []}
    for k, conversation in enumerate(conversations):
        status, ids, labels = outcome(conversation, encoded.get(k), seq_length, truncation)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["status"].append(int(status))
    return out


def tokenize_sft(
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
    """One row per input row: `input_ids`, `labels`, `status` (rows with no ids are filtered by the caller)."""
    columns = check_sft_columns(ds, spec, label)
    fn = partial(_sft_batch, tokenizer=tokenizer, template=tokenizer.chat_template, columns=columns,
                 seq_length=seq_length, truncation=truncation, label=label)
    features = datasets.Features({**sample_features(tokenizer), "status": datasets.Value("int8")})
    return map_rows(ds.select_columns(list(columns)), fn, features, num_workers=num_workers, cache_file=cache_file)


def _arrow_rows(ds: datasets.Dataset, start: int, stop: int, *, batch_fn, schema: pa.Schema) -> pa.Table:
    """`batch_fn` of rows [start, stop) as an Arrow table of the storage types, built where it was computed."""
    return pa.Table.from_pydict(batch_fn(ds[start:stop], range(start, stop)), schema=schema)


def map_rows(ds: datasets.Dataset, batch_fn, features: datasets.Features, *, num_workers: int,
             cache_file: str) -> datasets.Dataset:
    """`batch_fn(batch, row_indices) -> columns` over `ds` in `num_workers` processes (`workers.map_ranges`: each
    worker reads its rows and sends back an Arrow table, not Python lists), written in row order to `cache_file`."""
    rows = partial(_arrow_rows, batch_fn=batch_fn, schema=features.arrow_schema)
    with ArrowWriter(features=features, path=cache_file) as writer:
        for table in map_ranges(ds, row_ranges(len(ds), ROWS_PER_TASK), rows, num_workers):
            writer.write_table(table)
        writer.finalize()
    return datasets.Dataset.from_file(cache_file)


# ---- packing -------------------------------------------------------------------------------------


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices, longest first into the first bin with room; deterministic."""
    bins: list[list[int]] = []
    room: list[int] = []
    for k in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for b, free in enumerate(room):
            if lengths[k] <= free:
                bins[b].append(k)
                room[b] -= lengths[k]
                break
        else:
            bins.append([k])
            room.append(capacity - lengths[k])
    return bins


def _pack_batch(batch, *, seq_length):
    out = {"input_ids": [], "labels": [], "position_ids": []}
    for members in _first_fit_decreasing([len(ids) for ids in batch["input_ids"]], seq_length):
        out["input_ids"].append([t for k in members for t in batch["input_ids"][k]])
        out["labels"].append([t for k in members for t in batch["labels"][k]])
        out["position_ids"].append([p for k in members for p in range(len(batch["input_ids"][k]))])
    return out


def pack(ds: datasets.Dataset, *, seq_length: int, cache_file: str) -> datasets.Dataset:
    """Pack samples (each at most seq_length long) into rows of at most seq_length tokens.

    First-fit decreasing within consecutive windows of 1000 samples; `position_ids` restart at 0 for
    each sample, which is how the model and the attention know where one sample ends. One process, so
    the windows (and the rows) do not depend on `data.num_workers`; packing is cheap next to tokenizing.
    """
    positions = datasets.List(datasets.Value(position_dtype(seq_length)))
    features = datasets.Features({"input_ids": ds.features["input_ids"], "labels": ds.features["labels"],
                                  "position_ids": positions})
    return ds.map(partial(_pack_batch, seq_length=seq_length), batched=True, batch_size=1000,
                  remove_columns=ds.column_names, features=features, cache_file_name=cache_file, desc="Pack")
