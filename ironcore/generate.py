"""Text generation from an exported model directory (IronCore, GPT-2 or LLaMA format)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

import ironcore.models  # noqa: F401  (registers model_type "ironcore" with the Auto classes)
from ironcore.errors import CheckpointError, ConfigError
from ironcore.export import load_model_dir_tokenizer
from ironcore.models.conversion import check_model_dir


def generate(model_dir: str | Path, prompts: list[str], *, max_new_tokens: int = 64, greedy: bool = False,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             repetition_penalty: float | None = None, seed: int = 0) -> list[str]:
    """Complete each prompt with the export's generation_config (an IronCore export samples; see
    export.SAMPLING_DEFAULTS), the given sampling settings on top, or greedily. Returns prompt + completion texts.

    The directory is checked first (config, weight files, tokenizer), so a broken one is one error line.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: not a model directory (no config.json); pass a run's export/ directory")
    check_model_dir(model_dir)
    tokenizer = load_model_dir_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    settings = decoding(model.generation_config, greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k,
                        repetition_penalty=repetition_penalty)
    settings.max_new_tokens = max_new_tokens  # in the config: transformers deprecates settings passed beside it
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
            output = model.generate(**inputs, generation_config=settings)
        texts.append(tokenizer.decode(output[0], skip_special_tokens=True))
    return texts


def decoding(base: GenerationConfig, *, greedy: bool, temperature: float | None, top_p: float | None,
             top_k: int | None, repetition_penalty: float | None) -> GenerationConfig:
    """`base` (the export's generation_config) with the caller's settings on top. Any sampling setting turns sampling
    on; `greedy` turns it off (the repetition penalty still applies), and contradicting it is refused."""
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    given = {name: value for name, value in sampling.items() if value is not None}
    if greedy and given:
        raise ConfigError(f"--greedy with --{'/--'.join(n.replace('_', '-') for n in given)}: greedy decoding does "
                          "not sample; pass one or the other")
    if temperature is not None and temperature <= 0:
        raise ConfigError(f"--temperature {temperature}: must be > 0 (use --greedy for greedy decoding)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p {top_p}: must be in (0, 1]")
    if top_k is not None and top_k < 0:
        raise ConfigError(f"--top-k {top_k}: must be >= 0 (0 turns top-k filtering off)")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise ConfigError(f"--repetition-penalty {repetition_penalty}: must be > 0 (1.0 is no penalty)")
    settings = copy.deepcopy(base)
    if greedy:
        settings.do_sample = False
        settings.temperature = settings.top_p = settings.top_k = None
    elif given:
        settings.do_sample = True
    for name, value in {**given, "repetition_penalty": repetition_penalty}.items():
        if value is not None:
            setattr(settings, name, value)
    return settings
