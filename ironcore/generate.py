"""Text generation from an exported model directory (IronCore, GPT-2 or LLaMA format)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ironcore.models  # noqa: F401  (registers model_type "ironcore" with the Auto classes)
from ironcore.errors import CheckpointError


def generate(model_dir: str | Path, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0) -> list[str]:
    """Complete each prompt; greedy when temperature is 0. Returns prompt + completion texts."""
    if not (Path(model_dir) / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: not a model directory (no config.json); pass a run's export/ directory")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    texts = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                    temperature=temperature if temperature > 0 else None)
        texts.append(tokenizer.decode(output[0], skip_special_tokens=True))
    return texts
