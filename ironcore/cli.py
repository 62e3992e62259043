"""The `ironcore` command: train | preprocess | tokenizer | config | export | generate | plot | eval.

This is the one place that prints. User mistakes (`IronCoreError`) become one line on stderr and exit
code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

import yaml

from ironcore.errors import IronCoreError


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """CONFIG plus `group.field=value` overrides, shared by every subcommand that reads a run config."""
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("overrides", nargs="*", help="GROUP.FIELD=VALUE overrides, values typed as YAML")


def cmd_config(args: argparse.Namespace) -> int:
    from ironcore.config import config_to_dict, derived_to_dict, load_config
    from ironcore.launch_config import explain, write_accelerate_config
    from ironcore.translate import LaunchEnv

    run = load_config(args.config, args.overrides, world_size=args.world_size)
    env = LaunchEnv.from_environ(world_size=args.world_size)
    report = {**config_to_dict(run), "derived": derived_to_dict(run)}
    if args.explain:
        report["explain"] = explain(run, env)
    if args.write_accelerate_config:
        write_accelerate_config(run, args.write_accelerate_config, env.world_size)
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print(yaml.safe_dump(report, sort_keys=False), end="")
    return 0


def config_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the fully resolved config (and what a launch would build from it)")
    add_config_args(p)
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    p.add_argument("--world-size", type=int, default=None, help="world size for the batch arithmetic (default: launch env)")
    p.add_argument("--explain", action="store_true", help="add batch arithmetic, Accelerate/DeepSpeed/FSDP settings, estimates")
    p.add_argument("--write-accelerate-config", metavar="FILE", help="write a file for `accelerate launch --config_file`")
    p.set_defaults(func=cmd_config)


def cmd_train(args: argparse.Namespace) -> int:
    from ironcore.config import load_config
    from ironcore.loop import train

    overrides = [*args.overrides, *(["trainer.resume=false"] if args.fresh else [])]
    export_dir = train(load_config(args.config, overrides))
    sys.stdout.write(f"model exported to {export_dir}\n")  # one write: every rank of a launch prints it
    sys.stdout.flush()
    return 0


def train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train as the config says (same as `accelerate launch -m ironcore.train`)")
    add_config_args(p)
    p.add_argument("--fresh", action="store_true", help="start fresh even if the run directory holds checkpoints")
    p.set_defaults(func=cmd_train)


def cmd_export(args: argparse.Namespace) -> int:
    from ironcore.export import export

    print(f"exported to {export(args.src, args.out, args.arch, args.push_to_hub)}")
    return 0


def export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="re-export a run, checkpoint or model dir as an IronCore, GPT-2, LLaMA, Mistral or Qwen2 HF directory")
    p.add_argument("src", help="run directory, checkpoint directory (RUN_DIR/checkpoints/step_N) or model directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--arch", choices=["ironcore", "gpt2", "llama", "mistral", "qwen2", "source"], default=None,
                   help="target architecture; source: the one of the checkpoint the run was fine-tuned from "
                        "(the default for such runs, else ironcore)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the export to this Hub repo")
    p.set_defaults(func=cmd_export)


def cmd_generate(args: argparse.Namespace) -> int:
    from ironcore.generate import generate

    for text in generate(args.model_dir, args.prompt, max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                         temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                         repetition_penalty=args.repetition_penalty, seed=args.seed):
        print(text)
    return 0


def generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from an exported model directory (decoding: its generation_config)")
    p.add_argument("model_dir")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the export's sampling")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the export's)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the export's)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens, 0 = all (default: the export's)")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats (default: the export's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)


def cmd_plot(args: argparse.Namespace) -> int:
    from ironcore.plot import plot_run, summary

    out = plot_run(args.run_dir, args.out)
    for line in summary(args.run_dir):
        print(line)
    print(f"plot written to {out}")
    return 0


def plot_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a run's train/eval loss and learning rate against steps (needs ironcore[plot])")
    p.add_argument("run_dir", help="run directory (trainer.model_path) holding metrics.jsonl")
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/loss.png)")
    p.set_defaults(func=cmd_plot)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 1")
    return value


def cmd_eval(args: argparse.Namespace) -> int:
    from ironcore.harness import evaluate, table

    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    results, path = evaluate(args.src, tasks, limit=args.limit, batch_size=args.batch_size,
                             include_path=args.include_path)
    print(table(results))
    print(f"results written to {path}")
    return 0


def eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score an export on lm-evaluation-harness tasks (needs ironcore[eval])")
    p.add_argument("src", help="run directory (its export/ is evaluated) or exported model directory")
    p.add_argument("--tasks", required=True, help="comma-separated harness tasks, e.g. hellaswag,arc_easy")
    p.add_argument("--limit", type=positive_int, help="at most N documents per task (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--include-path", help="directory of extra task YAMLs (local tasks)")
    p.set_defaults(func=cmd_eval)


def data_parsers(sub: argparse._SubParsersAction) -> None:
    from ironcore.data.cli import register

    register(sub)


PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    train_parser, data_parsers, config_parser, export_parser, generate_parser, plot_parser, eval_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ironcore", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in PARSERS:
        add(sub)
    return parser


# The process environment of every command; a variable the user set keeps its value. THP_MEM_ALLOC_ENABLE=1 puts
# each CPU tensor of 2 MiB or more on transparent huge pages (PyTorch's CPU tuning guide; off by default, since it
# rounds large blocks up to whole pages). A training step frees its large activations, logits and gradients and maps
# them afresh the next step, one page fault per 4 KiB: at the benchmark's shape A, 38,495 faults a step in fp32 and
# 25,993 in bf16, against 3,083 and 1,412 on huge pages (benchmarks/README.md). torch reads it at its first
# allocation, so it is set here, before any command imports torch.
PROCESS_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def main(argv: Sequence[str] | None = None) -> int:
    for name, value in PROCESS_ENV.items():
        os.environ.setdefault(name, value)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(arg.startswith("-") for arg in extra):
        args.overrides += extra  # overrides may also follow an option: `train CONFIG --fresh a.b=1`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except IronCoreError as err:
        if args.debug:
            raise
        sys.stderr.write(f"error: {err}\n")  # one write: ranks of a launch share the stream, lines must not interleave
        return 2


if __name__ == "__main__":
    sys.exit(main())
