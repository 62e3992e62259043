"""Host memory of importing a pretrained checkpoint: the peak RSS of `ironcore.models.load_pretrained` against the
float32 size of the model it builds (issue 13: at most about 1.3x).

For each family (GPT-2 at the gpt2 shape, ~124M parameters; LLaMA at a ~100M shape with GQA and an untied head)
a random-weight checkpoint is built and saved by transformers (safetensors, float32) into a temporary directory.
Each load then runs in a fresh Python process: torch, transformers and IronCore are imported, the current RSS is
read, the checkpoint is loaded into a run-shaped config (vocabulary padded to a multiple of 128, as
`trainer.vocab_padding_unit` does), and the peak RSS during the load (VmHWM, reset just before it) minus the RSS before is the figure.

Two routes are measured in alternation over `--rounds` rounds, so a change in machine load falls on both:

- `ironcore`: `load_pretrained(dir, config)`, tensors read one at a time into a meta-device skeleton;
- `via_transformers`: the route it replaced, `AutoModelForCausalLM`-style `from_pretrained(dir, dtype=float32)`
  of the native class, then converted (`gpt2_to_ironcore` / `llama_to_ironcore`) and re-padded (`retarget`).

`--short` uses tiny shapes (CI runs it through tests/test_benchmarks.py and checks only the table's structure:
at a few MB, the interpreter's own allocations dominate the ratio).

`--ranks N` (2, or more to see the scaling) measures each rank of an N-process run on one node instead (torchrun,
CPU, gloo): from before the model is built to once it is built (the import itself), and to after
`accelerator.prepare` has sharded it (which under ZeRO-3 also allocates DeepSpeed's fp32 partitions, gradient
buffers and Adam states). Under FSDP2: `rank0_broadcast`, what IronCore does (rank 0 loads, the others build on meta,
the weights are broadcast while sharding), against `every_rank`, the route before it (each rank loads the whole
checkpoint). Under ZeRO-3: `partitioned`, what IronCore does (`load_partitioned`: the model built under
`deepspeed.zero.Init`, rank 0 reads each tensor and scatters it into the ranks' partitions), against `every_rank`
(each rank loads the whole checkpoint, DeepSpeed then partitions it). `--layouts` picks fsdp, zero3 or both.

    python benchmarks/import_memory.py [--short] [--rounds 2] [--ranks 1|N] [--layouts fsdp,zero3] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FAMILIES = {
    # family -> (transformers config class name, full shape, --short shape)
    "gpt2": ("GPT2Config",
             {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12},
             {"vocab_size": 1000, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4}),
    "llama": ("LlamaConfig",
              {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
               "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": 2048,
               "tie_word_embeddings": False},
              {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
               "tie_word_embeddings": False}),
}
ROUTES = ("ironcore", "via_transformers")
PADDING_UNIT = 128


def save_checkpoint(family: str, short: bool, path: Path) -> None:
    """A random-weight float32 checkpoint of `family`, written by transformers' own save_pretrained."""
    import torch
    import transformers

    config_name, full, tiny = FAMILIES[family]
    config = getattr(transformers, config_name)(**(tiny if short else full))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (Linux): VmRSS is the resident set now, VmHWM its peak."""
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS, so the peak is the load's alone. (`ru_maxrss` cannot be used: a
    process started from a large parent inherits the parent's peak across fork and exec.)"""
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")


def measure(route: str, path: Path) -> dict:
    """In this (fresh) process: load `path` by `route`; the peak RSS over the RSS before, and the model's size."""
    import torch  # noqa: F401  (imported before the baseline is read, like everything the load needs)

    from ironcore.models.conversion import (
        ARCHITECTURES,
        check_model_dir,
        gpt2_to_ironcore,
        llama_to_ironcore,
        load_pretrained,
        pretrained_config,
        retarget,
    )

    model_type = check_model_dir(path)
    target = copy.deepcopy(pretrained_config(path, model_type))
    target.unpadded_vocab_size = target.vocab_size
    target.vocab_size = math.ceil(target.vocab_size / PADDING_UNIT) * PADDING_UNIT
    before = status_bytes("VmRSS")
    reset_peak_rss()
    if route == "ironcore":
        model = load_pretrained(path, target)
    else:
        native = ARCHITECTURES[model_type][1].from_pretrained(path, dtype=torch.float32)
        converted = gpt2_to_ironcore(native) if model_type == "gpt2" else llama_to_ironcore(native)
        del native
        model = retarget(converted, target)
        del converted
    peak = status_bytes("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "model_mb": params * 4 / 2**20, "peak_delta_mb": (peak - before) / 2**20}


# --ranks N: one node, N CPU ranks (torchrun, gloo), peak RSS of each rank from before build_model to after
# accelerator.prepare has sharded the model. The baseline route is what ran before rank-0 loading: every rank loads
# the checkpoint whole and FSDP shards it without broadcasting (cpu_ram_efficient_loading off), or DeepSpeed
# partitions it.
LAYOUTS = {"fsdp": ["parallel.use_fsdp=true"], "zero3": ["parallel.deepspeed_config=zero3"]}
RANK_ROUTES = {"fsdp": ("rank0_broadcast", "every_rank"), "zero3": ("partitioned", "every_rank")}


def measure_rank(layout: str, route: str, path: Path, run_dir: Path) -> dict | None:
    """On each of the launched ranks: build (or load) and prepare the model as `ironcore train` does; rank 0
    returns every rank's peak RSS delta (None on the others)."""
    import torch.distributed as dist

    from ironcore.config import load_config
    from ironcore.models import IronCoreConfig, build_model, load_pretrained
    from ironcore.optim import build_optimizer
    from ironcore.translate import build_accelerator

    run = load_config(None, [f"init.from_pretrained={path}", f"trainer.model_path={run_dir}", "model.precision=float32",
                             "trainer.micro_batch_size=1", "trainer.gradient_accumulation_steps=1", *LAYOUTS[layout]])
    accelerator = build_accelerator(run)
    before = status_bytes("VmRSS")
    reset_peak_rss()
    if route != "every_rank":
        model = build_model(run)
    else:
        model = load_pretrained(path, IronCoreConfig.from_run_config(run))
        if layout == "fsdp":
            accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = False
    built = (status_bytes("VmHWM") - before) / 2**20
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) if accelerator.is_main_process else 0
    optimizer = build_optimizer(model, run.optim, accelerator.device.type)
    model, optimizer = accelerator.prepare(model, optimizer)
    mine = {"rank": accelerator.process_index, "build_peak_delta_mb": built,
            "peak_delta_mb": (status_bytes("VmHWM") - before) / 2**20, "params": params}
    rows = [None] * accelerator.num_processes
    dist.all_gather_object(rows, mine)
    if layout == "zero3":
        model.destroy()  # the teardown ENVIRONMENT.md prescribes for ZeRO-3 on gloo
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return rows if mine["rank"] == 0 else None


def run_ranks(layout: str, route: str, path: Path, ranks: int) -> list[dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    with tempfile.TemporaryDirectory(prefix="import_memory_run_") as run_dir:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(ranks), __file__, "--rank-child", layout, route, str(path), run_dir],
                              capture_output=True, text=True, timeout=900, env={**env, "TMPDIR": run_dir})
    if proc.returncode != 0:
        raise RuntimeError(f"{layout}/{route} on {ranks} ranks failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("[")][-1])


def run_child(route: str, path: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", route, str(path)], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{route} load of {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="tiny shapes (CI)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each loading every family by every route")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--ranks", type=int, default=1, help="N > 1: FSDP and ZeRO-3 on N CPU ranks, per-rank peaks")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="--ranks: comma-separated, of " + ", ".join(LAYOUTS))
    parser.add_argument("--child", nargs=2, metavar=("ROUTE", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--rank-child", nargs=4, metavar=("LAYOUT", "ROUTE", "DIR", "RUN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]))))
        return 0
    if args.rank_child:
        layout, route, path, run_dir = args.rank_child
        rows = measure_rank(layout, route, Path(path), Path(run_dir))
        if rows is not None:
            print(json.dumps(rows))
        return 0
    if args.ranks > 1:
        return main_ranks(args)

    results = []
    with tempfile.TemporaryDirectory(prefix="import_memory_") as tmp:
        dirs = {family: Path(tmp) / family for family in FAMILIES}
        for family, path in dirs.items():
            save_checkpoint(family, args.short, path)
        for round_ in range(args.rounds):
            for family, path in dirs.items():
                routes = ROUTES if round_ % 2 == 0 else ROUTES[::-1]  # alternate which goes first
                for route in routes:
                    results.append({"family": family, "route": route, "round": round_, **run_child(route, path)})

    rows = []
    for family in FAMILIES:
        for route in ROUTES:
            runs = [r for r in results if (r["family"], r["route"]) == (family, route)]
            peak = max(r["peak_delta_mb"] for r in runs)  # the worst round: the bound is on the peak
            rows.append({"family": family, "route": route, "params": runs[0]["params"],
                         "model_mb": runs[0]["model_mb"], "peak_delta_mb": peak,
                         "ratio": peak / runs[0]["model_mb"], "rounds": [r["peak_delta_mb"] for r in runs]})
    print(f"shapes: {'short' if args.short else 'full'}, rounds: {args.rounds}, peak RSS delta of one load per "
          "fresh process (worst round)")
    print("| family | route | params | model MB (fp32) | peak RSS delta MB | ratio |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['family']} | {row['route']} | {row['params']:,} | {row['model_mb']:.1f} | "
              f"{row['peak_delta_mb']:.1f} | {row['ratio']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"short": args.short, "rounds": args.rounds, "results": rows}, indent=2))
    return 0


def main_ranks(args: argparse.Namespace) -> int:
    """--ranks N: for each family, layout and route, each rank's peak RSS delta, worst round."""
    layouts = args.layouts.split(",")
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        raise SystemExit(f"--layouts: {', '.join(sorted(unknown))} not among {', '.join(LAYOUTS)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="import_memory_") as tmp:
        dirs = {family: Path(tmp) / family for family in FAMILIES}
        for family, path in dirs.items():
            save_checkpoint(family, args.short, path)
        for round_ in range(args.rounds):
            for family, path in dirs.items():
                for layout in layouts:
                    routes = RANK_ROUTES[layout]
                    for route in routes if round_ % 2 == 0 else routes[::-1]:
                        for row in run_ranks(layout, route, path, args.ranks):
                            results.append({"family": family, "layout": layout, "route": route, **row})
    params = {r["family"]: r["params"] for r in results if r["rank"] == 0}
    rows = []
    for family in FAMILIES:
        model_mb = params[family] * 4 / 2**20
        for layout in layouts:
            for route in RANK_ROUTES[layout]:
                for rank in range(args.ranks):
                    mine = [r for r in results
                            if (r["family"], r["layout"], r["route"], r["rank"]) == (family, layout, route, rank)]
                    runs = [r["peak_delta_mb"] for r in mine]
                    build = max(r["build_peak_delta_mb"] for r in mine)
                    rows.append({"family": family, "layout": layout, "route": route, "rank": rank,
                                 "params": params[family], "model_mb": model_mb, "build_peak_delta_mb": build,
                                 "build_ratio": build / model_mb, "peak_delta_mb": max(runs),
                                 "ratio": max(runs) / model_mb, "rounds": runs})
    print(f"shapes: {'short' if args.short else 'full'}, rounds: {args.rounds}, {args.ranks} CPU ranks, peak RSS delta "
          "per rank from before the model is built to once it is built, and to once it is prepared (worst round)")
    print("| family | layout | route | rank | params | model MB (fp32) | built: peak MB | ratio | prepared: peak MB "
          "| ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['family']} | {row['layout']} | {row['route']} | {row['rank']} | {row['params']:,} | "
              f"{row['model_mb']:.1f} | {row['build_peak_delta_mb']:.1f} | {row['build_ratio']:.2f}x | "
              f"{row['peak_delta_mb']:.1f} | {row['ratio']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"short": args.short, "rounds": args.rounds, "ranks": args.ranks,
                                         "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
