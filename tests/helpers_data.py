"""Shared pieces of the data tests: tiny tokenizers trained in the test session, run configs, data files.

Test modules import the fixture functions (`from helpers_data import default_tok_dir_fixture, ...`); pytest
registers them under the names given by `name=` (`default_tok_dir`, ...).

Two tokenizers (vocab 768, trained from a slice of the built-in corpus in about 0.1 s each):
- `default_tok`: IronCore's tokenizer layout with the default ChatML-like template (`{% generation %}` path);
- `own_tok`: brings its own template (no generation blocks, `<|end|>` ends turns, BOS first), like a hub
  chat model, so the span path is exercised.
A third, `llama_tok_dir`, is laid out like a LLaMA checkpoint's tokenizer (`LlamaTokenizer` class,
SentencePiece-style BPE, `<s>` added before every text, `</s>` as EOS, no chat template).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import pytest
from tokenizers import SentencePieceBPETokenizer
from transformers import AutoTokenizer, LlamaTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ironcore.config.resolve import resolve  # noqa: E402
from ironcore.config.schema import DataConfig, DatasetSpec, InitConfig, ModelConfig, RunConfig, TrainerConfig  # noqa: E402
from ironcore.data.builtin_corpus import pretrain_texts  # noqa: E402
from ironcore.data.tokenizer import train_tokenizer  # noqa: E402

datasets.disable_progress_bars()

VOCAB = 768
SEQ = 64
OWN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
OWN_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CONVERSATION = [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "What is x?"},
    {"role": "assistant", "content": "It is y."},
    {"role": "user", "content": "And z?"},
    {"role": "assistant", "content": " Z is\n z."},
]


def corpus() -> list[str]:
    return pretrain_texts()[:60]


@pytest.fixture(scope="session", name="default_tok_dir")
def default_tok_dir_fixture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok_default")
    train_tokenizer(corpus(), path, vocab_size=VOCAB)
    return path


@pytest.fixture(scope="session", name="own_tok_dir")
def own_tok_dir_fixture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok_own")
    train_tokenizer(corpus(), path, vocab_size=VOCAB, extra_special_tokens=OWN_SPECIALS, chat_template=OWN_TEMPLATE)
    return path


@pytest.fixture(scope="session", name="llama_tok_dir")
def llama_tok_dir_fixture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok_llama")
    bpe = SentencePieceBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    model = json.loads(bpe.to_str())["model"]
    LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], add_bos_token=True).save_pretrained(
        str(path))
    return path


@pytest.fixture(name="default_tok")
def default_tok_fixture(default_tok_dir):
    return AutoTokenizer.from_pretrained(str(default_tok_dir))


@pytest.fixture(name="own_tok")
def own_tok_fixture(own_tok_dir):
    return AutoTokenizer.from_pretrained(str(own_tok_dir))


def make_run(tmp_path: Path, task: str, specs, tok_dir: Path | str, *, seq_length: int = SEQ, micro_batch_size: int = 4,
             seed: int = 1337, loader_workers: int = 0, world_size: int = 1, **data) -> RunConfig:
    """A RunConfig for data tests resolved for `world_size` processes: tiny model context, cache under tmp_path;
    `loader_workers` are DataLoader workers."""
    data.setdefault("vocab_size", 1024)
    data.setdefault("cache_dir", str(tmp_path / "cache"))
    data.setdefault("splits", (1.0, 0.0, 0.0))
    return resolve(RunConfig(
        model=ModelConfig(max_seq_len=SEQ, tokenizer_type="auto", vocab_name_or_path=str(tok_dir)),
        data=DataConfig(task_type=task, seq_length=seq_length, train_datasets=tuple(specs), **data),
        trainer=TrainerConfig(micro_batch_size=micro_batch_size, num_workers=loader_workers),
        init=InitConfig(seed=seed),
    ), world_size=world_size)


def spec(path, **kw) -> DatasetSpec:
    return DatasetSpec(dataset_path=str(path), **kw)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n: int, *, offset: int = 0) -> list[dict]:
    """n two-turn conversations with distinct, short contents."""
    return [
        {"messages": [
            {"role": "user", "content": f"question {i + offset}?"},
            {"role": "assistant", "content": f"answer {i + offset} is {(i + offset) * 7}."},
        ]}
        for i in range(n)
    ]


def text_rows(n: int, *, words: int = 30, tag: str = "doc") -> list[dict]:
    return [{"text": " ".join(f"{tag}{i} word{j}" for j in range(words))} for i in range(n)]


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The contiguous runs of trained token ids."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def slow_preprocess(tmp: str, tok_dir: str, data_file: str, signal_file: str) -> None:
    """Child of the kill test: start a pretrain build whose tokenization announces itself, then hangs."""
    import time

    from ironcore.data import load_tokenizer, prepare_data, pretrain

    original = pretrain._encode

    def hanging(texts, **kw):
        out = original(texts, **kw)
        Path(signal_file).write_text("tokenizing")
        time.sleep(600)
        return out

    pretrain._encode = hanging
    run = make_run(Path(tmp), "pretrain", [spec(data_file)], tok_dir)
    prepare_data(run, load_tokenizer(run))


if __name__ == "__main__":
    slow_preprocess(*sys.argv[1:])
