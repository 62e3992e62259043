"""RunConfig + launch environment -> everything Accelerate needs, with no silent fallbacks.

Plain functions, no module state: each takes the frozen `RunConfig` and a `LaunchEnv` (what the launcher
told this process) and returns a value. `build_accelerator` puts them together (trackers.py supplies the
tracker settings); launch_config.py shows them as JSON and writes the `accelerate launch --config_file` file.

Accelerate quietly turns some requests into something else on a machine like ours (see
shared/ENVIRONMENT.md sections 2-3): the FSDP plugin is ignored on CPU (`build_accelerator` switches
Accelerate's own FSDP2 path on for the gloo process group instead), DeepSpeed on CPU becomes
plain DDP with `cpu=True` or a world of 1 without a gloo process group, multi-process CPU without
`cpu=True` gives unsynchronised independent processes, fp16 on CPU trains in fp32, "auto" DeepSpeed
values fall back to defaults (gradient clipping 1.0). This module either makes each request work
as asked or raises a one-line `ConfigError` naming the field, and `build_accelerator` checks that
the Accelerator it built really is the distributed type and world size the run asked for.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import accelerate.utils.other
import torch
from accelerate import Accelerator, DeepSpeedPlugin, FullyShardedDataParallelPlugin
from accelerate.parallelism_config import ParallelismConfig
from accelerate.state import PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration
from accelerate.utils.other import get_free_port
from torch.distributed.fsdp import MixedPrecisionPolicy

from ironcore import cpu_bf16
from ironcore.config.schema import RunConfig
from ironcore.errors import ConfigError
from ironcore.trackers import logging_dir, tracker_environ, trackers

logger = logging.getLogger(__name__)

DECODER_LAYER_CLASS = "IronCoreDecoderLayer"
DS_PRESETS = ("zero1", "zero2", "zero2_offload", "zero3", "zero3_offload")
# Installed: ironcore/_ds_configs (setup.cfg package_dir); source checkout: <repo>/ds_configs.
_HERE = Path(__file__).resolve().parent
_SHIPPED_DS_DIRS = (_HERE / "_ds_configs", _HERE.parent / "ds_configs")
_MIXED_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}
_FSDP_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_FSDP_STATE_DICT = {"full": "FULL_STATE_DICT", "sharded": "SHARDED_STATE_DICT"}


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher (torchrun, `accelerate launch`, deepspeed) told this process, plus its devices.

    `launched` is True when LOCAL_RANK is set: only then does Accelerate create a process group.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False
    cuda_available: bool = False
    num_gpus: int = 0
    cpu_native_bf16: bool = True

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, *, world_size: int | None = None) -> LaunchEnv:
        """Read WORLD_SIZE / RANK / LOCAL_RANK / LOCAL_WORLD_SIZE (torchrun's names) and probe CUDA.

        `world_size` plans a single-node launch of that many processes from here (`ironcore config --world-size`).
        """
        environ = os.environ if environ is None else environ
        size = int(environ.get("WORLD_SIZE", 1))
        cuda = torch.cuda.is_available()
        env = cls(
            world_size=size,
            rank=int(environ.get("RANK", 0)),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", size)),
            launched="LOCAL_RANK" in environ,
            cuda_available=cuda,
            num_gpus=torch.cuda.device_count() if cuda else 0,
            cpu_native_bf16=cpu_bf16.cpu_has_native_bf16(),
        )
        if world_size is not None:
            launched = env.launched or world_size > 1
            env = replace(env, world_size=world_size, local_world_size=world_size, launched=launched)
        return env

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


# ---------------------------------------------------------------- batch arithmetic and support checks


@dataclass(frozen=True)
class BatchPlan:
    """micro_batch_size x gradient_accumulation_steps x data_parallel_size = global_batch_size."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    data_parallel_size: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    world_size: int
    global_batch_size: int
    tokens_per_step: int


def batch_plan(run: RunConfig) -> BatchPlan:
    """The resolved run's batch arithmetic (worked out once, by `ironcore.config.resolve`), as one record."""
    t = run.trainer
    return BatchPlan(
        micro_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        data_parallel_size=run.derived.data_parallel_size,
        tensor_parallel_size=t.tensor_model_parallel_size,
        pipeline_parallel_size=t.pipeline_model_parallel_size,
        world_size=run.parallel.world_size,
        global_batch_size=t.train_batch_size,
        tokens_per_step=run.derived.tokens_per_step,
    )


def check_supported(run: RunConfig, env: LaunchEnv) -> None:
    """Raise a one-line ConfigError for settings this machine or launch cannot run as asked.

    Settings no machine can run (pipeline / tensor parallelism, FSDP with DeepSpeed, FSDP2 modes that do
    not exist) are refused earlier, when the config is loaded (`ironcore.config.resolve.check_parallel`).
    Called once per entry point (`build_accelerator`, `explain`, `accelerate_config_file`).
    """
    p = run.parallel
    if p.world_size != env.world_size:
        raise ConfigError(
            f"parallel.world_size: the config was resolved for {p.world_size} process(es) (its batch arithmetic "
            f"depends on it) but this launch has {env.world_size}; load it with the launch's world size"
        )
    if run.model.precision == "float16" and not env.cuda_available and not p.deepspeed_config:
        raise ConfigError(
            "model.precision=float16 needs CUDA (on CPU Accelerate does no fp16 autocast and the run would "
            "silently train in fp32) - use bfloat16 or float32"
        )
    if run.trainer.torch_compile and run.derived.zero_stage == 3:
        raise ConfigError(
            f"trainer.torch_compile=true with parallel.deepspeed_config={p.deepspeed_config!r}: dynamo re-traces ZeRO-3's "
            "parameter-gathering hooks until it hits its recompile limit and the layers run eager - use FSDP "
            "(parallel.use_fsdp: true) or ZeRO-1/2 to train compiled, or torch_compile: false"
        )
    if p.use_fsdp and p.fsdp_offload_params and not env.cuda_available:
        raise ConfigError(
            "parallel.fsdp_offload_params=true: FSDP offloads parameters from GPU to CPU memory and no CUDA device "
            "is here (the parameters already live in CPU memory; torch's CPUOffloadPolicy fails without one) "
            "- set fsdp_offload_params: false"
        )
    if p.use_fsdp and p.fsdp_sharding_strategy == "hybrid" and env.world_size % env.local_world_size:
        raise ConfigError(
            f"parallel.fsdp_sharding_strategy=hybrid needs equal processes per node: world size {env.world_size} "
            f"is not a multiple of the local world size {env.local_world_size}"
        )


# ---------------------------------------------------------------- process group, precision, distributed type


def mixed_precision(run: RunConfig) -> str:
    """Accelerate's mixed_precision for model.precision: bfloat16 -> bf16, float16 -> fp16, float32 -> no."""
    return _MIXED_PRECISION[run.model.precision]


def uses_process_group(run: RunConfig, env: LaunchEnv) -> bool:
    """DeepSpeed and FSDP always need one (a world of 1 if unlaunched); plain runs only when launched."""
    return env.launched or bool(run.parallel.deepspeed_config) or run.parallel.use_fsdp


def resolve_backend(run: RunConfig, env: LaunchEnv) -> str:
    """parallel.dist_backend, except that nccl without CUDA becomes gloo (the only CPU backend here)."""
    return run.parallel.dist_backend if env.cuda_available else "gloo"


def expected_distributed_type(run: RunConfig, env: LaunchEnv) -> str:
    """The `accelerator.distributed_type` this run must end up with (checked by build_accelerator)."""
    if run.parallel.deepspeed_config:
        return "DEEPSPEED"
    if run.parallel.use_fsdp:
        return "FSDP"
    if not env.launched:
        return "NO"
    return "MULTI_GPU" if env.cuda_available else "MULTI_CPU"


def notes(run: RunConfig, env: LaunchEnv) -> list[str]:
    """What a launch should know: the conversions the translator made on purpose, and bf16 matmuls moved to fp32
    GEMMs on this CPU; build_accelerator logs each once, explain lists them."""
    out = []
    if uses_process_group(run, env) and resolve_backend(run, env) != run.parallel.dist_backend:
        out.append(f"parallel.dist_backend={run.parallel.dist_backend} needs CUDA; using gloo on this CPU machine")
    p = run.parallel
    if p.use_fsdp and p.fsdp_sharding_strategy == "hybrid" and env.num_nodes == 1:
        out.append(
            f"parallel.fsdp_sharding_strategy=hybrid on one node: parameters are sharded across its "
            f"{env.world_size} processes with one replica (the same layout as full)"
        )
    if (p.deepspeed_config or p.use_fsdp) and not env.launched:
        out.append("not started by a launcher: DeepSpeed/FSDP run as a single-process world of 1")
    if p.use_fsdp and not env.cuda_available:
        out.append("parallel.use_fsdp on CPU: Accelerate's FSDP2 path runs on the gloo process group "
                   "(Accelerate enables it only on accelerator devices; IronCore switches it on)")
    if bf16_on_fp32_gemms(run, env):
        out.append("model.precision=bfloat16 on a CPU without bf16 matrix units (AVX512-BF16 or AMX): its linear "
                   "and attention matmuls run as fp32 GEMMs on bf16-rounded operands (ironcore/cpu_bf16.py), since "
                   "this CPU's own bf16 GEMMs are 8-25x slower")
    return out


def bf16_on_fp32_gemms(run: RunConfig, env: LaunchEnv) -> bool:
    """bfloat16 on a CPU without bf16 matrix units: the forward's bf16 matmuls run on fp32 GEMMs (ironcore.cpu_bf16)."""
    return run.model.precision == "bfloat16" and not env.cuda_available and not env.cpu_native_bf16


def single_process_environ() -> dict[str, str]:
    """torchrun's variables for a world of 1, so DeepSpeed/FSDP get a real process group without a launcher."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(get_free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
    }


# ---------------------------------------------------------------- DeepSpeed


def load_deepspeed_preset(spec: str) -> dict:
    """A preset by name (`zero2`: ./ds_configs first, then the shipped ones), or a JSON file by path.

    Keys starting with `_` are comments and are dropped.
    """
    path = Path(spec)
    if path.suffix != ".json" and len(path.parts) == 1:
        candidates = [d / f"{spec}.json" for d in (Path.cwd() / "ds_configs", *_SHIPPED_DS_DIRS)]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise ConfigError(f"parallel.deepspeed_config={spec!r}: no such preset; available: {', '.join(DS_PRESETS)}")
    if not path.is_file():
        raise ConfigError(f"parallel.deepspeed_config={spec!r}: file not found")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"parallel.deepspeed_config={spec!r}: invalid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("zero_optimization"), dict):
        raise ConfigError(
            f"parallel.deepspeed_config={spec!r}: expected a JSON object with a zero_optimization section"
        )
    return {k: v for k, v in config.items() if not k.startswith("_")}


def deepspeed_stage(spec: str) -> int:
    """The ZeRO stage of a DeepSpeed preset or JSON file."""
    return load_deepspeed_preset(spec)["zero_optimization"].get("stage", 0)


def _set(config: dict, dotted: str, value, spec: str) -> None:
    """Fill `dotted` with our value; a different explicit value in the file is a contradiction, not overridden."""
    *parents, key = dotted.split(".")
    node = config
    for name in parents:
        node = node.setdefault(name, {})
    current = node.get(key, "auto")
    if current != "auto" and current != value:
        raise ConfigError(
            f"parallel.deepspeed_config={spec!r}: {dotted}={current!r} contradicts the run config's {value!r} "
            "- set it to \"auto\" or remove it"
        )
    node[key] = value


def _find_auto(config: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in config.items():
        if isinstance(value, dict):
            found += _find_auto(value, f"{prefix}{key}.")
        elif value == "auto":
            found.append(prefix + key)
    return found


def deepspeed_config(run: RunConfig, env: LaunchEnv) -> dict | None:
    """The DeepSpeed JSON for this run (None without parallel.deepspeed_config), with no "auto" left in it.

    Batch sizes, gradient clipping and precision come from the run config, never from Accelerate's
    defaults; bucket sizes use Accelerate's own d_model formulas; ZeRO-3 always gathers 16-bit weights
    on save because the HF export needs them.
    """
    spec = run.parallel.deepspeed_config
    if not spec:
        return None
    config = load_deepspeed_preset(spec)
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(
                f"parallel.deepspeed_config={spec!r} defines {section!r}: IronCore builds it from the optim "
                "group - remove it"
            )
    plan = batch_plan(run)
    d = run.model.d_model
    zero = config["zero_optimization"]
    stage = run.derived.zero_stage
    values = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "train_batch_size": plan.global_batch_size,
        "gradient_clipping": float(run.optim.clip_grad),
        "bf16.enabled": run.model.precision == "bfloat16",
        "fp16.enabled": run.model.precision == "float16",
        "zero_optimization.reduce_bucket_size": d * d,
    }
    if stage == 3:
        values["zero_optimization.stage3_prefetch_bucket_size"] = int(0.9 * d * d)
        values["zero_optimization.stage3_param_persistence_threshold"] = 10 * d
    for dotted, value in values.items():
        _set(config, dotted, value, spec)
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    left = _find_auto(config)
    if left:
        raise ConfigError(f"parallel.deepspeed_config={spec!r}: IronCore does not fill \"auto\" for {', '.join(left)}")
    return config


def deepspeed_plugin(run: RunConfig, env: LaunchEnv) -> DeepSpeedPlugin | None:
    """A DeepSpeedPlugin over the filled config dict; ZeRO-3 builds the model partitioned (zero3_init_flag)."""
    config = deepspeed_config(run, env)
    if config is None:
        return None
    return DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=run.derived.zero_stage == 3)


# ---------------------------------------------------------------- FSDP2


def fsdp_settings(run: RunConfig, env: LaunchEnv) -> dict | None:
    """The FSDP2 settings as plain values (None without parallel.use_fsdp): one source for plugin, file and explain.

    `mixed` computes in model.precision and reduces gradients in fp32 (the usual FSDP2 recipe, robust for
    bf16); bf16 / fp16 / fp32 use that dtype for both. Checkpoints hold the sharded state dict (one torch
    DCP file per rank) with fsdp_state_dict_type: sharded or operation.save_dist_ckpt, else the full one.
    Hybrid on several nodes shards within a node and replicates across nodes (HSDP, a 2-D device mesh
    through ParallelismConfig).
    """
    p = run.parallel
    if not p.use_fsdp:
        return None
    if p.fsdp_mixed_precision == "mixed":
        param_dtype, reduce_dtype = run.model.precision, "float32"
    else:
        param_dtype = reduce_dtype = _FSDP_DTYPES[p.fsdp_mixed_precision]
    hybrid = p.fsdp_sharding_strategy == "hybrid" and env.num_nodes > 1
    return {
        "fsdp_version": 2,
        "reshard_after_forward": True,
        "cpu_offload": p.fsdp_offload_params,
        "param_dtype": param_dtype,
        "reduce_dtype": reduce_dtype,
        "auto_wrap_policy": "transformer_based_wrap",
        "transformer_cls_names_to_wrap": [DECODER_LAYER_CLASS],
        "state_dict_type": _FSDP_STATE_DICT["sharded" if run.operation.save_dist_ckpt else p.fsdp_state_dict_type],
        "activation_checkpointing": False,
        "cpu_ram_efficient_loading": True,  # rank 0's weights broadcast while sharding (models.build_model)
        "hsdp": {"dp_replicate_size": env.num_nodes, "dp_shard_size": env.local_world_size} if hybrid else None,
    }


def fsdp_plugin(run: RunConfig, env: LaunchEnv) -> FullyShardedDataParallelPlugin | None:
    """FullyShardedDataParallelPlugin(fsdp_version=2) wrapping each IronCoreDecoderLayer.

    Every field is passed explicitly so no FSDP_* environment variable can change it. Activation
    checkpointing stays off here: operation.activation_recompute is applied by the model itself.
    """
    s = fsdp_settings(run, env)
    if s is None:
        return None
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=s["reshard_after_forward"],
        cpu_offload=s["cpu_offload"],
        mixed_precision_policy=MixedPrecisionPolicy(
            param_dtype=getattr(torch, s["param_dtype"]), reduce_dtype=getattr(torch, s["reduce_dtype"])
        ),
        auto_wrap_policy=s["auto_wrap_policy"],
        transformer_cls_names_to_wrap=s["transformer_cls_names_to_wrap"],
        state_dict_type=s["state_dict_type"],
        activation_checkpointing=s["activation_checkpointing"],
        cpu_ram_efficient_loading=s["cpu_ram_efficient_loading"],
    )


def parallelism_config(run: RunConfig, env: LaunchEnv) -> ParallelismConfig | None:
    """HSDP's 2-D mesh (replicate across nodes x shard within a node) for hybrid FSDP on several nodes."""
    s = fsdp_settings(run, env)
    if s is None or s["hsdp"] is None:
        return None
    return ParallelismConfig(**s["hsdp"])


# ---------------------------------------------------------------- Accelerator


def accelerator_settings(run: RunConfig, env: LaunchEnv) -> dict:
    """The Accelerator arguments as JSON-able values (what `accelerator_kwargs` turns into objects)."""
    group = uses_process_group(run, env)
    return {
        "mixed_precision": mixed_precision(run),
        "gradient_accumulation_steps": run.trainer.gradient_accumulation_steps,
        # IronCore's LR schedule counts optimizer steps and the loop steps it once per optimizer step;
        # Accelerate's default would step a prepared scheduler num_processes times per call.
        "step_scheduler_with_optimizer": False,
        # Never Accelerate's whole-model compile (an OptimizedModule wrapper, `_orig_mod.` keys): trainer.torch_compile
        # compiles each decoder layer in place (ironcore/compilation.py), and "no" also overrides a
        # dynamo backend that an accelerate config or ACCELERATE_DYNAMO_BACKEND would otherwise switch on.
        "dynamo_backend": "no",
        # DDP and FSDP on CPU need cpu=True (a gloo MULTI_CPU group); DeepSpeed must never get it
        # (Accelerate would silently drop DeepSpeed).
        "cpu": not env.cuda_available and not run.parallel.deepspeed_config,
        "log_with": trackers(run),
        "project_dir": str(run.run_dir),
        "logging_dir": str(logging_dir(run)),
        "init_process_group": (
            {"backend": resolve_backend(run, env), "timeout_seconds": run.parallel.timeout_minute * 60}
            if group
            else None
        ),
        "deepspeed": bool(run.parallel.deepspeed_config),
        "fsdp": run.parallel.use_fsdp,
        "distributed_type": expected_distributed_type(run, env),
        "num_processes": env.world_size,
    }


def accelerator_kwargs(run: RunConfig, env: LaunchEnv) -> dict:
    """Keyword arguments for `Accelerator(**kwargs)` (objects; see accelerator_settings for the values)."""
    s = accelerator_settings(run, env)
    handlers = []
    if s["init_process_group"]:
        pg = s["init_process_group"]
        handlers.append(InitProcessGroupKwargs(backend=pg["backend"], timeout=timedelta(seconds=pg["timeout_seconds"])))
    return {
        "mixed_precision": s["mixed_precision"],
        "gradient_accumulation_steps": s["gradient_accumulation_steps"],
        "step_scheduler_with_optimizer": s["step_scheduler_with_optimizer"],
        "dynamo_backend": s["dynamo_backend"],
        "cpu": s["cpu"],
        "log_with": s["log_with"] or None,
        "project_config": ProjectConfiguration(project_dir=s["project_dir"], logging_dir=s["logging_dir"]),
        "kwargs_handlers": handlers,
        "deepspeed_plugin": deepspeed_plugin(run, env),
        "fsdp_plugin": fsdp_plugin(run, env),
        "parallelism_config": parallelism_config(run, env),
    }


def build_accelerator(run: RunConfig, env: LaunchEnv | None = None) -> Accelerator:
    """The run's Accelerator, verified to be the distributed type and world size the config asks for.

    Side effects, on purpose and logged: the tracker variables of `tracker_environ`, and for DeepSpeed/FSDP
    without a launcher the torchrun variables of a single-process world.
    """
    env = env or LaunchEnv.from_environ()
    check_supported(run, env)
    unwrap_without_importing_deepspeed()
    if env.rank == 0:
        for note in notes(run, env):
            logger.warning(note)
    os.environ.update(tracker_environ(run))
    if uses_process_group(run, env) and not env.launched:
        os.environ.update(single_process_environ())
        env = replace(env, launched=True)
    kwargs = accelerator_kwargs(run, env)
    accelerator = Accelerator(**kwargs)
    if run.parallel.use_fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        enable_fsdp_on_cpu(accelerator, kwargs["fsdp_plugin"])
    if bf16_on_fp32_gemms(run, env):
        cpu_bf16.autocast_on_fp32_gemms(accelerator)
    want = expected_distributed_type(run, env)
    got = accelerator.distributed_type.value
    if got != want or accelerator.num_processes != env.world_size:
        raise ConfigError(
            f"launch mismatch: the config needs {want} with {env.world_size} process(es) but Accelerate set up {got} "
            f"with {accelerator.num_processes} (check the launcher and ACCELERATE_* variables; "
            "see ironcore config --write-accelerate-config)"
        )
    return accelerator


def unwrap_without_importing_deepspeed() -> None:
    """Keep deepspeed unimported on runs that do not use it.

    Accelerate's `unwrap_model` (also behind `get_state_dict`) imports deepspeed whenever it is installed, only to
    test `isinstance(model, DeepSpeedEngine)`; the import costs about a second and logs "Setting accelerator to
    CPU. If you have GPU ..." on stdout. No model can be a DeepSpeedEngine before deepspeed is imported (a
    DeepSpeed run imports it in `prepare`), so "already imported" answers that question exactly.
    """
    accelerate.utils.other.is_deepspeed_available = lambda: "deepspeed" in sys.modules


def drop_fp32_output_wrapper(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Take off the forward wrapper that `prepare` puts on a mixed-precision model: autocast, then
    `convert_outputs_to_fp32`. The loop runs every forward under `accelerator.autocast()` itself, so the wrapper's
    only other effect is an fp32 copy of the bf16 logits and its cast back in backward, [B, T, V] x 6 bytes through
    memory each micro-batch: 7% of a bf16 CPU step at benchmark shape A (benchmarks/README.md). The loss upcasts the
    logits chunk by chunk instead (`ironcore.objectives.ChunkedCrossEntropy`). DDP's wrapper stays; a model prepared
    without native AMP (fp32, DeepSpeed) has no such wrapper and is left as it is."""
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)


def enable_fsdp_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """Switch a MULTI_CPU (gloo) Accelerator to DistributedType.FSDP with `plugin`, as Accelerate does itself
    for GPU process groups (accelerate/state.py, AcceleratorState.__init__): from here on Accelerate's own
    FSDP2 code runs unchanged: `fully_shard` in prepare, DTensor gradient clipping, sharded or full
    save_state / load_state through torch.distributed.checkpoint, and the gathered get_state_dict.

    The type lives in two shared states: AcceleratorState re-copies PartialState's on every instantiation.
    """
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)


