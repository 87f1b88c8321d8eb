"""tests/test_faust_records.py in an environment with faust-streaming, where this one has none.

faust-streaming pins click<8.4, which the project's own environment (current transformers) cannot
take, so `.[dev]` leaves faust out. This test builds a virtual environment of its own with the
`faust` extra's requirement (cached, built once), layers this environment's packages beneath it (a
.pth file: faust's own pins win), and runs the faust tests there against this session's broker.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess

import pytest

from tests.side_env import REPO_ROOT, extra_requirement, side_environment

pytestmark = pytest.mark.integration


@pytest.mark.timeout(1200)
def test_the_faust_records_tests_pass_where_faust_is_installed(kafka_bootstrap: str) -> None:
    if importlib.util.find_spec("faust") is not None:
        pytest.skip("faust is installed here: tests/test_faust_records.py runs in this session itself")
    python = side_environment("faust", extra_requirement("faust"), beneath=True)
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_faust_records.py"],
        cwd=REPO_ROOT,
        env=os.environ | {"GUARDSTREAM_TEST_KAFKA": kafka_bootstrap},
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary, summary
