"""IronCore models: the HF-compatible config and causal LM, conversions to/from GPT-2, LLaMA, Mistral and Qwen2,
model building.

Importing this package registers `model_type="ironcore"` with AutoConfig / AutoModel / AutoModelForCausalLM, and
marks the classes for auto-class export, so `save_pretrained` writes the modeling files next to the weights and the
directory also loads with `trust_remote_code=True` where IronCore is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_ironcore import (
    IronCoreConfig,
    resolve_attn_implementation,
    validate_model_config,
)
from .conversion import (
    build_model,
    gpt2_to_ironcore,
    ironcore_to_gpt2,
    ironcore_to_llama,
    ironcore_to_mistral,
    ironcore_to_qwen2,
    llama_to_ironcore,
    load_pretrained,
    trim_vocab_padding,
)
from .modeling_ironcore import IronCoreForCausalLM, IronCoreModel, IronCorePreTrainedModel

AutoConfig.register("ironcore", IronCoreConfig, exist_ok=True)
AutoModel.register(IronCoreConfig, IronCoreModel, exist_ok=True)
AutoModelForCausalLM.register(IronCoreConfig, IronCoreForCausalLM, exist_ok=True)
IronCoreConfig.register_for_auto_class()
IronCoreForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "IronCoreConfig",
    "IronCoreForCausalLM",
    "IronCoreModel",
    "IronCorePreTrainedModel",
    "build_model",
    "gpt2_to_ironcore",
    "ironcore_to_gpt2",
    "ironcore_to_llama",
    "ironcore_to_mistral",
    "ironcore_to_qwen2",
    "llama_to_ironcore",
    "load_pretrained",
    "resolve_attn_implementation",
    "trim_vocab_padding",
    "validate_model_config",
]
