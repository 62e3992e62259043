"""A corpus that ships with every Python install, so quickstarts for all three tasks run with no network.

Two sources, both read without importing anything they describe:
- `pydoc_data.topics`: the language reference topics that `help()` shows (about 465k characters);
- docstrings of the public standard-library modules, read from their source files with `ast`.

From them we derive:
- pretrain texts: one document per reference topic and one per module (its docstring, then every
  documented function and class with its signature and docstring);
- SFT conversations: a question about a function, class or topic, answered by its documentation;
  every fourth one has a system message and every fifth a second user/assistant turn;
- DPO pairs: the same question, its own documentation as the chosen answer and that documentation
  with the words of each line shuffled as the rejected one. (Another entry's documentation, the first
  design, is not learnable as a preference here: every text is chosen in one pair and rejected in another,
  so a small model learns which texts to score up or down, and held-out pairs come out below chance.)

The corpus depends only on the Python version (`corpus_fingerprint`), and everything is derived in a
fixed order, so it is identical on every machine with the same Python.
"""

from __future__ import annotations

import ast
import random
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import datasets

from ironcore.errors import DataError

CORPUS_VERSION = 2
KINDS = ("pretrain", "sft", "dpo")
SYSTEM_PROMPT = "You are a concise assistant that explains the Python standard library."
_PACKAGES = ("json", "collections", "logging", "email", "http", "urllib", "importlib", "concurrent/futures")
_MAX_ANSWER_CHARS = 600
_MIN_DOC_CHARS = 20


@dataclass(frozen=True)
class DocEntry:
    """One documented function or class of a standard-library module."""

    module: str
    qualname: str
    kind: str  # "function" | "class"
    signature: str
    doc: str


def corpus_fingerprint() -> dict:
    return {"corpus_version": CORPUS_VERSION, "python": sys.version.split()[0]}


def _stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [(p.stem, p) for p in sorted(root.glob("*.py")) if not p.stem.startswith("_") and p.stem != "this"]
    for package in _PACKAGES:
        for p in sorted((root / package).glob("*.py")):
            stem = package.replace("/", ".") + ("" if p.stem == "__init__" else "." + p.stem)
            if not p.stem.startswith("_") or p.stem == "__init__":
                files.append((stem, p))
    return files


def _entries(module: str, tree: ast.Module) -> list[DocEntry]:
    out = []

    def visit(nodes: list[ast.stmt], prefix: str) -> None:
        for node in nodes:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node) or ""
            name = prefix + node.name
            is_class = isinstance(node, ast.ClassDef)
            signature = "" if is_class else ast.unparse(node.args)
            if len(doc) >= _MIN_DOC_CHARS:
                out.append(DocEntry(module, name, "class" if is_class else "function", signature, doc))
            if is_class:
                visit(node.body, name + ".")

    visit(tree.body, "")
    return out


@lru_cache(maxsize=1)
def _read_stdlib() -> tuple[tuple[tuple[str, str], ...], tuple[DocEntry, ...]]:
    """(module, module docstring) pairs and the documented entries, in a fixed order."""
    modules, entries = [], []
    for module, path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        modules.append((module, ast.get_docstring(tree) or ""))
        entries.extend(_entries(module, tree))
    return tuple(modules), tuple(entries)


@lru_cache(maxsize=1)
def _topics() -> tuple[tuple[str, str], ...]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return ()
    return tuple(sorted(topics.items()))


def _short(doc: str) -> str:
    """The leading paragraphs of a docstring, at most about _MAX_ANSWER_CHARS characters."""
    paragraphs = [p.strip() for p in doc.strip().split("\n\n") if p.strip()]
    out = paragraphs[0][: _MAX_ANSWER_CHARS * 2]
    for p in paragraphs[1:]:
        if len(out) + len(p) > _MAX_ANSWER_CHARS:
            break
        out += "\n\n" + p
    return out


def pretrain_texts() -> list[str]:
    """One document per reference topic and one per module."""
    modules, entries = _read_stdlib()
    by_module: dict[str, list[DocEntry]] = {}
    for e in entries:
        by_module.setdefault(e.module, []).append(e)
    texts = [text for _, text in _topics()]
    for module, doc in modules:
        parts = [f"Module {module}\n\n{doc}".rstrip()]
        for e in by_module.get(module, []):
            head = f"class {e.qualname}" if e.kind == "class" else f"def {e.qualname}({e.signature})"
            parts.append(f"{head}\n{e.doc}")
        if len(parts) > 1 or doc:
            texts.append("\n\n".join(parts) + "\n")
    if not texts:
        raise DataError("the built-in corpus is empty: this Python has neither pydoc_data nor standard-library sources")
    return texts


def _question(e: DocEntry, i: int) -> str:
    name = f"{e.module}.{e.qualname}"
    if e.kind == "class":
        return (f"What is the class `{name}` for?", f"Explain the Python class `{name}`.")[i % 2]
    return (
        f"What does `{name}` do?",
        f"Explain the Python function `{name}({e.signature})`.",
        f"I'm reading code that calls `{name}`. What is it for?",
    )[i % 3]


def _qa_pairs() -> list[tuple[str, str, DocEntry | None]]:
    _, entries = _read_stdlib()
    pairs = [(_question(e, i), _short(e.doc), e) for i, e in enumerate(entries)]
    pairs += [(f"Explain the Python topic '{t}'.", _short(text), None) for t, text in _topics() if text.strip()]
    return pairs


def sft_conversations() -> list[list[dict[str, str]]]:
    conversations = []
    for i, (question, answer, entry) in enumerate(_qa_pairs()):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if i % 4 == 0:
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        if i % 5 == 0 and entry is not None:
            messages += [
                {"role": "user", "content": "Which module defines it?"},
                {"role": "assistant", "content": f"`{entry.qualname}` is defined in the `{entry.module}` module."},
            ]
        conversations.append(messages)
    return conversations


def _scrambled(text: str, rng: random.Random) -> str:
    """The words of each line in a shuffled order: the same tokens, no longer well-formed text."""
    lines = []
    for line in text.split("\n"):
        words = line.split(" ")
        rng.shuffle(words)
        lines.append(" ".join(words))
    return "\n".join(lines)


def dpo_pairs() -> list[dict[str, str]]:
    """Question, its own documentation (chosen), the same documentation with scrambled word order (rejected).

    A preference a small model can learn and carry to held-out pairs: well-formed over scrambled text.
    Answers that shuffling leaves unchanged (one word per line) get their words rotated, or a lone word spelled
    backwards.
    """
    rng = random.Random(CORPUS_VERSION)
    rows = []
    for question, answer, _ in _qa_pairs():
        rejected = _scrambled(answer, rng)
        for _ in range(3):
            if rejected != answer:
                break
            rejected = _scrambled(answer, rng)
        if rejected == answer:
            words = answer.split()
            rejected = " ".join(words[1:] + words[:1]) if len(set(words)) > 1 else answer[::-1]
        rows.append({"prompt": question, "chosen": answer, "rejected": rejected})
    return rows


def builtin_dataset(kind: str) -> datasets.Dataset:
    """The corpus as a `datasets.Dataset`: `text` (pretrain), `messages` (sft), `prompt/chosen/rejected` (dpo)."""
    if kind == "pretrain":
        return datasets.Dataset.from_dict({"text": pretrain_texts()})
    if kind == "sft":
        return datasets.Dataset.from_dict({"messages": sft_conversations()})
    if kind == "dpo":
        return datasets.Dataset.from_list(dpo_pairs())
    raise DataError(f"unknown built-in dataset 'builtin:{kind}'; choose one of {', '.join('builtin:' + k for k in KINDS)}")
