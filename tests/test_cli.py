"""The `ironcore` command's process environment: what `main` sets before any command imports torch."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# A command that fails on its input (exit 2, before any training), then what a training step does: large tensors
# allocated after the command ran. Prints the variable and the kB of anonymous memory on huge pages.
PROBE = """
import os, re, sys
from ironcore.cli import main
assert 'torch' not in sys.modules
code = main(["train", sys.argv[1]])
import torch
tensors = [torch.ones(2**22) for _ in range(4)]  # 4 x 16 MiB
pages = re.search(r"AnonHugePages:\\s+(\\d+) kB", open("/proc/self/smaps_rollup").read())
print(code, os.environ.get("THP_MEM_ALLOC_ENABLE"), pages.group(1))
"""


def kernel_thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (always, madvise or never), None where it has none."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists():
        return None
    return re.search(r"\[(\w+)\]", path.read_text()).group(1)


def probe(tmp_path: Path, **env: str) -> tuple[int, str, int]:
    base = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "missing.yaml")], env={**base, **env},
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    return int(out[0]), out[1], int(out[2])


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads Linux's /proc/self/smaps_rollup")
def test_commands_put_large_cpu_tensors_on_huge_pages_unless_the_user_says_otherwise(tmp_path):
    mode = kernel_thp_mode()
    code, value, huge_kb = probe(tmp_path)
    assert code == 2 and value == "1"
    if mode in ("always", "madvise"):
        assert huge_kb >= 32 * 1024, "the 64 MiB of tensors are not on huge pages"
    code, value, huge_kb = probe(tmp_path, THP_MEM_ALLOC_ENABLE="0")
    assert code == 2 and value == "0"
    if mode == "madvise":  # only madvised memory gets huge pages: not the tensors', without the variable
        assert huge_kb < 32 * 1024
