"""bench/gpu_session.sh, the one call a lent GPU machine gets, run on the CPU (its dry run): every step
must run to the end, so that the GPU's minutes are not spent on a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_the_gpu_session_script_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    environment = os.environ | {
        "GPU_SESSION_DRY_RUN": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # python3: this one
    }
    result = subprocess.run(
        ["bash", "bench/gpu_session.sh", str(tmp_path)],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = [line.split() for line in result.stdout.splitlines() if line.startswith("gpu_")]
    assert [line[:2] for line in summary] == [["gpu_check", "rc=0"], ["gpu_steps", "rc=0"]], result.stdout[
        -4000:
    ]
    rows = json.loads((tmp_path / "gpu-steps.json").read_text())["rows"]
    assert rows and all(row["tokens_per_second"] > 0 for row in rows)
