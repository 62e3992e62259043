"""The run configuration: `load_config(path, overrides)` -> a frozen, validated `RunConfig`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .build import build
from .load import load_raw
from .resolve import resolve
from .schema import GROUPS, DatasetSpec, RunConfig

__all__ = ["GROUPS", "DatasetSpec", "RunConfig", "config_from_dict", "config_to_dict", "derived_to_dict",
           "load_config"]


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), *, world_size: int | None = None
) -> RunConfig:
    """Read, merge, type-check and resolve a run config. `world_size` defaults to the launch environment's."""
    return config_from_dict(load_raw(path, overrides), world_size=world_size)


def config_from_dict(raw: dict[str, Any], *, world_size: int | None = None) -> RunConfig:
    """Type-check a nested `{group: {field: value}}` mapping and resolve it (used for saved run configs too)."""
    return resolve(build(RunConfig, raw, ""), world_size, given=raw)


def config_to_dict(run: RunConfig) -> dict[str, Any]:
    """Every group and field, defaults included, as plain YAML/JSON-able values (what a run saves and reloads)."""
    return {name: _plain(dataclasses.asdict(getattr(run, name))) for name in GROUPS}


def derived_to_dict(run: RunConfig) -> dict[str, Any]:
    """The resolved run's derived values (`RunConfig.derived`), for `ironcore config`."""
    return dataclasses.asdict(run.derived)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
