"""Exact resume under random SIGKILLs: N trials against one uninterrupted run, each compared bitwise.

The run is the resume tests' (tests/helpers_dist.py): the tiny fp32 GPT-2 model with dropout 0.1 in every dropout
field (the spec's default), 6 optimizer steps of 8 rows (4 rows x 2 accumulation steps, or 2 ranks x 2 rows x 2
with --nproc 2), a checkpoint every 2 steps, evaluation at steps 3 and 6, sample ids logged. A trial launches it,
SIGKILLs every process at a random point, relaunches it on the same directory to the end, and compares every loss
either launch logged, the eval losses and the per-step sample ids with the reference: bitwise means all equal.

The point is drawn as: inside optimizer step k (after backward, before the update; k in 3..6) or inside the save
of step k (its files written, its manifest not; k in 4, 6), half and half, through the test-only hooks of the
tests/helpers_dist.py wrapper. A kill before the first complete checkpoint (step 2) would only start over, so it
is not drawn.

Run from the repository root: ``python benchmarks/resume_trials.py`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the launch helpers and the hook wrapper the resume tests use

import helpers_dist as hd  # noqa: E402

SAVE_EVERY = 2
HOOKS = {"step": "IRONCORE_TEST_HANG_MID_STEP", "save": "IRONCORE_TEST_HANG_IN_SAVE"}


@dataclasses.dataclass
class Trial:
    trial: int
    killed_in: str  # "step" or "save"
    step: int
    resumed_from: str  # the checkpoint `latest` named after the kill
    records: int  # loss records compared (both launches)
    max_loss_diff: float
    eval_equal: bool
    samples_equal: bool
    bitwise: bool
    seconds: float


def overrides(task: str, nproc: int) -> list[str]:
    data = hd.PRETRAIN if task == "pretrain" else hd.SFT
    return [*data, *hd.EVAL, *hd.DROPOUT, f"operation.train_steps={hd.STEPS}", f"trainer.micro_batch_size={4 // nproc}",
            "trainer.gradient_accumulation_steps=2", f"trainer.save_checkpoint_steps={SAVE_EVERY}"]


def draw_points(trials: int, seed: int) -> list[tuple[str, int]]:
    """(where, step) of each trial's kill, all after the first complete checkpoint."""
    rng = random.Random(seed)
    steps = range(SAVE_EVERY + 1, hd.STEPS + 1)
    saves = range(2 * SAVE_EVERY, hd.STEPS + 1, SAVE_EVERY)
    return [("step", rng.choice(steps)) if rng.random() < 0.5 else ("save", rng.choice(saves)) for _ in range(trials)]


def run_trial(index: int, point: tuple[str, int], config: list[str], nproc: int, reference: Path,
              work: Path) -> Trial:
    killed_in, step = point
    run_dir = work / f"trial-{index}"
    started = time.monotonic()
    hd.run_until_signal(run_dir, config, {HOOKS[killed_in]: str(step)}, nproc=nproc)
    resumed_from = hd.latest(run_dir)
    hd.run(run_dir, config, nproc=nproc)
    expected, logged = hd.losses(reference), hd.logged_losses(run_dir)
    complete = sorted(hd.losses(run_dir)) == sorted(expected)
    diff = max(abs(loss - expected[s]) if s in expected else float("inf") for s, loss in logged)
    eval_equal = hd.eval_losses(run_dir) == hd.eval_losses(reference)
    samples_equal = hd.samples(run_dir) == hd.samples(reference)
    return Trial(index, killed_in, step, resumed_from, len(logged), diff, eval_equal, samples_equal,
                 complete and diff == 0 and eval_equal and samples_equal, time.monotonic() - started)


def table(trials: list[Trial]) -> str:
    rows = ["| trial | killed inside | resumed from | loss records | max loss diff | eval | sample ids | bitwise "
            "|     s |",
            "|-------|---------------|--------------|--------------|---------------|------|------------|---------"
            "|-------|"]
    for t in trials:
        rows.append(f"| {t.trial:5d} | {t.killed_in + ' ' + str(t.step):13s} | {t.resumed_from:12s} | {t.records:12d} "
                    f"| {t.max_loss_diff:13.3g} | {'same' if t.eval_equal else 'diff':4s} "
                    f"| {'same' if t.samples_equal else 'diff':10s} | {'yes' if t.bitwise else 'NO':7s} "
                    f"| {t.seconds:5.1f} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="number of killed-and-relaunched runs (default 20)")
    p.add_argument("--short", action="store_true", help="CI mode: 2 trials")
    p.add_argument("--task", choices=["pretrain", "sft"], default="pretrain", help="sft: packed SFT rows")
    p.add_argument("--nproc", type=int, choices=[1, 2], default=1, help="CPU processes per run (2: DDP)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn kill points")
    p.add_argument("--json", type=Path, help="also write the trials to this file")
    p.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary directory)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.keep and args.keep.exists() and any(args.keep.iterdir()):
        raise SystemExit(f"error: --keep {args.keep} is not empty (a trial there would resume an old run)")
    count = 2 if args.short else args.trials
    config = overrides(args.task, args.nproc)
    points = draw_points(count, args.seed)
    with tempfile.TemporaryDirectory(prefix="ironcore-resume-") as tmp:
        work = args.keep or Path(tmp)
        reference = work / "reference"
        started = time.monotonic()
        hd.run(reference, config, nproc=args.nproc, fresh=True)
        reference_seconds = time.monotonic() - started
        trials = [run_trial(i + 1, point, config, args.nproc, reference, work) for i, point in enumerate(points)]
    bitwise = sum(t.bitwise for t in trials)
    print(f"run: {args.task}, {args.nproc} process(es), dropout 0.1, {hd.STEPS} steps of 8 rows "
          f"({4 // args.nproc} x {args.nproc} x GA 2), checkpoint every {SAVE_EVERY} "
          f"| reference {reference_seconds:.1f} s | kill points drawn with seed {args.seed}")
    print(table(trials))
    print(f"{bitwise}/{len(trials)} bitwise")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "task": args.task, "nproc": args.nproc, "seed": args.seed, "steps": hd.STEPS,
            "bitwise": bitwise, "trials": [dataclasses.asdict(t) for t in trials],
        }, indent=2) + "\n")
    return 0 if bitwise == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
