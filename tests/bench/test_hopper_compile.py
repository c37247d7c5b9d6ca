"""Every kernel the engine launches compiles for Hopper (sm_90) without spilling and within a block's shared
memory: checked on the CPU with Triton's own ptxas, before any GPU time is spent (bench/hopper_compile.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton


def test_every_kernel_compiles_for_hopper():
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").exists() or not (tools / "cuobjdump").exists():
        pytest.skip("this Triton has no ptxas/cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "replayllm.bench.hopper_compile"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "regs" in line]
    assert len(lines) >= 30 and all(line.endswith("ok") for line in lines), done.stdout
    # Every kernel defined in the package is among them (a new kernel cannot be left out of the check).
    sources = Path(__file__).parents[2] / "src" / "replayllm" / "kernels"
    defined = {m for f in sources.glob("*.py") for m in re.findall(r"^def (_\w+_kernel)\(", f.read_text(), re.M)}
    assert defined and not {k for k in defined if k not in done.stdout}, sorted(defined)
