"""Text samples during training (`operation.sample_prompts`): the model completes fixed prompts every eval_interval,
so a run shows what it has learned, not only a loss. Appended to `<run dir>/samples_text.jsonl` and the trackers.

Generation samples with the export's decoding (export.SAMPLING_DEFAULTS, or a pretrained checkpoint's own
generation_config) under a forked RNG with a seed of its own, so a run with samples trains bitwise like one without.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ironcore.errors import ConfigError
from ironcore.export import export_generation_config

SAMPLES_TEXT_FILE = "samples_text.jsonl"
MAX_NEW_TOKENS = 64  # as `ironcore generate`'s default; fewer when the prompt leaves less of the context


def read_prompts(spec: tuple[str, ...] | str | None) -> list[str]:
    """The prompts `operation.sample_prompts` names: the list itself, or a file's non-blank lines."""
    if spec is None:
        return []
    if isinstance(spec, str):
        path = Path(spec)
        try:
            prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except FileNotFoundError:
            raise ConfigError(f"operation.sample_prompts: prompts file {path} not found (one prompt per line)") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"operation.sample_prompts: prompts file {path} does not read ({err})") from None
        if not prompts:
            raise ConfigError(f"operation.sample_prompts: prompts file {path} holds no prompt (one per line)")
        return prompts
    blank = [i for i, prompt in enumerate(spec) if not prompt.strip()]
    if blank or not spec:
        where = f"[{blank[0]}] is blank" if blank else " is an empty list"
        raise ConfigError(f"operation.sample_prompts{where}; give prompt texts, a file, or null")
    return list(spec)


class Sampler:
    """Completes the run's prompts on the (unwrapped, unsharded) training model. Main process only."""

    def __init__(self, prompts: list[str], tokenizer: PreTrainedTokenizerBase, out: Path, seed: int):
        self.prompts, self.tokenizer, self.path, self.seed = prompts, tokenizer, out / SAMPLES_TEXT_FILE, seed

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, step: int) -> list[dict]:
        """One row {"step", "prompt", "text"} per prompt, appended to samples_text.jsonl. `model` is left in eval
        mode (the next train step sets train mode again)."""
        device = next(model.parameters()).device
        settings = export_generation_config(model.generation_config, self.tokenizer)
        # the vocabulary padding rows are no tokens: never sample them
        settings.suppress_tokens = list(range(len(self.tokenizer), model.config.vocab_size)) or None
        context = model.config.max_position_embeddings
        model.eval()
        rows = []
        forked = [] if device.type == "cpu" else [device.index or 0]
        with torch.random.fork_rng(devices=forked, device_type=device.type):
            torch.manual_seed(self.seed + step)
            for prompt in self.prompts:
                ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"][:, -(context - 1):].to(device)
                settings.max_new_tokens = min(MAX_NEW_TOKENS, context - ids.shape[1])  # a long prompt keeps its end
                output = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=settings)
                rows.append({"step": step, "prompt": prompt,
                             "text": self.tokenizer.decode(output[0], skip_special_tokens=True)})
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        return rows
