"""benchmarks/throughput.py --short end to end: three implementations timed, table and JSON agree.

Only structure and sign are checked, never a speed: CI machines (and this 2-core one) are too noisy for a
wall-clock threshold to mean anything.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

IMPLEMENTATIONS = ["ironcore", "hf_trainer", "plain_pytorch"]


def test_short_benchmark_reports_three_implementations(tmp_path):
    out = tmp_path / "throughput.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "throughput.py"), "--short", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads(out.read_text())
    rows = {r["implementation"]: r for r in report["results"]}
    assert list(rows) == IMPLEMENTATIONS
    for name, row in rows.items():
        assert row["tokens_per_sec"] > 0 and row["ms_per_step"] > 0, name
        assert 0 < row["mfu"], name
        # same tokens per step for all three: tokens/s x seconds/step is the batch, whatever the speed
        tokens = report["shape"]["batch"] * report["shape"]["seq"]
        assert abs(row["tokens_per_sec"] * row["ms_per_step"] / 1e3 - tokens) < 1e-6 * tokens, name
    # the comparison is only fair if the GPT-2 baselines are the same size as IronCore's model
    assert rows["ironcore"]["params"] == rows["hf_trainer"]["params"] == rows["plain_pytorch"]["params"]
    assert rows["plain_pytorch"]["vs_plain"] == 1.0

    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == IMPLEMENTATIONS
    for line in table[1:]:
        tokens_per_sec = float(line.split("|")[3].replace(",", ""))
        assert tokens_per_sec > 0
