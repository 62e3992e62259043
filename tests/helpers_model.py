"""Tiny model configs and a memory probe shared by the model tests."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ironcore.config.resolve import resolve
from ironcore.config.schema import (
    DataConfig,
    InitConfig,
    ModelConfig,
    OperationConfig,
    PositionalEmbeddingConfig,
    RunConfig,
    TrainerConfig,
)
from ironcore.models import IronCoreConfig

GPT2_LIKE = dict(ln_type="layernorm", activation_type="gelu_tanh", no_bias=False)
LLAMA_LIKE = dict(ln_type="rmsnorm", activation_type="swiglu", no_bias=True)


def tiny_run(
    *,
    pe: str = "absolute",
    vocab_size: int = 60,
    padding_unit: int = 16,
    init_std: float = 0.2,
    recompute: str | None = None,
    rope: dict[str, Any] | None = None,
    **model: Any,
) -> RunConfig:
    """A RunConfig of a ~20k-parameter model with dropout off; keyword arguments override `model` fields."""
    fields = dict(
        d_model=32,
        d_ffn=64,
        num_layers=2,
        num_attention_heads=4,
        head_dim=8,
        max_seq_len=64,
        precision="float32",
        dropout_embd=0.0,
        dropout_attn=0.0,
        dropout_mlp=0.0,
        positional_embedding=PositionalEmbeddingConfig(type=pe, **(rope or {})),
    )
    fields.update(model)
    return resolve(RunConfig(
        model=ModelConfig(**fields),
        data=DataConfig(vocab_size=vocab_size),
        trainer=TrainerConfig(vocab_padding_unit=padding_unit, use_flash_attn=True),
        init=InitConfig(init_std=init_std),
        operation=OperationConfig(
            activation_recompute=recompute is not None, recompute_strategy=recompute or "default"
        ),
    ), world_size=1)


def tiny_config(attn: str = "sdpa", **kwargs: Any) -> IronCoreConfig:
    """The IronCoreConfig of `tiny_run(**kwargs)` with the given attention implementation."""
    config = IronCoreConfig.from_run_config(tiny_run(**kwargs))
    config._attn_implementation = attn
    return config


class _LiveStorages(TorchDispatchMode):
    """Remembers (weakly) the storage of every tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out


def activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of forward-pass results still alive once the loss exists: what autograd keeps for backward.

    Counted by storage liveness rather than with `saved_tensors_hooks`, because non-reentrant checkpointing
    keeps what it stores (layer inputs, the selective policy's saved outputs) outside those hooks.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    probe = _LiveStorages()
    with probe:
        loss = model(input_ids, labels=input_ids).loss
    gc.collect()
    alive = sum(n for ptr, (ref, n) in probe.storages.items() if ptr not in params and not ref.expired())
    del loss
    return alive


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors run faster on one intra-op thread, and stay fast when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
