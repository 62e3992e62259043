"""What `ironcore config` shows and writes: the `accelerate launch --config_file` file for a run, and
`explain`, everything a launch would use as one JSON-able dict. Both read the translation in translate.py."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import yaml

from ironcore.compilation import compile_plan
from ironcore.config.schema import RunConfig
from ironcore.errors import ConfigError
from ironcore.estimate import Sharding, estimate
from ironcore.trackers import tracker_environ, tracker_init_kwargs, tracker_project_name
from ironcore.translate import (
    DECODER_LAYER_CLASS,
    BatchPlan,
    LaunchEnv,
    accelerator_settings,
    batch_plan,
    check_supported,
    deepspeed_config,
    fsdp_settings,
    mixed_precision,
    notes,
)


def launch_distributed_type(run: RunConfig, env: LaunchEnv) -> str:
    """distributed_type for the config file. Several CPU processes need MULTI_GPU: only that launcher (torchrun)
    starts them; MULTI_CPU in a file starts one process unless mpirun is configured. Each process then
    becomes MULTI_CPU DDP through build_accelerator's cpu=True."""
    if run.parallel.deepspeed_config:
        return "DEEPSPEED"
    if run.parallel.use_fsdp:
        return "FSDP"
    return "MULTI_GPU" if env.world_size > 1 else "NO"


def accelerate_config_file(run: RunConfig, env: LaunchEnv, deepspeed_config_file: str | None = None) -> dict:
    """The `accelerate launch --config_file` content for `env.world_size` processes.

    With DeepSpeed the file points at `deepspeed_config_file` (the JSON of `deepspeed_config`) and carries
    no mixed_precision key: Accelerate rejects one next to a DeepSpeed JSON (precision lives in the JSON).
    For several nodes, add each node's machine_rank and main_process_ip before launching.
    """
    check_supported(run, env)
    kind = launch_distributed_type(run, env)
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": kind,
        "num_processes": env.world_size,
        "num_machines": env.num_nodes,
        "machine_rank": env.rank // max(1, env.local_world_size),
        # 0: a free port (single node); several nodes must agree on one.
        "main_process_port": 0 if env.num_nodes == 1 else 29500,
        "rdzv_backend": "static",
        "same_network": True,
        "gpu_ids": "all",
        "use_cpu": not env.cuda_available and kind not in ("DEEPSPEED", "FSDP"),
        "debug": False,
        "downcast_bf16": "no",
        "enable_cpu_affinity": False,
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
    }
    if kind == "DEEPSPEED":
        if deepspeed_config_file is None:
            raise ValueError("a DeepSpeed launch config needs deepspeed_config_file (see write_accelerate_config)")
        config["deepspeed_config"] = {
            "deepspeed_config_file": deepspeed_config_file,
            "zero3_init_flag": run.derived.zero_stage == 3,
            "deepspeed_multinode_launcher": "standard",
        }
    else:
        config["mixed_precision"] = mixed_precision(run)
    if kind == "FSDP":
        s = fsdp_settings(run, env)
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": DECODER_LAYER_CLASS,
            "fsdp_reshard_after_forward": s["reshard_after_forward"],
            "fsdp_offload_params": s["cpu_offload"],
            "fsdp_state_dict_type": s["state_dict_type"],
            "fsdp_cpu_ram_efficient_loading": s["cpu_ram_efficient_loading"],
            "fsdp_activation_checkpointing": s["activation_checkpointing"],
        }
        if s["hsdp"]:
            config["parallelism_config"] = {
                "parallelism_config_dp_replicate_size": s["hsdp"]["dp_replicate_size"],
                "parallelism_config_dp_shard_size": s["hsdp"]["dp_shard_size"],
            }
    return config


def write_accelerate_config(run: RunConfig, path: str | os.PathLike, world_size: int) -> Path:
    """Write the accelerate config YAML (and `<stem>.deepspeed.json` next to it for DeepSpeed) for a
    single-node launch of `world_size` processes on this machine; returns the YAML path."""
    env = LaunchEnv.from_environ({}, world_size=world_size)
    if env.cuda_available and world_size > env.num_gpus:
        raise ConfigError(f"accelerate config: {world_size} processes but this machine has {env.num_gpus} GPUs")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds_path = None
    ds = deepspeed_config(run, env) if run.parallel.deepspeed_config else None
    if ds is not None:
        ds_path = path.with_name(f"{path.stem}.deepspeed.json")
        ds_path.write_text(json.dumps(ds, indent=2) + "\n")
    config = accelerate_config_file(run, env, str(ds_path.resolve()) if ds_path else None)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---------------------------------------------------------------- explain


def _sharding(run: RunConfig, env: LaunchEnv, plan: BatchPlan) -> Sharding:
    ds = deepspeed_config(run, env)
    if ds is not None:
        zero = ds["zero_optimization"]
        return Sharding(
            engine="deepspeed",
            shard_size=plan.data_parallel_size,
            zero_stage=run.derived.zero_stage,
            offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") != "none",
            offload_params=zero.get("offload_param", {}).get("device", "none") != "none",
        )
    s = fsdp_settings(run, env)
    if s is not None:
        shard = s["hsdp"]["dp_shard_size"] if s["hsdp"] else plan.data_parallel_size
        return Sharding(engine="fsdp", shard_size=shard, offload_params=s["cpu_offload"])
    return Sharding()


def explain(run: RunConfig, env: LaunchEnv) -> dict:
    """Everything a launch of `run` in `env` would use, as a JSON-able dict: batch arithmetic, Accelerator
    arguments, what trainer.torch_compile compiles, DeepSpeed JSON, FSDP settings, conversions made, the
    size/FLOPs/memory estimate, and the model fields taken from a pretrained checkpoint."""
    check_supported(run, env)
    settings = accelerator_settings(run, env)
    plan = batch_plan(run)
    return {
        "launch": asdict(env),
        "batch": {
            **asdict(plan),
            "formula": (
                f"{plan.micro_batch_size} micro x {plan.gradient_accumulation_steps} accumulation x "
                f"{plan.data_parallel_size} data-parallel = {plan.global_batch_size} sequences per optimizer step "
                f"(data-parallel = world {plan.world_size} / (tp {plan.tensor_parallel_size} x pp "
                f"{plan.pipeline_parallel_size}))"
            ),
        },
        "accelerator": settings,
        "compile": compile_plan(run),
        "launch_config_distributed_type": launch_distributed_type(run, env),
        "trackers": {
            "environ": tracker_environ(run),
            "project_name": tracker_project_name(run),
            "init_kwargs": tracker_init_kwargs(run),
        },
        "deepspeed": deepspeed_config(run, env),
        "fsdp": fsdp_settings(run, env),
        "notes": notes(run, env),
        "estimate": estimate(run, _sharding(run, env, plan)),
        "model_from_checkpoint": model_from_checkpoint(run),
    }


def model_from_checkpoint(run: RunConfig) -> dict | None:
    """With `init.from_pretrained`: each model / data field config resolution took from the checkpoint or the
    config, its value and where it came from (None when nothing was derived)."""
    sources = run.derived.model_sources
    if sources is None:
        return None
    values = {name: getattr(getattr(run, name.split(".")[0]), name.split(".")[1]) for name in sources
              if name.count(".") == 1}
    values |= {name: getattr(run.model.positional_embedding, name.rsplit(".", 1)[1]) for name in sources
               if name.startswith("model.positional_embedding.")}
    return {"source": run.init.from_pretrained,
            "fields": {name: {"value": values[name], "from": origin} for name, origin in sources.items()}}
