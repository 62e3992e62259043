"""Data: tokenizers, dataset sources, task-specific tokenization, mixing, the preprocessing cache, loaders."""

from ironcore.data.loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from ironcore.data.prepare import PreparedData, prepare_data
from ironcore.data.tokenizer import DEFAULT_CHAT_TEMPLATE, load_tokenizer, train_tokenizer

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "EvalLoader",
    "PreparedData",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "load_tokenizer",
    "prepare_data",
    "train_tokenizer",
]
