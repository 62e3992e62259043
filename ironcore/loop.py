"""The training loop, top to bottom (`ironcore train`, `accelerate launch -m ironcore.train`).

Every rank builds the same RunConfig, then: accelerator (translate) -> tokenizer + data -> model ->
optimizer + schedule -> resume -> steps of [GA micro-batches -> backward -> clip -> step] with logging,
evaluation and checkpoints -> test pass -> Hugging Face export. One run directory holds all of it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ironcore.checkpoint import (
    CHECKPOINTS_DIR, MODEL_CONFIG_KEY, find_resume_checkpoint, load_checkpoint, save_checkpoint, set_aside,
)
from ironcore.compilation import compile_model
from ironcore.config import RunConfig, config_to_dict
from ironcore.cpu_bf16 import gemm_dtype
from ironcore.data import TrainLoader, build_eval_loader, build_train_loader, load_tokenizer, prepare_data
from ironcore.data.loader import make_collator
from ironcore.errors import CheckpointError, ConfigError, IronCoreError
from ironcore.export import save_hf
from ironcore.metrics import MetricsLog, flops_per_token, global_norm, memory_report, mfu, non_embedding_param_count, peak_flops
from ironcore.models import build_model
from ironcore.optim import build_optimizer, build_scheduler
from ironcore.profiling import StepProfiler
from ironcore.samples import SAMPLES_TEXT_FILE, Sampler, read_prompts
from ironcore.tasks import Batch, DirectPreference, LanguageModeling, reference_logps
from ironcore.trackers import log_text_samples, tracker_init_kwargs, tracker_project_name
from ironcore.translate import build_accelerator, drop_fp32_output_wrapper

logger = get_logger(__name__)

Task = LanguageModeling | DirectPreference

# Model fields a resume may change: dropout shapes no weight and no optimizer state.
RESUME_IGNORED_MODEL_FIELDS = ("dropout_embd", "dropout_attn", "dropout_mlp")
SAMPLES_FILE = "samples.jsonl"


class NonFiniteLossError(IronCoreError):
    """Too many consecutive steps had a NaN/Inf loss; the run stops with its last good checkpoint."""


@dataclass
class StepResult:
    loss: float
    tokens: int
    grad_norm: float | None
    stats: dict[str, float] = field(default_factory=dict)
    lr: float = math.nan  # the learning rate this step's update used (before the scheduler moved on)


def train(run: RunConfig) -> Path:
    """Train as the config says; return the exported model directory."""
    out = prepare_run_dir(run)
    loop, loader = build_loop(run, out)
    accelerator, model, tokenizer = loop.accelerator, loop.model, loop.tokenizer
    step = resume(run, out, accelerator, loader, model)
    if accelerator.is_main_process:
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(run), sort_keys=False))
        if step == 0:
            set_aside_logs(loop)
    accelerator.init_trackers(tracker_project_name(run), config=flat_config(run), init_kwargs=tracker_init_kwargs(run))
    try:
        if run.operation.benchmark_tasks and accelerator.is_main_process:
            loop.check_benchmarks()  # an unknown task name stops the run now, not after training
        with logging_redirect_tqdm():  # log lines print above the progress bar instead of through it
            finished = loop.run(step, iter(loader), loader)
            if finished:
                loop.test()
        export_dir = out / "export"
        save_hf(accelerator, model, tokenizer, export_dir)
        release_engine(accelerator, model)
        if finished and run.operation.benchmark_tasks and accelerator.is_main_process:
            loop.benchmark(export_dir)
    finally:
        accelerator.end_training()
    return export_dir


def build_loop(run: RunConfig, out: Path) -> tuple[Loop, TrainLoader]:
    """Accelerator, tokenizer, data, model, task(s), optimizer and schedule, prepared, and this rank's train loader:
    everything `train` needs before resuming. Tests drive `Loop.train_step` on exactly these pieces."""
    accelerator = build_accelerator(run)
    configure_logging(run.utils.log_level)
    if run.utils.deterministic:
        torch.use_deterministic_algorithms(True)
    set_seed(run.init.seed)

    tokenizer = load_tokenizer(run)
    with accelerator.main_process_first():
        data = prepare_data(run, tokenizer)
    model = build_model(run)
    tasks = build_tasks(run, model, data, tokenizer, accelerator)
    compile_model(run, model, accelerator)  # after DPO copied its reference, before prepare wraps or shards
    optimizer = build_optimizer(model, run.optim, accelerator.device.type)
    scheduler = build_scheduler(optimizer, run.optim, run.operation.train_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    drop_fp32_output_wrapper(accelerator, model)
    set_seed(run.init.seed + accelerator.process_index)  # dropout differs per rank, weights do not

    loader = build_train_loader(data.train, run, rank=accelerator.process_index, tokenizer=tokenizer)
    loop = Loop(run, out, accelerator, model, optimizer, scheduler, tasks["train"], data, tokenizer, eval_tasks=tasks)
    return loop, loader


def configure_logging(level: str) -> None:
    """Apply `utils.log_level`: a stderr handler on the root logger when the process has none yet, and the level of
    IronCore's own loggers in every case. `logging.basicConfig` alone does nothing once the root logger has a
    handler (an application or test runner that set up logging, an earlier run in the same process), which would
    silently keep the loop's info lines hidden at INFO, or shown at WARNING."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ironcore").setLevel(level)


def release_engine(accelerator: Accelerator, model) -> None:
    """DeepSpeed: destroy the engine and meet the other ranks before end_training drops the process group;
    without it a ZeRO-3 rank often aborts at exit ("terminate called without an active exception", SIGABRT)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        model.destroy()
        accelerator.wait_for_everyone()


def prepare_run_dir(run: RunConfig) -> Path:
    """Create the run directory and prove it is writable before any expensive work starts."""
    out = run.run_dir
    field_name = "trainer.model_path" if run.trainer.model_path else "trainer.model_name"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{time.time_ns()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{field_name}: cannot write the run directory {out} ({err.strerror})") from None
    return out


def build_tasks(run: RunConfig, model: torch.nn.Module, data, tokenizer, accelerator: Accelerator) -> dict[str, Task]:
    """The task of each split ("train", "eval", "test"): causal LM for pretrain/SFT; DPO against a frozen copy
    of the initial model, or against its log-probs precomputed per split (`optim.dpo_precompute_ref`), since
    sample ids index their own split's rows and a train table must never score eval pairs."""
    if run.data.task_type != "dpo":
        task = LanguageModeling()
        return {"train": task, "eval": task, "test": task}
    reference = copy.deepcopy(model).eval().requires_grad_(False).to(accelerator.device)
    if not run.optim.dpo_precompute_ref:
        if shards_parameters(accelerator):
            logger.warning("DPO: the live reference model is a full, unsharded copy on every rank (only the trained "
                           "model is sharded); optim.dpo_precompute_ref=true scores the pairs once and frees it",
                           main_process_only=True)
        task = DirectPreference(run.optim.dpo_beta, reference=reference)
        return {"train": task, "eval": task, "test": task}
    limits = {"train": None, "eval": run.operation.eval_samples, "test": run.operation.test_samples}
    tasks = {}
    for split, limit in limits.items():
        dataset = getattr(data, split)
        rows = 0 if dataset is None else len(dataset) if limit is None else min(limit, len(dataset))
        batches = every_row_once(dataset, run, tokenizer, rows, rank=accelerator.process_index)
        with accelerator.autocast():
            table = reference_logps(reference, batches, max(rows, 1), accelerator.device)
        tasks[split] = DirectPreference(run.optim.dpo_beta, reference_logps=accelerator.reduce(table, "sum"))
    return tasks


def shards_parameters(accelerator: Accelerator) -> bool:
    """FSDP or DeepSpeed ZeRO-3: each rank holds a shard of the prepared model's parameters."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return accelerator.distributed_type == DistributedType.FSDP


def every_row_once(dataset, run: RunConfig, tokenizer, rows: int, *, rank: int) -> Iterator[Batch]:
    """Batches of this rank's rows among the first `rows` (rank, rank + dp size, ...), with their sample ids.

    Unlike the eval loader, which gives every rank the same number of rows and drops the remainder, every
    row lands on exactly one rank: a reference table with a missing row would score that pair against 0.
    """
    if rows == 0:
        return
    collate = make_collator(run, tokenizer)
    indices = list(range(rank, rows, run.derived.data_parallel_size))
    size = run.trainer.eval_batch_size
    for start in range(0, len(indices), size):
        chunk = indices[start : start + size]
        columns = dataset[chunk]
        rows = zip(*columns.values(), strict=True)
        yield collate([{**dict(zip(columns, values, strict=True)), "sample_id": i}
                       for values, i in zip(rows, chunk, strict=True)])


def resume(run: RunConfig, out: Path, accelerator: Accelerator, loader, model) -> int:
    """Continue from the run directory's latest complete checkpoint, if any and if asked to; return the step.

    A fresh start (`trainer.resume: false`, `--fresh`) in a directory that holds checkpoints moves them to
    `checkpoints.old-<time>` first, so a later resume or the retention never mixes the two runs.
    """
    if not run.trainer.resume:
        set_aside_checkpoints(out, accelerator)
        return 0
    ckpt = shared_resume_checkpoint(out, accelerator)
    if ckpt is None:
        return 0
    state = load_checkpoint(
        accelerator, ckpt,
        load_optim_state=run.optim.load_checkpoint_optim_state,
        load_lr_scheduler=run.optim.load_checkpoint_lr_scheduler,
        model_config=checkpoint_model_config(run),
        ignore_model_fields=RESUME_IGNORED_MODEL_FIELDS,
    )
    loader.load_state_dict(state["data"])
    logger.info("Resumed from %s at step %d", ckpt, state["step"], main_process_only=True)
    return int(state["step"])


def shared_resume_checkpoint(out: Path, accelerator: Accelerator) -> Path | None:
    """`find_resume_checkpoint` on the main process only, its answer (or its error) given to every rank.

    The search checksums every file of the checkpoint it picks: one full read of the checkpoint for the run,
    not one per rank of the same shared directory.
    """
    found: list[str | None] = [None, None]
    if accelerator.is_main_process:
        try:
            ckpt = find_resume_checkpoint(out)
            found[0] = None if ckpt is None else str(ckpt)
        except CheckpointError as e:
            found[1] = str(e)
    broadcast_object_list(found)
    if found[1] is not None:
        raise CheckpointError(found[1])
    return None if found[0] is None else Path(found[0])


def set_aside_checkpoints(out: Path, accelerator: Accelerator) -> None:
    previous = out / CHECKPOINTS_DIR
    if accelerator.is_main_process and previous.is_dir():
        aside = set_aside(previous)
        logger.warning("Starting fresh: moved the previous run's checkpoints to %s", aside, main_process_only=True)
    accelerator.wait_for_everyone()


def set_aside_logs(loop: Loop) -> None:
    """A run that starts at step 0 starts a new history: the metrics.jsonl, samples.jsonl and samples_text.jsonl an
    earlier start left move to `<name>.old-<time>.jsonl` with a warning, neither mixed with the new records nor
    dropped. Main process."""
    loop.metrics.close()
    for path in (loop.metrics.path, loop.out / SAMPLES_FILE, loop.out / SAMPLES_TEXT_FILE):
        if path.is_file() and path.stat().st_size:
            logger.warning("Starting at step 0: moved the earlier %s to %s", path.name, set_aside(path))
    loop.metrics = MetricsLog(loop.out)


def checkpoint_model_config(run: RunConfig) -> dict[str, object]:
    """The model group as saved with (and compared against) a checkpoint, plus the padded vocabulary size,
    which lives in the data group but sets the embedding shape."""
    return {**config_to_dict(run)["model"], "vocab_size": run.derived.padded_vocab_size}


def flat_config(run: RunConfig) -> dict[str, object]:
    """The resolved config as tracker hyperparameters: `group/field` -> scalar."""
    flat = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}" if prefix else key, item)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config_to_dict(run))
    return flat


class Loop:
    """The step loop and its cadences (log, eval, save, exit), holding what every step needs."""

    def __init__(self, run, out, accelerator, model, optimizer, scheduler, task, data, tokenizer=None,
                 eval_tasks: dict[str, Task] | None = None):
        self.cfg, self.out, self.accelerator, self.tokenizer = run, out, accelerator, tokenizer
        self.model, self.optimizer, self.scheduler, self.task, self.data = model, optimizer, scheduler, task, data
        self.eval_tasks = eval_tasks or {}
        self.main = accelerator.is_main_process
        self.metrics = MetricsLog(out) if self.main else None
        self.profiler = StepProfiler(run.utils, accelerator.process_index, out / "profile")
        model_cfg = run.model
        self.flops_per_token = flops_per_token(
            non_embedding_param_count(accelerator.unwrap_model(model)), model_cfg.num_layers, run.data.seq_length,
            model_cfg.num_attention_heads * model_cfg.head_dim,
        )
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[model_cfg.precision]
        dtype = gemm_dtype(accelerator.device.type, dtype)
        self.peak = peak_flops(accelerator.device, dtype, run.trainer.peak_tflops) * accelerator.num_processes
        # a CPU peak is a matmul benchmark, which another process loading the machine can slow down
        self.peak_is_measured = run.trainer.peak_tflops is None and accelerator.device.type == "cpu"
        self.nonfinite_in_a_row = 0
        prompts = read_prompts(run.operation.sample_prompts)
        self.sampler = Sampler(prompts, tokenizer, out, run.init.seed) if prompts and self.main else None

    def run(self, step: int, batches: Iterator[Batch], loader) -> bool:
        """Steps from `step` to operation.train_steps (or an exit_interval), with every cadence.

        Returns whether training reached operation.train_steps (False: stopped by operation.exit_interval)."""
        trainer, operation = self.cfg.trainer, self.cfg.operation
        progress = tqdm(total=operation.train_steps, initial=step, disable=not self.main, desc="train", dynamic_ncols=True)
        try:
            window_start, window_tokens = time.perf_counter(), 0
            start_step = step
            while step < operation.train_steps:
                micro_batches = [next(batches) for _ in range(self.accelerator.gradient_accumulation_steps)]
                with self.profiler.step(step + 1):
                    result = self.train_step(micro_batches, step + 1)
                if result is None:
                    continue
                step += 1
                if trainer.log_sample_ids:
                    self.log_samples(step, micro_batches)
                window_tokens += result.tokens
                progress.update(1)
                progress.set_postfix(loss=f"{result.loss:.4f}")
                if step % trainer.log_interval == 0 or step == operation.train_steps:
                    elapsed = time.perf_counter() - window_start
                    self.log_step(step, result, window_tokens / elapsed)
                    window_start, window_tokens = time.perf_counter(), 0
                if trainer.do_eval and step % operation.eval_interval == 0:
                    self.evaluate("eval", self.data.eval, operation.eval_samples, step)
                if self.sampler is not None and step % operation.eval_interval == 0:
                    self.sample(step)
                exit_interval = operation.exit_interval
                exiting = exit_interval is not None and step % exit_interval == 0 and step > start_step
                due = step % trainer.save_checkpoint_steps == 0 or exiting or step == operation.train_steps
                if due and not operation.no_save:
                    self.save(step, loader, result)
                if exiting:
                    logger.info("operation.exit_interval: stopping after step %d", step, main_process_only=True)
                    break
        finally:  # also on an error, so that its message starts on a line of its own and a cut window is written
            progress.close()
            self.profiler.close()
        return step >= operation.train_steps

    def train_step(self, micro_batches: list[Batch], step: int) -> StepResult | None:
        """One optimizer step over GA micro-batches, the loss normalised by the whole step's count."""
        acc, device = self.accelerator, self.accelerator.device
        micro_batches = [{k: v.to(device) for k, v in b.items()} for b in micro_batches]
        total = acc.reduce(sum(self.task.count(b) for b in micro_batches).float(), "sum")
        scale = acc.gradient_accumulation_steps * acc.num_processes / total.clamp(min=1)
        loss_sum = torch.zeros((), device=device)
        stats: dict[str, torch.Tensor] = {}
        self.model.train()
        for batch in micro_batches:
            with acc.accumulate(self.model):
                # Backward runs outside autocast, as torch advises: autocast's cache holds the low-precision copy
                # of every weight until the context exits, 2 bytes per parameter at backward's peak otherwise.
                with acc.autocast(), self.profiler.phase("forward"):
                    result = self.task(self.model, batch)
                with self.profiler.phase("backward"):
                    acc.backward(result.loss_sum * scale)
            loss_sum += result.loss_sum.detach().float()
            for key, value in result.stats.items():
                stats[key] = stats.get(key, 0) + value.detach().float()
        tokens = sum(b[self.token_key].sum() for b in micro_batches).float()
        # One all-reduce and one device sync for everything the step logs.
        sums = acc.reduce(torch.stack([loss_sum, tokens, *stats.values()]), "sum")
        sums[0] /= total.clamp(min=1)
        loss, tokens, *values = sums.tolist()
        if not math.isfinite(loss):
            return self.skip_step(step, loss)
        self.nonfinite_in_a_row = 0
        with self.profiler.phase("optimizer"):
            grad_norm = self.clip()
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        reduced = dict(zip(stats, values, strict=True))
        return StepResult(loss, int(tokens), grad_norm, self.task.summarize(loss * total.item(), reduced), lr)

    @property
    def token_key(self) -> str:
        return "chosen_attention_mask" if self.cfg.data.task_type == "dpo" else "attention_mask"

    def clip(self) -> float | None:
        """Clip to optim.clip_grad; return the norm before clipping, also without clipping when it is logged."""
        clip = self.cfg.optim.clip_grad
        if clip <= 0 and self.cfg.trainer.grad_norm_log_interval is None:
            return None
        # max_norm=inf measures without changing the gradients (the clip coefficient is clamped to 1)
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        return None if norm is None else float(norm)

    def skip_step(self, step: int, loss: float) -> None:
        """Drop a NaN/Inf step's gradients; stop after `trainer.max_nonfinite_steps` of them in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        logger.warning("step %d: loss is %s; the update is skipped (%d in a row)", step, loss, self.nonfinite_in_a_row,
                       main_process_only=True)
        limit = self.cfg.trainer.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            latest = find_resume_checkpoint(self.out, verify_checksums=False)
            raise NonFiniteLossError(
                f"loss was NaN/Inf for {limit} consecutive steps (trainer.max_nonfinite_steps) at step {step}; "
                f"stopped, last good checkpoint: {latest or 'none saved yet'}"
            )
        return None

    def log_step(self, step: int, result: StepResult, tokens_per_sec: float) -> None:
        trainer = self.cfg.trainer
        self.raise_measured_peak(step, tokens_per_sec * self.flops_per_token)
        record = {"loss": result.loss, "lr": result.lr, "tokens_per_sec": tokens_per_sec,
                  "mfu": mfu(tokens_per_sec, self.flops_per_token, self.peak)}
        record.update({f"train/{k}": v for k, v in result.stats.items() if k != "loss"})
        if trainer.grad_norm_log_interval == "log" and result.grad_norm is not None:
            record["grad_norm"] = result.grad_norm
        if trainer.param_norm_log_interval == "log":
            record["param_norm"] = self.param_norm()
        if self.cfg.utils.report_memory_usage:
            record.update({f"memory/{k}": v for k, v in memory_report(self.accelerator.device).items()})
        self.record(step, record)
        logger.info("step %d | %s", step, " | ".join(f"{k} {v:.4g}" for k, v in record.items()), main_process_only=True)

    def raise_measured_peak(self, step: int, achieved_flops: float) -> None:
        """Training cannot beat the hardware: when steps ran faster than the measured peak, the benchmark was
        slowed by other load, and the achieved rate is the better lower bound of the peak (MFU then stays <= 1)."""
        if self.peak_is_measured and achieved_flops > self.peak:
            logger.warning("step %d ran at %.3g TFLOP/s, above the measured peak of %.3g (the benchmark ran while the "
                           "machine was busy); using it as the peak for MFU (set trainer.peak_tflops to fix it)",
                           step, achieved_flops / 1e12, self.peak / 1e12, main_process_only=True)
            self.peak = achieved_flops

    def log_samples(self, step: int, micro_batches: list[Batch]) -> None:
        """Data-order audit (trainer.log_sample_ids): the step's sample ids of every rank, in rank order, one
        JSON line per optimizer step in samples.jsonl (appended; after a resume, the last line per step wins)."""
        ids = self.accelerator.gather(torch.cat([b["sample_ids"] for b in micro_batches]).to(self.accelerator.device))
        if self.main:
            with (self.out / SAMPLES_FILE).open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "sample_ids": ids.tolist()}) + "\n")

    def param_norm(self) -> float:
        return global_norm(p.detach() for p in self.model.parameters())

    def record(self, step: int, values: dict[str, float]) -> None:
        self.accelerator.log(values, step=step)
        if self.metrics is not None:
            self.metrics.log(values, step=step)

    @torch.no_grad()
    def evaluate(self, split: str, dataset, max_samples: int, step: int) -> dict[str, float]:
        """Loss/perplexity (+ token accuracy, or DPO reward accuracy) over `max_samples`, summed across ranks."""
        if dataset is None or len(dataset) == 0 or max_samples == 0:
            return {}
        acc = self.accelerator
        loader = build_eval_loader(dataset, self.cfg, rank=acc.process_index, max_samples=max_samples,
                                   tokenizer=self.tokenizer)
        if len(loader) == 0:
            logger.warning("%s: too few rows (%d) to give each of %d processes one; skipped", split,
                           min(max_samples, len(dataset)), acc.num_processes, main_process_only=True)
            return {}
        task = self.eval_tasks.get(split, self.task)
        self.model.eval()
        loss_sum = torch.zeros((), device=acc.device)
        stats: dict[str, torch.Tensor] = {}
        for batch in loader:
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.autocast():
                result = task(self.model, batch)
            loss_sum += result.loss_sum.float()
            for key, value in result.stats.items():
                stats[key] = stats.get(key, 0) + value.float()
        loss_total, *values = acc.reduce(torch.stack([loss_sum, *stats.values()]), "sum").tolist()
        summary = task.summarize(loss_total, dict(zip(stats, values, strict=True)))
        self.record(step, {f"{split}/{k}": v for k, v in summary.items()})
        logger.info("%s at step %d | %s", split, step, " | ".join(f"{k} {v:.4g}" for k, v in summary.items()),
                    main_process_only=True)
        return summary

    def sample(self, step: int) -> None:
        """operation.sample_prompts completed by the model as it is now, to samples_text.jsonl and the trackers."""
        rows = self.sampler.sample(self.accelerator.unwrap_model(self.model), step)
        log_text_samples(self.accelerator, step, rows)
        logger.info("samples at step %d | %s", step, " | ".join(repr(r["text"]) for r in rows))

    def check_benchmarks(self) -> None:
        """operation.benchmark_tasks known to lm-evaluation-harness (main process, before training)."""
        from ironcore.harness import check_tasks, task_manager

        operation = self.cfg.operation
        check_tasks(list(operation.benchmark_tasks), task_manager(operation.benchmark_include_path),
                    "operation.benchmark_tasks")

    def benchmark(self, export_dir: Path) -> None:
        """operation.benchmark_tasks on the export; scores to the trackers and metrics.jsonl at the last step,
        the harness's results to eval_results.json in the run directory. Main process."""
        from ironcore.harness import evaluate, scores, table

        operation = self.cfg.operation
        results, path = evaluate(export_dir, list(operation.benchmark_tasks), limit=operation.benchmark_limit,
                                 batch_size=self.cfg.trainer.eval_batch_size,
                                 include_path=operation.benchmark_include_path, where="operation.benchmark_tasks")
        self.record(operation.train_steps, scores(results))
        logger.info("benchmarks (%s):\n%s", path, table(results))

    def test(self) -> None:
        operation = self.cfg.operation
        self.evaluate("test", self.data.test, operation.test_samples, operation.train_steps)

    def save(self, step: int, loader, result: StepResult) -> None:
        """Checkpoint (collective), then the norms whose cadence is `checkpoint`."""
        trainer = self.cfg.trainer
        state = {"data": loader.state_dict(), MODEL_CONFIG_KEY: checkpoint_model_config(self.cfg)}
        save_checkpoint(self.accelerator, self.out, step, state, keep_last=trainer.keep_last_checkpoints)
        values = {}
        if trainer.grad_norm_log_interval == "checkpoint" and result.grad_norm is not None:
            values["grad_norm"] = result.grad_norm
        if trainer.param_norm_log_interval == "checkpoint":
            values["param_norm"] = self.param_norm()
        if values:
            self.record(step, values)

