"""`ironcore preprocess CONFIG --inspect --preview N` through the real CLI entry point."""

from __future__ import annotations

import yaml
from helpers_data import (  # noqa: F401
    chat_rows,
    default_tok_dir_fixture,
    default_tok_fixture,
    own_tok_dir_fixture,
    own_tok_fixture,
    write_jsonl,
)

from ironcore.cli import main


def write_config(tmp_path, tok_dir, data_file, **data) -> str:
    config = {
        "model": {"max_seq_len": 64, "vocab_name_or_path": str(tok_dir), "tokenizer_type": "auto"},
        "trainer": {"micro_batch_size": 2, "num_workers": 0},
        "data": {"task_type": "sft", "vocab_size": 1024, "cache_dir": str(tmp_path / "cache"), "splits": [0.8, 0.2, 0.0],
                 "train_datasets": [{"name": "chat", "dataset_path": str(data_file)}], **data},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_preprocess_inspect_and_preview(tmp_path, default_tok_dir, capsys):
    rows = chat_rows(20) + [{"messages": [{"role": "user", "content": "alone"}]}]
    config = write_config(tmp_path, default_tok_dir, write_jsonl(tmp_path / "c.jsonl", rows))
    assert main(["preprocess", config, "data.pack_sequences=true", "--inspect", "--preview", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sft: ") and "train rows" in out
    header = next(line for line in out.splitlines() if line.startswith("dataset"))
    assert header.split() == ["dataset", "split", "rows", "skipped", "tokens", "trained", "trained%", "mean", "len",
                              "max", "len", "fill%"]
    chat_train = next(line.split() for line in out.splitlines() if line.startswith("chat ") and " train " in line)
    assert chat_train[3] == "1"
    assert "chat: 21 input rows; ok 20, no_assistant 1" in out
    assert out.count("===== train row") == 2
    assert "⟦answer" in out and "<|endoftext|>⟧" in out and "─── next packed sample ───" in out


def test_preprocess_bad_input_is_one_line_exit_2(tmp_path, default_tok_dir, capsys):
    config = write_config(tmp_path, default_tok_dir, write_jsonl(tmp_path / "c.jsonl", [{"text": "no chats"}]))
    assert main(["preprocess", config]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.train_datasets[0] 'chat': no column 'messages'") and "\n" not in err
