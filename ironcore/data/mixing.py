"""Mixing several training datasets by ratio.

Semantics: `ratio` is the proportion of training samples drawn from each dataset (ratios are
normalised, so `[3, 1]` means 75% / 25%). The mixture is built once, seeded, with
`datasets.interleave_datasets(probabilities=..., seed=..., stopping_strategy="all_exhausted")`: each
row comes from dataset i with probability ratio_i, until every dataset has been used completely at
least once. A dataset that runs out before the others starts again from its first row (it is
repeated, i.e. upsampled), so the proportions hold over the whole mixture, and no dataset is cut
short. The mixture is one epoch; the train loader then reshuffles it every epoch.

A sample is a tokenized row: a pretrain block, an SFT sample (or, with packing, a packed row), or a
DPO pair. A dataset with ratio 0 is left out of training (its eval/test splits still count). When
using a big dataset completely at a tiny ratio would make the mixture more than `MAX_GROWTH` times
the data, that is a ConfigError: raise its ratio or cap it with `max_samples`.

With a streaming entry (`mix_streams`) nothing has a length: the same ratios become per-sample draw
probabilities inside the loader (`streaming.SampleStream`), every entry restarting when it ends, and a
cached entry joins as an IterableDataset of its rows; the run then never holds the mixture on disk.
"""

from __future__ import annotations

import logging

import datasets

from ironcore.data.streaming import Entry, StreamMix, check_first_row
from ironcore.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

MAX_GROWTH = 50
CACHED_SHARDS = 24  # a cached part mixed into streams: divisible by 1, 2, 3, 4, 6, 8, 12, 24 ranks x workers


def check_ratios(ratios: list[float]) -> None:
    """ConfigError unless some dataset has a ratio > 0; `prepare_data` calls it before tokenizing anything."""
    if not any(r > 0 for r in ratios):
        raise ConfigError("data.train_datasets: every ratio is 0; give at least one dataset a ratio > 0")


def mix(parts: list[datasets.Dataset], ratios: list[float], names: list[str], *, seed: int) -> datasets.Dataset:
    """One training dataset drawing from `parts` in proportion to `ratios`, reproducible for a seed."""
    check_ratios(ratios)
    for name, part, ratio in zip(names, parts, ratios, strict=True):
        if ratio > 0 and len(part) == 0:
            raise DataError(f"train dataset '{name}' has no training rows, but its ratio is {ratio}")
    keep = [i for i, r in enumerate(ratios) if r > 0]
    for i in set(range(len(parts))) - set(keep):
        logger.info("train dataset '%s' has ratio 0 and is not trained on", names[i])
    if len(keep) == 1:
        return parts[keep[0]]
    total = sum(ratios[i] for i in keep)
    probabilities = [ratios[i] / total for i in keep]
    _check_growth([parts[i] for i in keep], probabilities, [names[i] for i in keep])
    mixed = datasets.interleave_datasets(
        [parts[i] for i in keep], probabilities=probabilities, seed=seed, stopping_strategy="all_exhausted"
    )
    shares = ", ".join(f"{names[i]} {p:.1%}" for i, p in zip(keep, probabilities, strict=True))
    logger.info("Mixed %s into %d training rows", shares, len(mixed))
    return mixed


def _check_growth(parts: list[datasets.Dataset], probabilities: list[float], names: list[str]) -> None:
    rows = sum(len(p) for p in parts)
    expected = max(len(p) / q for p, q in zip(parts, probabilities, strict=True))
    if expected > MAX_GROWTH * rows:
        worst = max(range(len(parts)), key=lambda i: len(parts[i]) / probabilities[i])
        raise ConfigError(
            f"train dataset '{names[worst]}' ({len(parts[worst])} rows at {probabilities[worst]:.2%}) would need a mixture "
            f"of about {expected:,.0f} rows to be used once; raise its ratio or set its max_samples"
        )


def mix_streams(parts: list, ratios: list[float], names: list[str], *, seed: int, task: str) -> StreamMix:
    """The streaming mixture: each sample drawn from part i with probability ratio_i (normalised); a cached part
    (a `datasets.Dataset`) joins as an IterableDataset of its rows, in file order, as many shards as it has rows
    up to `CACHED_SHARDS` so any rank x worker layout that divides it reads disjoint rows."""
    check_ratios(ratios)
    keep = [i for i, r in enumerate(ratios) if r > 0]
    for i in set(range(len(parts))) - set(keep):
        logger.info("train dataset '%s' has ratio 0 and is not trained on", names[i])
    entries = []
    for i in keep:
        part = parts[i]
        if isinstance(part, datasets.Dataset):
            if len(part) == 0:
                raise DataError(f"train dataset '{names[i]}' has no training rows, but its ratio is {ratios[i]}")
            rows = part.to_iterable_dataset(num_shards=min(CACHED_SHARDS, len(part)))
            part = Entry(name=names[i], label=f"train dataset '{names[i]}'", spec=None, rows=rows, encode=None)
        else:
            check_first_row(part, task)
        entries.append(part)
    total = sum(ratios[i] for i in keep)
    probabilities = [ratios[i] / total for i in keep]
    logger.info("Streaming mixture: %s", ", ".join(f"{names[i]} {p:.1%}" for i, p in zip(keep, probabilities, strict=True)))
    return StreamMix(entries=entries, probabilities=probabilities, seed=seed)
