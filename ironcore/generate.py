"""Text generation from an exported model directory (IronCore, GPT-2 or LLaMA format)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import ironcore.models  # noqa: F401  (registers model_type "ironcore" with the Auto classes)
from ironcore.errors import CheckpointError, ConfigError
from ironcore.export import load_model_dir_tokenizer
from ironcore.models.conversion import check_model_dir


def generate(model_dir: str | Path, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0) -> list[str]:
    """Complete each prompt; greedy when temperature is 0. Returns prompt + completion texts.

    The directory is checked first (config, weight files, tokenizer), so a broken one is one error line.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: not a model directory (no config.json); pass a run's export/ directory")
    check_model_dir(model_dir)
    tokenizer = load_model_dir_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    context = model.config.max_position_embeddings
    texts = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        length = inputs["input_ids"].shape[1]
        if length + max_new_tokens > context:
            raise ConfigError(
                f"--max-new-tokens {max_new_tokens}: the prompt {prompt[:40]!r} is {length} tokens, and {length} + "
                f"{max_new_tokens} exceeds the model's context of {context} positions; ask for at most "
                f"{max(context - length, 0)} new tokens"
            )
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                    temperature=temperature if temperature > 0 else None)
        texts.append(tokenizer.decode(output[0], skip_special_tokens=True))
    return texts
