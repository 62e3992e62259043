"""Tokenizers: load one (hub name, local directory or the built-in one), train a byte-level BPE, hash one.

`tokenizer_type` `gpt2`, `llama` and `auto` all load through `AutoTokenizer` (the files decide the
class); `builtin` (or `vocab_name_or_path: builtin`) is a byte-level BPE trained from the built-in
corpus on first use and cached under `<cache root>/tokenizers`, so it costs about a second once.

Chat template: `data.chat_template` if set, else the tokenizer's own, else `DEFAULT_CHAT_TEMPLATE`, a
ChatML-like template in which every turn is `<|im_start|>{role}\\n{content}{eos_token}\\n`. Ending
turns with the EOS token means any tokenizer can use it (EOS is always one token) and a fine-tuned
model stops generating by itself after its answer. Tokenizers trained here carry `<|im_start|>` as a
special token, so the turn header is a single token for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ironcore.config.schema import DataConfig, RunConfig
from ironcore.data import builtin_corpus
from ironcore.data.cache import build_atomically
from ironcore.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

TOKENIZER_TYPES = ("gpt2", "llama", "auto", "builtin")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TURN_TOKEN = "<|im_start|>"
BUILTIN_VOCAB_SIZE = 2048
BUILTIN_VERSION = 1

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + eos_token -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""ChatML-like: `<|im_start|>{role}\\n{content}{eos}\\n` per turn; the `{% generation %}` block marks the
assistant content and its EOS, which are the tokens SFT trains."""


def cache_root(data: DataConfig) -> Path:
    """`data.cache_dir`, else `$IRONCORE_CACHE`, else `$XDG_CACHE_HOME/ironcore` (default `~/.cache/ironcore`)."""
    if data.cache_dir:
        return Path(data.cache_dir).expanduser()
    if os.environ.get("IRONCORE_CACHE"):
        return Path(os.environ["IRONCORE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ironcore"


def tokenizer_source(run: RunConfig) -> tuple[str, str, str]:
    """(tokenizer_type, vocab_name_or_path, field name to blame) of the resolved run: config resolution puts
    the winner (a data config's tokenizer wins over the model's) in the model group and records where it came from."""
    return run.model.tokenizer_type, run.model.vocab_name_or_path, run.derived.tokenizer_field


def load_tokenizer(run: RunConfig) -> PreTrainedTokenizerBase:
    """The run's tokenizer with its effective chat template, checked against `data.vocab_size`."""
    kind, name, field = tokenizer_source(run)
    if kind not in TOKENIZER_TYPES:
        raise ConfigError(f"model.tokenizer_type '{kind}' is not one of {', '.join(TOKENIZER_TYPES)}")
    if kind == "builtin" or name == "builtin":
        tokenizer = AutoTokenizer.from_pretrained(str(builtin_tokenizer_dir(cache_root(run.data))))
    else:
        tokenizer = load_pretrained_tokenizer(name, field)
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer '{name}' ({field}) has no eos_token; IronCore separates documents and ends turns with it")
    if run.data.chat_template:
        tokenizer.chat_template = _read_template(run.data.chat_template)
    elif not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    check_vocab_size(run.data.vocab_size, tokenizer, name, field)
    return tokenizer


def _read_template(value: str) -> str:
    """`data.chat_template` is either the Jinja text or a path to a `.jinja` file."""
    if value.endswith(".jinja") and "{" not in value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.chat_template: file {path} does not exist")
        return path.read_text()
    return value


def load_pretrained_tokenizer(name: str, field: str = "model.vocab_name_or_path") -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained` with one-line errors for a missing path or an unreachable Hub."""
    looks_local = name.startswith(("/", "./", "../", "~"))
    path = Path(name).expanduser()
    if looks_local and not path.exists():
        raise DataError(f"tokenizer directory {path} ({field}) does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.is_dir() else name)
    except (OSError, ValueError) as err:
        if path.is_dir():
            raise DataError(
                f"{path} ({field}) holds no loadable tokenizer (tokenizer.json / tokenizer_config.json): {_first_line(err)}"
            ) from None
        if _offline() or "connect" in str(err).lower():
            raise DataError(
                f"tokenizer '{name}' ({field}) is not a local directory and IronCore cannot reach the Hub; give a local path"
            ) from None
        raise DataError(f"tokenizer '{name}' ({field}) could not be loaded: {_first_line(err)}") from None


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def check_vocab_size(vocab_size: int, tokenizer: PreTrainedTokenizerBase, name: str, field: str) -> None:
    """The model's vocabulary must hold every token id the tokenizer can produce; checked as soon as the tokenizer
    is loaded, before any tokenization, naming both fields that disagree."""
    if vocab_size < len(tokenizer):
        raise ConfigError(
            f"data.vocab_size {vocab_size} is smaller than the tokenizer's vocabulary ({len(tokenizer)} tokens of "
            f"'{name}', {field}); set data.vocab_size >= {len(tokenizer)} or choose a smaller tokenizer"
        )


def builtin_tokenizer_dir(root: Path) -> Path:
    """The built-in tokenizer's directory under `root/tokenizers`, trained from the built-in corpus if missing."""
    py = "".join(sys.version.split(".")[:2])
    final = root / "tokenizers" / f"builtin-v{BUILTIN_VERSION}-py{py}-{BUILTIN_VOCAB_SIZE}"

    def build(tmp: Path) -> dict:
        logger.info("Training the built-in tokenizer (vocab %d) into %s", BUILTIN_VOCAB_SIZE, final)
        train_tokenizer(builtin_corpus.pretrain_texts(), tmp, vocab_size=BUILTIN_VOCAB_SIZE)
        return {"vocab_size": BUILTIN_VOCAB_SIZE, **builtin_corpus.corpus_fingerprint()}

    build_atomically(final, build)
    return final


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    *,
    vocab_size: int,
    min_frequency: int = 2,
    extra_special_tokens: tuple[str, ...] = (),
    chat_template: str = DEFAULT_CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style, lossless on any text) and save it for `AutoTokenizer`.

    Special tokens: `<|endoftext|>` (eos and bos; nothing is added automatically, as in GPT-2),
    `<|pad|>`, `<|im_start|>` (turn header of the chat template), plus `extra_special_tokens`.
    """
    specials = [EOS_TOKEN, PAD_TOKEN, TURN_TOKEN, *extra_special_tokens]
    if vocab_size < 256 + len(specials):
        raise ConfigError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least {256 + len(specials)}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[TURN_TOKEN, *extra_special_tokens],
        chat_template=chat_template,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything in the tokenizer that changes token ids: its files' content, specials, template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            for path in sorted(Path(tmp).iterdir()):
                digest.update(path.name.encode() + path.read_bytes())
    meta = {
        "class": type(tokenizer).__name__,
        "specials": tokenizer.special_tokens_map,
        "template": tokenizer.chat_template,
        "len": len(tokenizer),
    }
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return digest.hexdigest()
