"""Hugging Face exports: the trained model as an IronCore, GPT-2, LLaMA, Mistral or Qwen2 directory, or in the
architecture of the checkpoint a run was fine-tuned from (`source`), plus its tokenizer.

An export is what `AutoModelForCausalLM.from_pretrained(dir)` and `pipeline("text-generation")` load:
safetensors weights, config.json, generation_config.json and the tokenizer files.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from accelerate import Accelerator
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from ironcore.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from ironcore.config import RunConfig

logger = logging.getLogger(__name__)

Arch = Literal["ironcore", "gpt2", "llama", "mistral", "qwen2", "source"]
# What `save_pretrained` of a tokenizer always writes; without either, AutoTokenizer would guess from config.json
# (and, for a remote-code model, stop to ask on stdin whether to run it).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def save_hf(accelerator: Accelerator, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Gather the full weights (collective under FSDP / ZeRO-3) and write an IronCore HF directory on rank 0.

    The gathered state dict is loaded into a CPU copy of the model, so the export never depends on how the
    training module is sharded, and the vocabulary padding rows are dropped.
    """
    from ironcore.models import trim_vocab_padding

    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with torch.device("meta"):
            full = type(unwrapped)(unwrapped.config)
        full.load_state_dict({k: v.detach().cpu() for k, v in state_dict.items()}, assign=True)
        full.tie_weights()
        write_hf(trim_vocab_padding(full.float()), tokenizer, Path(out_dir), unwrapped.generation_config)
    accelerator.wait_for_everyone()


def write_export(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, *, arch: Arch = "ironcore",
                 source_config: dict | None = None) -> Path:
    """Write a loaded `model`, converted to a native architecture when asked (`source`: the one of
    `source_config`, the config.json of the checkpoint it was fine-tuned from), with its tokenizer."""
    from ironcore.models import ironcore_to_gpt2, ironcore_to_llama, ironcore_to_mistral, ironcore_to_qwen2
    from ironcore.models import trim_vocab_padding
    from ironcore.models.conversion import ironcore_to_source

    if arch == "source":
        native = ironcore_to_source(model, source_config)
    else:
        native = {"ironcore": trim_vocab_padding, "gpt2": ironcore_to_gpt2, "llama": ironcore_to_llama,
                  "mistral": ironcore_to_mistral, "qwen2": ironcore_to_qwen2}[arch](model)
    write_hf(native, tokenizer, out_dir, model.generation_config)
    logger.info("Exported %s model to %s", arch, out_dir)
    return out_dir


# The export's default decoding (generation_config.json), what `ironcore generate`, `pipeline` and `model.generate`
# use unless told otherwise: greedy decoding of a small model repeats its most likely token (a run of newlines after
# a few hundred steps), while mild sampling with a repetition penalty reads like the corpus.
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.2}


def export_generation_config(generation: GenerationConfig | None, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """The decoding an export writes (and in-training samples use): a pretrained checkpoint's own
    generation_config, else SAMPLING_DEFAULTS with the tokenizer's special ids."""
    if generation is not None and not generation._from_model_config:
        return copy.deepcopy(generation)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=pad, **SAMPLING_DEFAULTS)


def write_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path,
             generation: GenerationConfig | None = None) -> None:
    """save_pretrained (safetensors) + generation config + tokenizer (with the chat template it trained with).

    `generation` is the one the model was loaded with: a pretrained checkpoint's own generation_config.json is
    kept as its authors wrote it (stop tokens such as Llama 3's `<|eot_id|>`, their sampling defaults). One that
    transformers only derived from the model config (`_from_model_config`, every fresh model's) says nothing,
    so the export gets the tokenizer's ids and SAMPLING_DEFAULTS instead.
    """
    model.generation_config = export_generation_config(generation, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def export_source(src: Path) -> Path:
    """The HF directory behind `ironcore export SRC`: a run dir's `export/`, or an HF model dir itself."""
    for candidate in (src / "export", src):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(
        f"{src}: neither a run directory with export/, a checkpoint directory (checkpoints/step_N) nor a model "
        "directory with config.json"
    )


def is_checkpoint(src: Path) -> bool:
    """Whether `src` is a training checkpoint (`<run_dir>/checkpoints/step_N`): it holds the loop's train state."""
    from ironcore.checkpoint import TRAIN_STATE_FILE

    return (src / TRAIN_STATE_FILE).is_file()


def load_checkpoint_model(ckpt: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of a training checkpoint, for exporting a step other than the final one.

    A checkpoint holds weights and training state but no model config or tokenizer: both come from the resolved
    `config.yaml` of its run directory (two levels up), resolved for the world size it was trained with so the
    export does not depend on the launch environment. The checkpoint must be complete (marker and file sizes, not
    checksums, which would also read the optimizer state). Only a full `model.safetensors` is read: DeepSpeed and
    sharded FSDP checkpoints keep per-rank shards that need their engine to be gathered.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ironcore.checkpoint import verify_checkpoint
    from ironcore.data import load_tokenizer
    from ironcore.models import IronCoreConfig, IronCoreForCausalLM
    from ironcore.models.conversion import load_state, uninitialized

    verify_checkpoint(ckpt, checksums=False)
    config_file, weights = ckpt.parent.parent / "config.yaml", ckpt / "model.safetensors"
    if not config_file.is_file():
        raise CheckpointError(f"{ckpt}: its run directory has no config.yaml to build the model and tokenizer from")
    if not weights.is_file():
        raise CheckpointError(f"{ckpt}: no model.safetensors (a DeepSpeed or sharded FSDP checkpoint); export the "
                              "run directory after training, or a checkpoint saved with full weights")
    run = read_run_config(config_file)
    model = uninitialized(IronCoreForCausalLM, IronCoreConfig.from_run_config(run))
    try:
        state = load_file(weights)
    except SafetensorError as err:
        raise CheckpointError(f"{weights}: not a readable safetensors file, truncated or corrupt ({err})") from None
    load_state(model, state, str(ckpt))
    return model, load_tokenizer(run)


def read_run_config(config_file: Path) -> RunConfig:
    """The RunConfig a run saved as `config.yaml`, resolved for the world size it was trained with; a file that does
    not parse or no longer validates is one CheckpointError naming it."""
    from ironcore.config import config_from_dict
    from ironcore.config.load import read_yaml

    try:
        raw = read_yaml(config_file)
        parallel = raw.get("parallel")
        world_size = parallel.get("world_size") if isinstance(parallel, dict) else None
        if not isinstance(world_size, int) or isinstance(world_size, bool):
            raise ConfigError("parallel.world_size: missing (a run's resolved config.yaml always has it)")
        return config_from_dict(raw, world_size=world_size)
    except ConfigError as err:
        where = "" if str(err).startswith(str(config_file)) else f"{config_file}: "
        raise CheckpointError(f"{where}{err}") from None


def load_model_dir_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved next to a model's weights (an export always holds one), in one error line when missing."""
    from transformers import AutoTokenizer

    missing = [name for name in TOKENIZER_FILES if not (model_dir / name).is_file()]
    if len(missing) == len(TOKENIZER_FILES):
        raise CheckpointError(f"{model_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); an export holds its "
                              "model's tokenizer, copy it back from the run's export/ or tokenizer directory")
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(": ")
        without = f" without {', '.join(missing)}" if missing else ""
        raise CheckpointError(f"{model_dir}: its tokenizer does not load{without} ({reason})") from None


def check_out_dir(out_dir: Path) -> None:
    """`export --out` must be a directory or a path to create one at: refused before anything is loaded or written."""
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                what = "is an existing file" if path == out_dir else f"is under {path}, which is a file"
                raise CheckpointError(f"--out {out_dir}: {what}; give a directory (created if missing)")
            return


def run_config_file(src: Path) -> Path | None:
    """The config.yaml of the run behind `src` (a run directory or one of its checkpoints); None for a model dir."""
    if is_checkpoint(src):
        return src.parent.parent / "config.yaml"
    return src / "config.yaml" if (src / "config.yaml").is_file() else None


def pretrained_source_config(config_file: Path) -> dict | None:
    """The config.json of the checkpoint a run was fine-tuned from (its config.yaml's `init.from_pretrained`),
    None when it started from scratch."""
    from ironcore.config.load import read_yaml
    from ironcore.models.conversion import pretrained_dir

    if not config_file.is_file():
        return None  # a checkpoint without its run's config.yaml: load_checkpoint_model names the problem
    source = (read_yaml(config_file).get("init") or {}).get("from_pretrained")
    if not source:
        return None
    path = pretrained_dir(source) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: the source checkpoint's config.json does not read ({err})") from None


def export(src: Path, out_dir: Path, arch: Arch | None = None, push_to_hub: str | None = None) -> Path:
    """Re-export a finished run, one of its checkpoints, or a model dir of a supported type as `arch`, optionally
    uploading it. `arch` None: `source` for a run fine-tuned from a checkpoint, else `ironcore`. `source` of a plain
    model directory is its own type."""
    from ironcore.models import load_pretrained

    src, out_dir = Path(src), Path(out_dir)
    check_out_dir(out_dir)
    config_file = run_config_file(src)
    source_config = pretrained_source_config(config_file) if config_file and arch in (None, "source") else None
    if arch is None:
        arch = "source" if source_config is not None else "ironcore"
    if is_checkpoint(src):
        model, tokenizer = load_checkpoint_model(src)
    else:
        source = export_source(src)
        model = load_pretrained(source)
        tokenizer = load_model_dir_tokenizer(source)
        if arch == "source" and config_file is None:  # a plain model directory: its own architecture
            source_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    if arch == "source" and source_config is None:
        raise CheckpointError(f"{src}: --arch source needs the run's init.from_pretrained, and this run started "
                              "from scratch; use --arch ironcore, gpt2, llama, mistral or qwen2")
    write_export(model, tokenizer, out_dir, arch=arch, source_config=source_config)
    if push_to_hub:
        push(out_dir, push_to_hub)
    return out_dir


def push(folder: Path, repo_id: str) -> None:
    """Upload an export folder to the Hub (needs network and a token).

    The export is written before the upload and stays valid, so a failed upload (offline mode, no network, no
    token, no permission) is one error line that says where the export is, not a traceback.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError  # the base error of huggingface_hub's HTTP client, network included

    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    except (OSError, HTTPError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"--push-to-hub {repo_id}: upload failed ({reason}); the export is in {folder}") from None