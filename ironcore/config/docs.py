"""Generate the field tables of `configs/README.md` from the schema, so the docs cannot drift.

`python -m ironcore.config.docs` rewrites the generated section in place; a test fails when the
committed file differs from what this renders.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from .build import field_types
from .schema import GROUPS, DatasetSpec, PositionalEmbeddingConfig

BEGIN = "<!-- BEGIN GENERATED FIELD TABLES: python -m ironcore.config.docs -->"
END = "<!-- END GENERATED FIELD TABLES -->"
README = Path(__file__).resolve().parents[2] / "configs" / "README.md"


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is tuple:
        return f"list of {type_name(args[0])}"
    if origin in (typing.Union, types.UnionType):  # every member, null last
        members = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(members + (["null"] if type(None) in args else []))
    return getattr(tp, "__name__", str(tp))


def default_text(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        return "(group)" if dataclasses.is_dataclass(value) else f"`{list(value)}`"
    value = field.default
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str):
        return f'`"{value}"`'
    return "`null`" if value is None else f"`{value}`"


def table(cls: type, title: str) -> list[str]:
    hints = field_types(cls)
    rows = [f"### {title}", "", (cls.__doc__ or "").strip(), "",
            "| Name | Type | Default | Description |", "|------|------|---------|-------------|"]
    for field in dataclasses.fields(cls):
        meta = field.metadata
        bounds = ", ".join(f"{sym} {meta[k]}" for k, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                           if meta.get(k) is not None)
        help_text = meta.get("help", "") + (f" ({bounds})" if bounds else "")
        name = f"`{field.name}`" + (" *(added)*" if meta.get("added") else "")
        rows.append(f"| {name} | {type_name(hints[field.name])} | {default_text(field)} | {help_text} |")
    return rows + [""]


def render() -> str:
    lines = [BEGIN, ""]
    for group, cls in GROUPS.items():
        lines += table(cls, group)
        if group == "model":
            lines += table(PositionalEmbeddingConfig, "model.positional_embedding")
        if group == "data":
            lines += table(DatasetSpec, "data.train_datasets / eval_datasets / test_datasets entries")
    return "\n".join(lines + [END])


def updated(text: str) -> str:
    """`text` with its generated section replaced by the current rendering."""
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + render() + tail


def main() -> None:
    README.write_text(updated(README.read_text()))
    sys.stdout.write(f"wrote {README}\n")


if __name__ == "__main__":
    main()
